"""Tests for bandit/: discounted evidence, pooled posteriors, change detection, the carrier
model, message classes and rewards, and the policies' distributions, draws and fallbacks."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
from scipy import stats

from bandit.model import CarrierModel, ModelConfig, Observation, RouteKey
from bandit.policies import (
    POLICIES,
    Arm,
    DecisionContext,
    Distribution,
    best_other,
    draw,
    draw_many,
    fallback_order,
    make_policy,
    with_retry,
)
from bandit.reward import DEFAULT_CLASSES, MessageClass, classes_from_config
from bandit.stats import Decayed, cusum_step, decay_factor, pooled_beta

KEY = RouteKey("RU", "mts", 1)
HOUR = 3600.0


# ---- stats --------------------------------------------------------------------------------


def test_decay_factor() -> None:
    assert decay_factor(100.0, 0.0, 100.0) == pytest.approx(0.5, rel=1e-15)
    assert decay_factor(300.0, 100.0, 100.0) == pytest.approx(0.25, rel=1e-15)
    assert decay_factor(0.0, 0.0, 100.0) == 1.0
    assert decay_factor(50.0, 100.0, 100.0) == 1.0  # out of order: never above 1
    assert decay_factor(500.0, 0.0, 0.0) == 1.0  # no decay without a half-life


def test_decayed_add_read_hand_case() -> None:
    c = Decayed.new(0.0)
    assert c == [0.0, 0.0, 0.0, 0.0, 0.0]
    Decayed.add(c, 0.0, 100.0, 1.0, 5.0)
    assert c == [1.0, 1.0, 5.0, 1.0, 0.0]
    Decayed.add(c, 100.0, 100.0, 0.0, None)  # halves, then one failure without latency
    assert c == pytest.approx([0.5, 1.5, 2.5, 0.5, 100.0], rel=1e-15)
    assert Decayed.read(c, 200.0, 100.0) == pytest.approx((0.25, 0.75), rel=1e-15)
    assert Decayed.read(c, 50.0, 100.0) == pytest.approx((0.5, 1.5), rel=1e-15)
    Decayed.add(c, 50.0, 100.0, 1.0, 3.0, weight=2.0)  # late event: no decay, time kept
    assert c == pytest.approx([2.5, 3.5, 8.5, 2.5, 100.0], rel=1e-15)
    assert Decayed.read(None, 10.0, 100.0) == (0.0, 0.0)


def test_pooled_beta_without_data_is_the_prior() -> None:
    assert pooled_beta([(0, 0, 0)] * 4, 0.5, 2.0, 20.0) == pytest.approx((1.0, 1.0))
    assert pooled_beta([(0, 0, 0)] * 2, 0.8, 4.0, 20.0) == pytest.approx((3.2, 0.8))


def test_pooled_beta_child_without_data_inherits_parent_mean() -> None:
    parent = pooled_beta([(30, 40, 0)], 0.5, 2.0, 20.0)
    assert parent == pytest.approx((31.0, 11.0))
    child = pooled_beta([(30, 40, 0), (0, 0, 0)], 0.5, 2.0, 20.0)
    assert child[0] / sum(child) == pytest.approx(31 / 42, rel=1e-14)


def test_pooled_beta_parent_speaks_for_at_most_pool_strength() -> None:
    # Parent posterior Beta(31, 11) (42 trials) is shrunk to 20 trials in the child.
    alpha, beta = pooled_beta([(30, 40, 0), (0, 0, 0)], 0.5, 2.0, 20.0)
    assert (alpha, beta) == pytest.approx((20 * 31 / 42, 20 * 11 / 42), rel=1e-14)
    assert alpha + beta == pytest.approx(20.0)
    # A child with its own 10 trials (2 successes) adds them on top of the 20.
    alpha, beta = pooled_beta([(30, 40, 0), (2, 10, 0)], 0.5, 2.0, 20.0)
    assert (alpha, beta) == pytest.approx((20 * 31 / 42 + 2, 20 * 11 / 42 + 8), rel=1e-14)
    # A weak parent (fewer trials than pool_strength) speaks only for what it has.
    alpha, beta = pooled_beta([(3, 4, 0), (0, 0, 0)], 0.5, 2.0, 20.0)
    assert (alpha, beta) == pytest.approx((4.0, 2.0))


def test_pooled_beta_provisional_failures_add_to_beta() -> None:
    alpha, beta = pooled_beta([(30, 40, 0), (0, 0, 3)], 0.5, 2.0, 20.0)
    assert (alpha, beta) == pytest.approx((20 * 31 / 42, 20 * 11 / 42 + 3), rel=1e-14)
    # Pending at the parent lowers the mean the child inherits.
    a2, b2 = pooled_beta([(30, 40, 5), (0, 0, 0)], 0.5, 2.0, 20.0)
    assert a2 / (a2 + b2) == pytest.approx(31 / 47, rel=1e-14)


def test_cusum_step_hand_case() -> None:
    fail = math.log(0.55 / 0.1)  # p0 = 0.9, p1 = 0.45
    ok = math.log(0.45 / 0.9)
    s = cusum_step(0.0, 0.0, 0.9, 0.45)
    assert s == pytest.approx(fail)
    s = cusum_step(s, 1.0, 0.9, 0.45)
    assert s == pytest.approx(fail + ok)
    assert cusum_step(0.0, 1.0, 0.9, 0.45) == 0.0  # never below zero
    # Probabilities are clipped to [1e-3, 1 - 1e-3]: no infinities.
    assert cusum_step(0.0, 0.0, 1.0, 0.5) == pytest.approx(math.log(0.5 / 1e-3))


# ---- the carrier model --------------------------------------------------------------------


def _levels(model: CarrierModel, carrier: str, key: RouteKey, now: float) -> list[tuple]:
    """(successes, trials, pending) per level, as the model pools them."""
    out = []
    for k in CarrierModel._levels(carrier, key):
        s, n = Decayed.read(model.counts_.get(k), now, model.config.half_life_seconds)
        out.append((s, n, model.pending_.get(k, 0.0)))
    return out


def _feed(model: CarrierModel, obs: Observation) -> bool:
    """Feed the change detector with an answer for a decision made at the answer's time."""
    return model.check_change(obs, obs.at)


