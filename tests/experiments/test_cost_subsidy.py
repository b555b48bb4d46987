"""Cost subsidy: the objective and regrets on hand-checked instances, the papers' algorithms
finding the right arm when it is easy, the engine's `cost_subsidy` policy, and the runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from bandit.cost_subsidy import (
    ALGORITHMS,
    Instance,
    bernoulli_luck,
    cheapest_feasible,
    cost_regret,
    play,
    quality_regret,
)
from bandit.model import CarrierModel, Observation, RouteKey
from bandit.policies import Arm, DecisionContext, make_policy
from bandit.reward import MessageClass
from experiments.cost_subsidy_runner import (
    ENGINE,
    SPECS,
    EngineCostSubsidy,
    load_spec,
    markdown,
    run_cost_subsidy,
)
from experiments.world import ScenarioError

HAND = Instance("hand", np.array([0.5, 0.7, 0.9]), np.array([1.0, 2.0, 3.0]), alpha=0.25)


def test_objective_on_a_hand_checked_instance() -> None:
    # (1 − 0.25)·0.9 = 0.675: arm 0 (0.5) falls short, arm 1 (0.7) is the cheapest that passes.
    assert HAND.threshold == pytest.approx(0.675)
    assert HAND.target == 1


def test_regrets_on_a_hand_checked_sequence() -> None:
    pulls = np.array([0, 1, 2, 2, 0])
    # cost: max(c − c₁, 0) = (0, 0, 1) per pull; quality: max(0.675 − μ, 0) = (0.175, 0, 0)
    assert cost_regret(HAND, pulls).tolist() == pytest.approx([0, 0, 1, 2, 2])
    assert quality_regret(HAND, pulls).tolist() == pytest.approx([0.175, 0.175, 0.175, 0.175, 0.35])


def test_alpha_zero_is_the_best_arm_and_ties_go_to_quality() -> None:
    means = np.array([0.6, 0.95, 0.9, 0.95])
    costs = np.array([0.1, 0.9, 0.3, 0.4])
    assert cheapest_feasible(means, costs, 0.0) == 3  # both best: the cheaper one
    assert cheapest_feasible(means, costs, 0.06) == 2  # 0.9 ≥ 0.893
    assert cheapest_feasible(means, costs, 0.5) == 0
    same_cost = np.array([0.3, 0.3, 0.3, 0.3])
    assert cheapest_feasible(means, same_cost, 0.5) == 1  # equal cost: the better arm
    draws = np.array([[0.6, 0.95, 0.9, 0.95], [0.99, 0.1, 0.2, 0.3]])
    assert cheapest_feasible(draws, costs, 0.0).tolist() == [3, 0]


def test_instance_validation() -> None:
    with pytest.raises(ValueError, match="same length"):
        Instance("bad", np.array([0.5, 0.6]), np.array([1.0]), 0.1)
    with pytest.raises(ValueError, match="alpha"):
        Instance("bad", np.array([0.5, 0.6]), np.array([1.0, 2.0]), 1.0)


EASY = Instance("easy", np.array([0.2, 0.9, 0.95]), np.array([0.1, 0.3, 1.0]), alpha=0.2)


@pytest.mark.parametrize("name", [*ALGORITHMS, ENGINE])
def test_every_algorithm_finds_the_target_when_it_is_easy(name: str) -> None:
    horizon = 5000
    luck = bernoulli_luck(3, horizon, np.random.default_rng(7))
    if name == ENGINE:
        algo = EngineCostSubsidy(EASY.costs, EASY.alpha, seed=7)
    else:
        algo = ALGORITHMS[name](EASY.costs, EASY.alpha, horizon)
    pulls = play(EASY, algo, luck, np.random.default_rng(8))
    share = (pulls[-1000:] == EASY.target).mean()
    print(f"\n[{name}] target share in the last 1000 rounds: {share:.3f}")
    assert share >= 0.9
    if name != ENGINE:  # the engine's exploration floor costs a little every round
        # Sublinear: the last half adds less regret than the first.
        cost = cost_regret(EASY, pulls)
        assert cost[-1] - cost[horizon // 2] <= cost[horizon // 2]


def test_same_luck_same_pulls() -> None:
    luck = bernoulli_luck(3, 500, np.random.default_rng(1))
    runs = [
        play(EASY, ALGORITHMS["CS-TS"](EASY.costs, 0.2, 500), luck, np.random.default_rng(2))
        for _ in range(2)
    ]
    assert (runs[0] == runs[1]).all()


def test_engine_policy_is_the_cost_subsidy_objective_on_our_posterior() -> None:
    model = CarrierModel()
    key = RouteKey("DE", "o2", 2)
    truth = {"cheap": 0.80, "mid": 0.93, "dear": 0.96}
    for i in range(3000):  # plenty of evidence, all at once
        for c, p in truth.items():
            model.update(Observation(c, key, (i * 7919 % 1000) / 1000 < p, 100.0))
    arms = [Arm("cheap", 0.01), Arm("mid", 0.03), Arm("dear", 0.05)]
    ctx = DecisionContext(key, MessageClass("otp", 0.5, 60), 1, 100.0)

    def pi(subsidy: float) -> np.ndarray:
        policy = make_policy("cost_subsidy", model, seed=1, subsidy=subsidy, exploration_floor=0)
        return policy.distribution(ctx, arms).probabilities

    assert np.argmax(pi(0.0)) == 2  # α = 0: the best arm
    assert pi(0.05)[1] > 0.95  # 0.93 ≥ 0.95·0.96: the mid-priced one
    assert pi(0.5)[0] > 0.95  # almost anything passes: the cheapest
    assert pi(0.05).sum() == pytest.approx(1.0)


def _spec(tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load(load_spec().model_dump_json())
    raw.update({"horizon": 300, "seeds": 2, "checkpoints": 5, **changes})
    path = tmp_path / "cs.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_runner_logs_every_algorithm_and_writes_tables(tmp_path: Path) -> None:
    result = run_cost_subsidy(_spec(tmp_path), tmp_path / "out", console=Console(quiet=True))
    instances = [i.name for i in result.spec.instances]
    algos = set(result.table.index.get_level_values("algorithm"))
    assert {*ALGORITHMS, ENGINE} <= algos
    assert set(result.table.index.get_level_values("instance")) == set(instances)
    assert (result.table[["cost_regret", "quality_regret"]] >= 0).all().all()
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("cost-subsidy")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    cof = runs["sms_routing / COF"]
    assert {"cost_regret", "quality_regret", "cost_regret_sd"} <= set(cof.data.metrics)
    history = client.get_metric_history(cof.info.run_id, "cost_regret_curve")
    assert [m.step for m in history] == result.rounds.tolist()
    parent = runs["summary cost_subsidy_bernoulli"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {f"plots/{name}.png" for name in instances} == files
    text = "\n".join(markdown(result))
    assert all(f"### {name}" in text for name in instances)


def test_a_sweep_gets_one_table_per_regret_and_a_plot(tmp_path: Path) -> None:
    instances = [
        {"name": f"free {q}", "means": [q, 0.5], "costs": [0.0, 1.0], "alpha": 0.1}
        for q in (0.3, 0.6)
    ]
    path = _spec(tmp_path, name="sweep", instances=instances, sweep_arm=0)
    result = run_cost_subsidy(path, tmp_path / "out", console=Console(quiet=True))
    text = "\n".join(markdown(result))
    assert "### cost regret" in text and "### quality regret" in text
    assert "| 0.30 | arm 1 |" in text  # 0.3 < 0.9·0.5: only the paid arm is feasible
    assert "| 0.60 | arm 0 |" in text  # the free arm is the best and the target
    assert "(0.5% exploration floor)" in text
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("cost-subsidy")
    (parent,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'summary sweep'")
    assert "sweep.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    with pytest.raises(ScenarioError, match="sweep_arm must be an arm of every instance"):
        load_spec(_spec(tmp_path, instances=instances, sweep_arm=2))


def test_the_shipped_specs_load() -> None:
    names = {load_spec(p).name for p in SPECS}
    assert names == {"cost_subsidy_bernoulli", "cost_subsidy_two_arms"}
    sweep = load_spec(SPECS[[p.stem for p in SPECS].index("two_arm_sweep")])
    assert [sweep.swept(i) for i in sweep.instances] == pytest.approx(
        [0.30 + 0.03 * k for k in range(11)]
    )


def test_spec_errors_name_file_and_field(tmp_path: Path) -> None:
    instances = [{"name": "x", "means": [0.5, 0.6, 0.7], "costs": [1.0, 2.0], "alpha": 0.1}]
    path = _spec(tmp_path, instances=instances)
    with pytest.raises(ScenarioError, match=r"cs.yaml: instances.0: .*one entry per arm"):
        load_spec(path)
