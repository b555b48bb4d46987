"""What the engine has learned about carriers: success within SLA, receipt truthfulness, latency.

Evidence is kept per carrier at four levels (carrier, country, operator, local time band),
discounted with a half-life in event time and pooled from the root down. Conversions calibrate
each carrier's receipts; a CUSUM detector forgets a route's history when its failure rate jumps.
Plain Python and NumPy: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.special import betaincinv, ndtr

from bandit.stats import Decayed, cusum_step, pooled_beta


@dataclass(frozen=True, slots=True)
class RouteKey:
    """The context a carrier's evidence is filed under."""

    country: str
    operator: str
    band: int


@dataclass(frozen=True, slots=True)
class Observation:
    """A final answer for the learner: did the message succeed within its class's SLA?"""

    carrier: str
    key: RouteKey
    success: bool
    at: float
    latency_s: float | None = None
    quick: bool = False  # a failure answered inside the SLA, which senders retry elsewhere


@dataclass(frozen=True)
class ModelConfig:
    """Learning parameters; every one is configuration, not a constant."""

    half_life_seconds: float = 3 * 3600.0
    band_hours: int = 6
    prior_success: float = 0.5
    prior_strength: float = 2.0
    pool_strength: float = 20.0
    truth_prior_mean: float = 0.8
    truth_prior_strength: float = 4.0
    truth_doubt_sd: float = 2.0
    default_latency_s: float = 10.0
    cusum_drop_ratio: float = 0.5
    cusum_rise_ratio: float = 0.5
    cusum_threshold: float = 12.0
    cusum_min_change: float = 0.2
    cusum_min_trials: float = 20.0
    reset_keep_trials: float = 3.0
    quick_prior_mean: float = 0.5
    quick_prior_strength: float = 4.0
    probe_share: float = 0.05
    probe_half_life_seconds: float = 1800.0

    def __post_init__(self) -> None:
        if self.half_life_seconds <= 0:
            raise ValueError("half_life_seconds must be > 0")
        if not 1 <= self.band_hours <= 24 or 24 % self.band_hours:
            raise ValueError("band_hours must divide 24")
        if not (
            0 < self.prior_success < 1
            and 0 < self.quick_prior_mean < 1
            and 0 < self.truth_prior_mean < 1
        ):
            raise ValueError("prior means must be in (0, 1)")
        if self.truth_doubt_sd < 0:
            raise ValueError("truth_doubt_sd must be >= 0")
        if not 0 < self.cusum_drop_ratio < 1 or not 0 < self.cusum_rise_ratio < 1:
            raise ValueError("cusum_drop_ratio and cusum_rise_ratio must be in (0, 1)")


@dataclass(slots=True)
class ArmEstimate:
    """The model's view of one carrier in one context."""

    alpha: float
    beta: float
    truth: float
    latency_s: float

    @property
    def success_mean(self) -> float:
        """Posterior mean probability of success within SLA (by receipts)."""
        return self.alpha / (self.alpha + self.beta)


Key = tuple[str, ...]