def test_update_moves_the_estimate() -> None:
    model = CarrierModel()
    prior = model.estimate("good", KEY, 0.0)
    assert (prior.alpha, prior.beta, prior.truth, prior.latency_s) == (1.0, 1.0, 0.8, 10.0)
    for i in range(10):
        model.update(Observation("good", KEY, True, 0.0, latency_s=4.0 + i % 2))
        model.update(Observation("bad", KEY, False, 0.0))
    good = model.estimate("good", KEY, 0.0)
    bad = model.estimate("bad", KEY, 0.0)
    # Hand pooling of four levels of 10/10: Beta(29.3939..., 0.6060...).
    assert good.alpha == pytest.approx(20 * (20 * 21 / 22 + 10) / 30 + 10, rel=1e-12)
    assert good.alpha + good.beta == pytest.approx(30.0)
    assert good.success_mean == pytest.approx(0.97980, abs=1e-5)
    assert bad.success_mean == pytest.approx(1 - 0.97980, abs=1e-5)
    assert good.latency_s == pytest.approx(4.5)
    assert model.updates_ == 20
    # Three hours later the evidence has halved: the mean is pulled back toward the prior.
    later = model.estimate("good", KEY, 3 * HOUR)
    assert 0.5 < later.success_mean < good.success_mean
    # Each level now holds 5 trials: 2 + 5 -> 7 -> 12 -> 17 -> 22 pseudo-trials at the band.
    assert later.alpha + later.beta == pytest.approx(22.0)


def test_new_operator_and_band_start_from_the_country() -> None:
    model = CarrierModel()
    for i in range(40):
        model.update(Observation("c", KEY, i % 4 != 0, float(i)))  # 75% at RU/mts/band 1
    now = 40.0
    levels = _levels(model, "c", KEY, now)
    country = pooled_beta(levels[:2], 0.5, 2.0, 20.0)
    fresh = model.estimate("c", RouteKey("RU", "megafon", 3), now)
    assert fresh.success_mean == pytest.approx(country[0] / sum(country), rel=1e-12)
    assert fresh.alpha + fresh.beta == pytest.approx(20.0)
    assert fresh.success_mean == pytest.approx(0.75, abs=0.02)
    new_band = model.estimate("c", RouteKey("RU", "mts", 0), now)
    operator = pooled_beta(levels[:3], 0.5, 2.0, 20.0)
    assert new_band.success_mean == pytest.approx(operator[0] / sum(operator), rel=1e-12)
    # Another country has no data of its own: it starts from the carrier as a whole.
    other = model.estimate("c", RouteKey("DE", "o2", 1), now)
    assert other.success_mean == pytest.approx(levels[0][0] / levels[0][1], abs=0.03)


def test_pending_lowers_and_restores_exactly() -> None:
    model = CarrierModel()
    for i in range(30):
        model.update(Observation("c", KEY, i % 10 != 0, float(i)))
    before = model.estimate("c", KEY, 30.0)
    model.add_pending("c", KEY, 1.0)
    during = model.estimate("c", KEY, 30.0)
    assert during.success_mean < before.success_mean
    assert during.alpha + during.beta > before.alpha + before.beta
    model.add_pending("c", KEY, 1.0)
    assert model.estimate("c", KEY, 30.0).success_mean < during.success_mean
    model.add_pending("c", KEY, -1.0)
    model.add_pending("c", KEY, -1.0)
    after = model.estimate("c", KEY, 30.0)
    assert (after.alpha, after.beta) == (before.alpha, before.beta)
    assert dict(model.pending_) == {}


def test_update_truth_calibrates_a_liar() -> None:
    model = CarrierModel()
    for i in range(22):
        model.update_truth("honest", "RU", True, 0.0)
        model.update_truth("liar", "RU", i < 2, 0.0)
    alpha, _beta, ratio, latency = model.estimates(["honest", "liar", "unseen"], KEY, 0.0)
    honest = model.estimate("honest", KEY, 0.0).truth
    liar = model.estimate("liar", KEY, 0.0).truth
    # Alone, from the configured prior (0.8 x 4, pool 20): liar Beta(6, 36), honest Beta(39.4, 0.6).
    assert liar == pytest.approx(6 / 42, rel=1e-12)
    assert honest > 0.98

    # In a set, each carrier's prior is the others' rate: the liar's is (22 + 3.2) / 26, so
    # carrier level Beta(5.877, 20.123), country level Beta(6.521, 35.479): mean 0.15526; the
    # honest one's prior is (2 + 3.2) / 26 = 0.2, giving Beta(39.538, 2.462): mean 0.94139.
    # The ratio is in the carrier's favour: the liar's upper bound over the honest one's lower
    # bound, both the Beta posterior's quantiles two normal sds out (2.275% and 97.725%).
    tail = stats.norm.cdf(-2.0)
    want = stats.beta.ppf(1 - tail, 6.52077, 35.47923) / stats.beta.ppf(tail, 39.53846, 2.46154)
    assert ratio[0] == 1.0
    assert ratio[1] == pytest.approx(want, rel=1e-5)
    assert ratio[1] < 0.35
    assert ratio[2] == 1.0  # an unseen carrier is taken to be as honest as its peers
    assert list(alpha) == [1.0, 1.0, 1.0] and list(latency) == [10.0, 10.0, 10.0]


def test_a_thin_lucky_streak_does_not_discount_honest_carriers() -> None:
    """8 conversions of 8 receipts on a barely used carrier is no proof that it is more truthful
    than carriers converting 85% of 1,000. Its posterior is Beta(19.4, 0.6): mean - 2 sd (0.896)
    would beat the honest ones' upper bound (0.872); the posterior's own quantile (0.862) does
    not."""
    model = CarrierModel()
    for i in range(1000):
        model.update_truth("a", "RU", i % 20 < 17, 0.0)
        model.update_truth("b", "RU", i % 20 < 17, 0.0)
    for _ in range(8):
        model.update_truth("thin", "RU", True, 0.0)
    _alpha, _beta, ratio, _latency = model.estimates(["a", "b", "thin"], KEY, 0.0)
    assert ratio.tolist() == [1.0, 1.0, 1.0]