@dataclass
class CarrierModel:
    """Learned state: scikit-learn style, parameters in `config`, learned state in `*_` fields."""

    config: ModelConfig = field(default_factory=ModelConfig)
    counts_: dict[Key, list[float]] = field(default_factory=dict)
    pending_: dict[Key, float] = field(default_factory=lambda: defaultdict(float))
    truth_: dict[Key, list[float]] = field(default_factory=dict)
    quick_: dict[Key, list[float]] = field(default_factory=dict)
    cusum_: dict[Key, list[float]] = field(default_factory=dict)
    children_: dict[Key, set[Key]] = field(default_factory=lambda: defaultdict(set))
    alarms_: list[dict[str, Any]] = field(default_factory=list)
    tripped_: dict[Key, list[float]] = field(default_factory=dict)  # [since, rate before]
    updates_: int = 0

    # ---- keys ----------------------------------------------------------------------------

    def band_of(self, local_hour: int) -> int:
        """The time band a local hour falls in."""
        return local_hour // self.config.band_hours

    @staticmethod
    def _levels(carrier: str, key: RouteKey) -> tuple[Key, Key, Key, Key]:
        return (
            (carrier,),
            (carrier, key.country),
            (carrier, key.country, key.operator),
            (carrier, key.country, key.operator, str(key.band)),
        )

    # ---- reading -------------------------------------------------------------------------

    def estimate(self, carrier: str, key: RouteKey, now: float) -> ArmEstimate:
        """Pooled Beta posterior, receipt truthfulness and mean latency for one carrier."""
        cfg = self.config
        alpha, beta = self._success(carrier, key, now)
        a, b = self._rates(
            self.truth_, [carrier], key.country, now, cfg.truth_prior_mean, cfg.truth_prior_strength
        )
        latency = self._latency(carrier, key.country)
        return ArmEstimate(
            alpha,
            beta,
            float(a[0] / (a[0] + b[0])),
            cfg.default_latency_s if latency is None else latency,
        )

    def estimates(
        self, carriers: Sequence[str], key: RouteKey, now: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Arrays (alpha, beta, truth_ratio, latency_s) over `carriers`.

        The truth ratio is a carrier's P(conversion | DELIVRD) relative to the most truthful
        carrier in the set: 1 for honest receipts, near 0 for a grey route that fakes them.
        It is taken in the carrier's favour (its upper bound against the best lower bound), the
        bounds being the Beta posterior's quantiles as far out as `truth_doubt_sd` normal sds, so
        receipts are discounted only where conversions show it clearly and the noise between
        honest carriers does not steer traffic. Quantiles, not mean ± sds: near 1 the latter
        makes a thin carrier's lucky streak (8 conversions of 8) a confident reference that
        discounts every honest carrier. Longer streaks still do (10 of 10: 1.4% against carriers
        at 85%), as the carrier and country levels hold the same conversions when a carrier
        serves one country; counting them once there slowed grey-route detection more than it
        helped (grey_route regret 78 -> 97 over seeds 1-5), so it is left as is.
        A carrier without evidence of its own is taken to be as truthful and as fast as the
        others in the set, so a new carrier is not held back before its first conversions.
        """
        cfg = self.config
        posteriors = [self._success(c, key, now) for c in carriers]
        alpha = np.fromiter((a for a, _ in posteriors), float, len(carriers))
        beta = np.fromiter((b for _, b in posteriors), float, len(carriers))
        a, b = self._rates(
            self.truth_, carriers, key.country, now, cfg.truth_prior_mean, cfg.truth_prior_strength
        )
        seen = [self._latency(c, key.country) for c in carriers]
        known = [x for x in seen if x is not None]
        usual = sum(known) / len(known) if known else cfg.default_latency_s
        latency = np.fromiter((usual if x is None else x for x in seen), float, len(carriers))
        tail = ndtr(-cfg.truth_doubt_sd)
        low, high = betaincinv(a, b, tail), betaincinv(a, b, 1.0 - tail)
        ref = low.max() if len(low) else 1.0
        ratio = np.minimum(1.0, high / ref) if ref > 0 else np.ones_like(high)
        return alpha, beta, ratio, latency

    def quick_shares(self, carriers: Sequence[str], country: str, now: float) -> np.ndarray:
        """Per carrier, the share of its failures answered inside the SLA (a rejection or an
        UNDELIV receipt rather than silence): the chance a failure still leaves time to retry."""
        cfg = self.config
        a, b = self._rates(
            self.quick_, carriers, country, now, cfg.quick_prior_mean, cfg.quick_prior_strength
        )
        return a / (a + b)

    def _success(self, carrier: str, key: RouteKey, now: float) -> tuple[float, float]:
        """Beta posterior of success within the SLA, pooled from the carrier down to the band."""
        cfg = self.config
        levels = []
        for k in self._levels(carrier, key):
            s, n = Decayed.read(self.counts_.get(k), now, cfg.half_life_seconds)
            levels.append((s, n, self.pending_.get(k, 0.0)))
        return pooled_beta(levels, cfg.prior_success, cfg.prior_strength, cfg.pool_strength)

    def _rates(
        self,
        evidence: dict[Key, list[float]],
        carriers: Sequence[str],
        country: str,
        now: float,
        prior_mean: float,
        prior_strength: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Beta posterior (α, β) of a per-carrier rate, pooled from the carrier to the country.

        Each carrier's prior is the other carriers' pooled rate (shrunk to `prior_mean`), so a
        carrier with no evidence starts where its peers are, not at a fixed guess.
        """
        half_life = self.config.half_life_seconds
        levels = [
            [(*Decayed.read(evidence.get(k), now, half_life), 0.0) for k in ((c,), (c, country))]
            for c in carriers
        ]
        total_s = sum(lv[0][0] for lv in levels)
        total_n = sum(lv[0][1] for lv in levels)
        out = np.empty((2, len(carriers)))
        for i, lv in enumerate(levels):
            s, n, _ = lv[0]
            mean = (total_s - s + prior_mean * prior_strength) / (total_n - n + prior_strength)
            out[:, i] = pooled_beta(lv, mean, prior_strength, prior_strength * 5)
        return out[0], out[1]

    def _latency(self, carrier: str, country: str) -> float | None:
        """Mean latency of the carrier's successes (into the country when known), or None."""
        for k in ((carrier, country), (carrier,)):
            c = self.counts_.get(k)
            if c is not None and c[3] > 0.5:
                return c[2] / c[3]
        return None

    # ---- learning ------------------------------------------------------------------------

    def update(self, obs: Observation) -> None:
        """Learn one final outcome."""
        cfg = self.config
        levels = self._levels(obs.carrier, obs.key)
        for i, k in enumerate(levels):
            c = self.counts_.get(k)
            if c is None:
                c = self.counts_[k] = Decayed.new(obs.at)
                if i >= 2:
                    self.children_[levels[1]].add(k)
            Decayed.add(c, obs.at, cfg.half_life_seconds, float(obs.success), obs.latency_s)
        if not obs.success:
            self._add_rate(self.quick_, obs.carrier, obs.key.country, obs.quick, obs.at)
        self.updates_ += 1

    def check_change(self, obs: Observation, decided_at: float) -> bool:
        """Feed the change detector; True if the route's success rate changed (history forgotten).

        Call it with every decision's answer at the class deadline, in decision order: by arrival
        time, successes come first (receipts are quick) and failures late (at the deadline),
        which would look like a change where there is none. The detector keeps its own
        reference rate, a discounted mean of what it was fed, for the same reason, and after an
        alarm ignores the answers of decisions made before it.
        """
        cfg = self.config
        route = (obs.carrier, obs.key.country)
        st = self.cusum_.get(route)
        if st is None:
            st = self.cusum_[route] = [0.0, 0.0, *Decayed.new(obs.at), 0.0]
        if decided_at < st[7]:
            return False
        ref = st[2:7]
        s, n = Decayed.read(ref, obs.at, cfg.half_life_seconds)
        p0 = (s + 0.5) / (n + 1.0)
        alarm = None
        if n >= cfg.cusum_min_trials:
            low = p0 * cfg.cusum_drop_ratio
            high = p0 + (1 - p0) * cfg.cusum_rise_ratio
            if p0 - low >= cfg.cusum_min_change:
                st[0] = cusum_step(st[0], float(obs.success), p0, low)
            if high - p0 >= cfg.cusum_min_change:
                st[1] = cusum_step(st[1], float(obs.success), p0, high)
            if st[0] > cfg.cusum_threshold:
                alarm = ("drop", low)
            elif st[1] > cfg.cusum_threshold:
                alarm = ("rise", high)
        if alarm is None:
            Decayed.add(ref, obs.at, cfg.half_life_seconds, float(obs.success), None)
            st[2:7] = ref
            return False
        direction, level = alarm
        if direction == "drop":
            self.tripped_[route] = [obs.at, p0]
        elif route in self.tripped_:
            # A recovery after a drop is most likely a return to the rate before it.
            level = max(level, self.tripped_.pop(route)[1])
        self._forget(route, obs.at, p0, level, direction)
        # The detector restarts armed, from the level the alarm points to.
        n0 = cfg.cusum_min_trials
        self.cusum_[route] = [0.0, 0.0, level * n0, n0, 0.0, 0.0, obs.at, obs.at]
        return True

    def probe_shares(self, carriers: Sequence[str], country: str, now: float) -> np.ndarray:
        """Circuit breaker: a route whose rate dropped keeps a probe share, decaying with time,
        so its recovery is seen soon; the share is part of π, so propensities stay exact."""
        cfg = self.config
        out = np.zeros(len(carriers))
        if not self.tripped_:
            return out
        for i, c in enumerate(carriers):
            tripped = self.tripped_.get((c, country))
            if tripped is not None:
                since = tripped[0]
                out[i] = cfg.probe_share * 0.5 ** (
                    max(0.0, now - since) / cfg.probe_half_life_seconds
                )
        return out

    def _forget(self, route: Key, at: float, p0: float, level: float, direction: str) -> None:
        """A route's success rate changed: restart its evidence (and its operators' and hours')
        at the new level with a few trials' weight, and take the old out of the carrier total."""
        cfg = self.config
        c = self.counts_.get(route)
        if c is not None:
            s0, n0 = Decayed.read(c, at, cfg.half_life_seconds)
            Decayed.restart(c, cfg.reset_keep_trials, level)
            s1, n1 = Decayed.read(c, at, cfg.half_life_seconds)
            parent = self.counts_.get(route[:1])
            if parent is not None:
                Decayed.remove(parent, at, cfg.half_life_seconds, max(0.0, s0 - s1), n0 - n1)
        for k in self.children_.get(route, ()):
            child = self.counts_.get(k)
            if child is not None:
                Decayed.restart(child, cfg.reset_keep_trials, level)
        self.alarms_.append(
            {
                "carrier": route[0],
                "country": route[1],
                "at": at,
                "direction": direction,
                "rate_before": round(p0, 4),
                "rate_after": round(level, 4),
            }
        )
        del self.alarms_[:-100]

    def add_pending(self, carrier: str, key: RouteKey, delta: float) -> None:
        """Count (+1) or uncount (−1) a message overdue for its receipt as a provisional failure."""
        for k in self._levels(carrier, key):
            v = self.pending_[k] + delta
            if v <= 1e-9:
                self.pending_.pop(k, None)
            else:
                self.pending_[k] = v

    def update_truth(self, carrier: str, country: str, converted: bool, at: float) -> None:
        """A DELIVRD receipt of a conversion-reporting tenant: did the code reach the user?"""
        self._add_rate(self.truth_, carrier, country, converted, at)

    def _add_rate(
        self, evidence: dict[Key, list[float]], carrier: str, country: str, hit: bool, at: float
    ) -> None:
        for k in ((carrier,), (carrier, country)):
            c = evidence.get(k)
            if c is None:
                c = evidence[k] = Decayed.new(at)
            Decayed.add(c, at, self.config.half_life_seconds, float(hit), None)

    # ---- persistence ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready learned state."""
        return {
            "config": asdict(self.config),
            "counts": [[list(k), v] for k, v in self.counts_.items()],
            "pending": [[list(k), v] for k, v in self.pending_.items()],
            "truth": [[list(k), v] for k, v in self.truth_.items()],
            "quick": [[list(k), v] for k, v in self.quick_.items()],
            "cusum": [[list(k), v] for k, v in self.cusum_.items()],
            "alarms": self.alarms_,
            "tripped": [[list(k), v] for k, v in self.tripped_.items()],
            "updates": self.updates_,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], config: ModelConfig | None = None) -> CarrierModel:
        """Rebuild a model from `state_dict()`; `config` (if given) replaces the saved one."""
        model = cls(config or ModelConfig(**state["config"]))
        model.counts_ = {tuple(k): list(v) for k, v in state["counts"]}
        model.pending_ = defaultdict(float, {tuple(k): v for k, v in state["pending"]})
        model.truth_ = {tuple(k): list(v) for k, v in state["truth"]}
        model.quick_ = {tuple(k): list(v) for k, v in state.get("quick", [])}
        model.cusum_ = {tuple(k): list(v) for k, v in state["cusum"]}
        model.alarms_ = list(state.get("alarms", []))
        model.tripped_ = {tuple(k): list(v) for k, v in state.get("tripped", [])}
        model.updates_ = int(state.get("updates", 0))
        for k in model.counts_:
            if len(k) >= 3:
                model.children_[k[:2]].add(k)
        return model