def test_quick_shares_learn_how_carriers_fail() -> None:
    """Of each carrier's failures, the share answered inside the SLA (so a retry still helps):
    only failures count, and an unseen carrier starts from its peers' share."""
    model = CarrierModel()
    for i in range(40):
        model.update(Observation("loud", KEY, False, 0.0, quick=i % 4 != 0))  # 75% answered
        model.update(Observation("silent", KEY, False, 0.0, quick=i % 10 == 0))  # 10%
        model.update(Observation("loud", KEY, True, 0.0))  # successes do not count
    loud, silent, unseen = model.quick_shares(["loud", "silent", "unseen"], "RU", 0.0)
    # Pooled as the truth ratio is: the prior is the other carriers' rate (x 4), then pool 20.
    prior = (4 + 0.5 * 4) / (40 + 4)
    a1, b1 = prior * 4 + 30, (1 - prior) * 4 + 10
    a2, b2 = a1 / (a1 + b1) * 20 + 30, b1 / (a1 + b1) * 20 + 10
    assert loud == pytest.approx(a2 / (a2 + b2), rel=1e-12)
    assert silent < 0.2 < 0.7 < loud
    assert unseen == pytest.approx((34 + 2) / (80 + 4), rel=1e-12)


def test_best_other_and_with_retry_hand_case() -> None:
    u = np.array([[0.4, 0.3, 0.1], [0.2, 0.5, 0.5]])
    assert best_other(u).tolist() == [[0.3, 0.4, 0.4], [0.5, 0.5, 0.5]]
    assert best_other(np.array([0.7])).tolist() == [0.0]
    # A cheap carrier that fails loudly 30% of the time, then the other one: 0.3 + 0.3 * 0.4.
    assert with_retry(np.array([0.4, 0.3]), np.array([0.02, 0.3])) == pytest.approx(
        [0.4 + 0.02 * 0.3, 0.3 + 0.3 * 0.4]
    )


def test_thompson_counts_the_retry_only_while_one_is_left() -> None:
    """Two carriers as good on receipts: the one whose failures are answered quickly is worth
    more on a first attempt (its failures can be retried in time), not on the retry itself."""
    model = CarrierModel()
    for i in range(400):
        for c, quick in (("loud", True), ("silent", False)):
            ok = i % 5 != 0
            model.update(Observation(c, KEY, ok, 0.0, 4.0, quick=not ok and quick))
    arms = [Arm("loud", 0.03), Arm("silent", 0.03)]
    policy = make_policy("thompson", model, seed=1, exploration_floor=0.0)
    first = policy.distribution(DecisionContext(KEY, _CLASS, 1, 0.0, attempt=1), arms)
    retry = policy.distribution(DecisionContext(KEY, _CLASS, 1, 0.0, attempt=2), arms)
    assert first.scores[0] > first.scores[1] + 0.02
    assert first.probabilities[0] > 0.9
    assert retry.scores[0] == pytest.approx(retry.scores[1])
    never = make_policy("thompson", model, seed=1, retries=0)
    assert never.distribution(DecisionContext(KEY, _CLASS, 1, 0.0), arms).scores[0] == (
        pytest.approx(retry.scores[0])
    )


def test_check_change_alarms_quickly_after_a_collapse() -> None:
    model = CarrierModel()
    t = 0.0
    pattern = [True] * 19 + [False]  # 95%
    for i in range(40):
        t += 10.0
        assert not _feed(model, Observation("c", KEY, pattern[i % 20], t))
    for i in range(40):
        model.update(Observation("c", KEY, pattern[i % 20], t))
    before = model.estimate("c", KEY, t).success_mean
    failures = 0
    alarmed = False
    while failures < 15 and not alarmed:
        t += 10.0
        failures += 1
        obs = Observation("c", KEY, False, t)
        model.update(obs)
        alarmed = _feed(model, obs)
    assert alarmed, "no alarm within 15 failures after a 95% -> 0% collapse"
    assert failures <= 8
    alarm = model.alarms_[-1]
    assert (alarm["carrier"], alarm["country"], alarm["direction"]) == ("c", "RU", "drop")
    assert 0.8 < alarm["rate_before"] < 0.95
    # The route's history (and its operators' and bands') restarts with reset_keep_trials.
    keep = model.config.reset_keep_trials
    assert model.counts_[("c", "RU")][1] == pytest.approx(keep)
    assert model.counts_[("c", "RU", "mts", "1")][1] == pytest.approx(keep)
    after = model.estimate("c", KEY, t).success_mean
    print(f"collapse: alarm after {failures} failures; estimate {before:.3f} -> {after:.3f}")
    assert after < before - 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_change_is_quiet_at_a_steady_rate(seed: int) -> None:
    model = CarrierModel()
    rng = np.random.default_rng(seed)
    outcomes = rng.random(5000) < 0.9
    alarms = sum(
        _feed(model, Observation("c", KEY, bool(ok), 5.0 * i)) for i, ok in enumerate(outcomes)
    )
    assert alarms == 0
    assert model.alarms_ == []


def test_state_dict_round_trip() -> None:
    model = CarrierModel(ModelConfig(half_life_seconds=HOUR, pool_strength=15.0))
    rng = np.random.default_rng(5)
    keys = [RouteKey("RU", "mts", 1), RouteKey("RU", "t2", 2), RouteKey("DE", "o2", 0)]
    for i in range(300):
        key = keys[i % 3]
        carrier = ("a", "b", "c")[int(rng.integers(3))]
        ok = bool(rng.random() < 0.8)
        quick = not ok and bool(rng.random() < 0.6)
        obs = Observation(carrier, key, ok, 10.0 * i, 3.0 + rng.random(), quick)
        model.update(obs)
        _feed(model, obs)
        model.update_truth(carrier, key.country, bool(rng.random() < 0.9), 10.0 * i)
    model.add_pending("a", keys[0], 1.0)
    model.add_pending("b", keys[2], 2.0)
    restored = CarrierModel.from_state(json.loads(json.dumps(model.state_dict())))
    assert restored.config == model.config
    assert restored.updates_ == 300
    probe = [*keys, RouteKey("RU", "beeline", 3)]
    for key in probe:
        for now in (3000.0, 5000.0):
            got = restored.estimates(["a", "b", "c", "z"], key, now)
            want = model.estimates(["a", "b", "c", "z"], key, now)
            for g, w in zip(got, want, strict=True):
                assert np.array_equal(g, w)
            got_q = restored.quick_shares(["a", "b", "c", "z"], key.country, now)
            assert np.array_equal(got_q, model.quick_shares(["a", "b", "c", "z"], key.country, now))
    assert restored.state_dict() == json.loads(json.dumps(model.state_dict()))


def test_model_config_validation() -> None:
    with pytest.raises(ValueError, match="half_life_seconds"):
        ModelConfig(half_life_seconds=0)
    with pytest.raises(ValueError, match="band_hours"):
        ModelConfig(band_hours=5)
    with pytest.raises(ValueError, match="prior"):
        ModelConfig(prior_success=1.0)
    with pytest.raises(ValueError, match="prior"):  # a Beta with no failures has no quantiles
        ModelConfig(truth_prior_mean=1.0)
    with pytest.raises(ValueError, match="truth_doubt_sd"):
        ModelConfig(truth_doubt_sd=-1.0)
    assert CarrierModel(ModelConfig(band_hours=4)).band_of(23) == 5


# ---- message classes and reward -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"value": -0.1}, "value must be >= 0"),
        ({"latency_penalty_per_second": -1}, "latency_penalty_per_second must be >= 0"),
        ({"grace_seconds": -1}, "grace_seconds must be >= 0"),
        ({"sla_seconds": 0}, "sla_seconds must be > 0"),
        ({"dlr_timeout_seconds": 65}, "dlr_timeout_seconds must be at least"),
    ],
)
def test_message_class_validation(kwargs: dict[str, float], fragment: str) -> None:
    spec = {"value": 0.5, "sla_seconds": 60.0, "grace_seconds": 10.0, **kwargs}
    with pytest.raises(ValueError, match=fragment) as err:
        MessageClass("otp", **spec)
    assert "'otp'" in str(err.value)


def test_classes_from_config() -> None:
    classes = classes_from_config({"otp": {"value": 0.5, "sla_seconds": 30}})
    assert classes["otp"] == MessageClass("otp", 0.5, 30.0)
    assert classes["otp"].learner_deadline_seconds == 40.0
    with pytest.raises(ValueError, match=r"'otp': unknown setting\(s\) \['valu'\]"):
        classes_from_config({"otp": {"valu": 0.5, "sla_seconds": 30}})
    with pytest.raises(ValueError, match="'otp': expected a mapping"):
        classes_from_config({"otp": 3})
    with pytest.raises(ValueError, match="'otp'"):
        classes_from_config({"otp": {"value": 0.5}})  # sla_seconds missing


def test_reward_hand_cases() -> None:
    otp = MessageClass("otp", value=0.5, sla_seconds=60, latency_penalty_per_second=0.001)
    assert otp.reward(1.0, 0.05, 10.0) == pytest.approx(0.5 - 0.05 - 0.01)
    assert otp.reward(1.0, 0.05, 300.0) == pytest.approx(0.5 - 0.05 - 0.06)  # capped at SLA
    assert otp.reward(0.0, 0.05, None) == pytest.approx(-0.05)
    assert otp.reward(0.0, 0.0, None) == 0.0
    mk = DEFAULT_CLASSES["marketing"]
    assert mk.reward(1.0, 0.01, 1000.0) == pytest.approx(0.03 - 0.01)


# ---- policies -----------------------------------------------------------------------------

_CLASS = MessageClass("otp", value=0.5, sla_seconds=60, latency_penalty_per_second=0.001)


def _trained_model(rng: np.random.Generator, carriers: Sequence[str]) -> CarrierModel:
    """A model with random evidence for `carriers` in a few contexts."""
    model = CarrierModel()
    rates = {c: rng.uniform(0.3, 0.98) for c in carriers}
    for i in range(400):
        c = carriers[int(rng.integers(len(carriers)))]
        key = RouteKey(("RU", "DE")[i % 2], ("mts", "o2", "x")[i % 3], i % 4)
        model.update(Observation(c, key, bool(rng.random() < rates[c]), float(i), 5.0))
        if i % 7 == 0:
            model.update_truth(c, key.country, bool(rng.random() < rates[c]), float(i))
    return model


def _random_arms(rng: np.random.Generator, carriers: Sequence[str]) -> list[Arm]:
    """A random eligible set of 1..len(carriers) arms with random prices and priorities."""
    k = int(rng.integers(1, len(carriers) + 1))
    chosen = rng.choice(len(carriers), size=k, replace=False)
    return [
        Arm(
            carriers[int(i)],
            float(rng.uniform(0.001, 0.2)),
            bool(rng.random() < 0.3),
            int(rng.integers(1, 10)),
        )
        for i in chosen
    ]


CARRIERS = ["c0", "c1", "c2", "c3", "c4", "c5"]


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_distribution_is_a_distribution_with_the_floor(name: str, floor: float) -> None:
    rng = np.random.default_rng(11)
    model = _trained_model(rng, CARRIERS)
    policy = make_policy(name, model, seed=3, exploration_floor=floor)
    for i in range(60):
        arms = _random_arms(rng, CARRIERS)
        key = RouteKey(("RU", "DE", "GB")[i % 3], ("mts", "o2", "new")[i % 3], i % 4)
        ctx = DecisionContext(key, _CLASS, int(rng.integers(1, 4)), 400.0 + i)
        dist = policy.distribution(ctx, arms)
        p = dist.probabilities
        assert p.shape == (len(arms),) and dist.scores.shape == (len(arms),)
        assert abs(p.sum() - 1.0) <= 1e-12
        assert (p >= 0).all()
        if len(arms) > 1:
            assert (p >= floor / len(arms) - 1e-12).all()
        else:
            assert p[0] == 1.0


def test_static_and_cheapest() -> None:
    model = CarrierModel()
    arms = [Arm("a", 0.05, False, 3), Arm("b", 0.02, False, 5), Arm("c", 0.08, False, 1)]
    ctx = DecisionContext(KEY, _CLASS, 1, 0.0)
    static = make_policy("static", model).distribution(ctx, arms).probabilities
    assert static.tolist() == [0.0, 0.0, 1.0]
    cheap = make_policy("cheapest", model).distribution(ctx, arms).probabilities
    assert cheap.tolist() == [0.0, 1.0, 0.0]
    floored = make_policy("cheapest", model, exploration_floor=0.3)
    assert floored.distribution(ctx, arms).probabilities == pytest.approx([0.1, 0.8, 0.1])
    # Ties: cheapest breaks by priority, then order; static by order.
    tied = [Arm("x", 0.02, False, 4), Arm("y", 0.02, False, 2), Arm("z", 0.02, False, 2)]
    assert make_policy("cheapest", model).distribution(ctx, tied).probabilities.tolist() == [
        0.0,
        1.0,
        0.0,
    ]
    assert make_policy("static", model).distribution(ctx, tied).probabilities.tolist() == [
        0.0,
        1.0,
        0.0,
    ]


def test_epsilon_greedy_and_uniform_values() -> None:
    model = CarrierModel()
    for _ in range(20):
        model.update(Observation("b", KEY, True, 0.0))
    arms = [Arm("a", 0.01), Arm("b", 0.01), Arm("c", 0.01), Arm("d", 0.01)]
    ctx = DecisionContext(KEY, _CLASS, 1, 0.0)
    eg = make_policy("epsilon_greedy", model, epsilon=0.2).distribution(ctx, arms)
    assert eg.probabilities == pytest.approx([0.05, 0.85, 0.05, 0.05], abs=1e-15)
    un = make_policy("uniform", model).distribution(ctx, arms)
    assert un.probabilities.tolist() == [0.25] * 4
    rr = make_policy("round_robin", model)
    picks = [int(np.argmax(rr.distribution(ctx, arms).probabilities)) for _ in range(6)]
    assert picks == [0, 1, 2, 3, 0, 1]


def test_make_policy_errors() -> None:
    model = CarrierModel()
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; known: .*thompson"):
        make_policy("nope", model)
    with pytest.raises(ValueError, match=r"'thompson' has no parameter\(s\) \['n_sample'\]"):
        make_policy("thompson", model, n_sample=10)
    with pytest.raises(
        ValueError, match=r"\['cache_seconds', 'epsilon', 'exploration_floor', 'retries'\]"
    ):
        make_policy("epsilon_greedy", model, eps=0.1)
    with pytest.raises(ValueError, match="exploration_floor"):
        make_policy("uniform", model, exploration_floor=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        make_policy("epsilon_greedy", model, epsilon=1.5)
    policy = make_policy("thompson", model, seed=4, n_samples=64)
    assert policy.params()["n_samples"] == 64 and policy.seed == 4
    assert len(policy.version) == 10
    assert policy.version != make_policy("thompson", model, seed=4, n_samples=65).version


# 99.99% quantiles of chi-square with 1..5 degrees of freedom.
_CHI2_9999 = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745}


@pytest.mark.parametrize(
    "probs",
    [[0.7, 0.2, 0.1], [0.01, 0.01, 0.48, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2], [0.999, 0.001]],
)
def test_draw_frequencies_match_probabilities(probs: list[float]) -> None:
    p = np.asarray(probs)
    n = 100_000
    rng = np.random.default_rng(2024)
    dist = Distribution(p, np.zeros(len(p)))
    counts = np.bincount([draw(dist, rng) for _ in range(n)], minlength=len(p))
    batch = np.bincount(draw_many(p, n, np.random.default_rng(7)), minlength=len(p))
    for c in (counts, batch):
        assert c.sum() == n
        expected = n * p
        se = np.sqrt(n * p * (1 - p))
        assert (np.abs(c - expected) <= 4.5 * se).all(), (c, expected)
        chi2 = float(((c - expected) ** 2 / expected).sum())
        assert chi2 < _CHI2_9999[len(p) - 1]


def test_draw_never_picks_a_zero_probability_arm() -> None:
    rng = np.random.default_rng(1)
    p = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    idx = {draw(Distribution(p, np.zeros(len(p))), rng) for _ in range(5000)}
    assert idx == {1, 3}
    assert set(draw_many(p, 5000, rng).tolist()) == {1, 3}


def test_fallback_order() -> None:
    dist = Distribution(np.array([0.1, 0.4, 0.1, 0.3, 0.1]), np.array([0.5, 0.2, 0.9, 0.1, 0.7]))
    assert fallback_order(dist, 1) == [3, 2, 4, 0]  # ties at 0.1 by utility
    assert fallback_order(dist, 2) == [1, 3, 4, 0]
    assert fallback_order(Distribution(np.array([1.0]), np.array([0.0])), 0) == []
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = int(rng.integers(2, 7))
        d = Distribution(rng.dirichlet(np.ones(k)), rng.normal(size=k))
        chosen = int(rng.integers(k))
        order = fallback_order(d, chosen)
        assert sorted(order) == [i for i in range(k) if i != chosen]
        assert all(d.probabilities[a] >= d.probabilities[b] for a, b in itertools.pairwise(order))
