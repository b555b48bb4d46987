"""Peer libraries (MABWiser, pybandits, Vowpal Wabbit) play through the experiment runner like
our policies: deterministic, honest propensities, fed only when the engine learns, in MLflow."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from carriers.catalog import Catalog, load_catalog
from experiments import peers as peers_module
from experiments.peers import PEERS, missing_library
from experiments.runner import (
    _playable,
    mean_over_seeds,
    parse_policies,
    play_policy,
    run_experiment,
    verdict,
)
from experiments.world import ScenarioSpec, World
from router.core.config import load_config
from router.log.decision_log import DECISION_SCHEMA, DECISIONS, read_stream

NOT_INSTALLED = [p.library for p in PEERS.values() if importlib.util.find_spec(p.library) is None]
pytestmark = pytest.mark.skipif(
    bool(NOT_INSTALLED),
    reason=f"peer libraries {NOT_INSTALLED} not installed: pip install -e '.[peers]'",
)

SMALL: dict[str, Any] = {
    "name": "peers-small",
    "seed": 4,
    "start": "2026-11-02T09:00:00Z",
    "duration_minutes": 8,
    "traffic": {
        "rate_per_second": 1.5,
        "diurnal_amplitude": 0.0,
        "countries": {"DE": 0.6, "RU": 0.4},
        "tenants": {"acme": 0.5, "default": 0.5},
        "classes": {"otp": 0.8, "transactional": 0.2},
    },
    "defaults": {"deliver": 0.8, "latency_median_s": 8, "no_dlr": 0.1},
    "routes": {
        "globalprime": {"*": {"deliver": 0.97, "latency_median_s": 4}},
        "budgetroute": {"*": {"deliver": 0.5, "latency_median_s": 20}},
    },
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The example catalog."""
    return load_catalog()


@pytest.fixture(scope="module")
def world(catalog: Catalog) -> World:
    """The small two-country world every peer plays."""
    return World(ScenarioSpec.model_validate(SMALL), catalog)


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_plays_deterministically_with_exact_propensities(
    world: World, tmp_path: Path, peer: str
) -> None:
    a = play_policy(peer, world, load_config(), 3, tmp_path / "a")
    b = play_policy(peer, world, load_config(), 3, tmp_path / "b")
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.metrics == b.metrics
    assert a.metrics["attempts"] > 500 and a.metrics["unrouted"] == 0
    decisions = read_stream(a.log_dir, DECISIONS, DECISION_SCHEMA).to_pandas()
    assert set(decisions["policy"]) == {peer}
    for row in decisions.itertuples():
        probs = np.asarray(row.probabilities)
        assert probs.sum() == pytest.approx(1.0)
        assert row.propensity == pytest.approx(probs[list(row.eligible).index(row.carrier)])
        assert row.propensity > 0
    # It learned: the good route gets most of the traffic in the second half.
    late = a.frame[a.frame["at"] > world.start + 240]
    print(f"\n[{peer}] late share of globalprime {(late['carrier'] == 'globalprime').mean():.2f}")
    assert (late["carrier"] == "globalprime").mean() > 0.6


def test_peers_learn_only_when_the_engine_does(world: World, tmp_path: Path) -> None:
    """Every answer reaches the peer at the event time it is known: a success once its receipt
    has arrived, a silent failure at the class deadline, never earlier."""
    seen: list[tuple[str, bool, float]] = []
    original = peers_module.PeerEngine._learn

    def spy(self, flight, success, at, latency):  # records, then runs the real code
        if not flight.learner_done:
            seen.append((flight.decision_id, success, at))
        original(self, flight, success, at, latency)

    peers_module.PeerEngine._learn = spy
    try:
        run = play_policy("vw_cb_adf", world, load_config(), 3, tmp_path)
    finally:
        peers_module.PeerEngine._learn = original
    frame = run.frame.assign(first_at=run.frame.groupby("index")["at"].transform("min"))
    frame = frame.set_index("decision_id")
    classes = load_config().message_classes
    assert len(seen) == len(frame)
    for did, success, at in seen:
        row = frame.loc[did]
        waited = at - row["at"]
        if success:  # the receipt came after the delivery (a retry's latency counts from the
            assert waited >= row["latency_s"] - (row["at"] - row["first_at"])  # first send)
        elif row["receipt"] is None:
            assert waited >= classes[row["message_class"]].learner_deadline_seconds - 1e-6
        assert waited > 0


def test_runner_logs_peers_to_mlflow(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "duration_minutes": 5}), encoding="utf-8")
    names = parse_policies("thompson,mabwiser_ts,pybandits_cc,vw_cb_adf")
    result = run_experiment(path, names, seed=2, out=tmp_path / "out")
    assert list(result.summary.index) == ["oracle", *names]
    assert result.summary["utility"].notna().all()
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("sim-peers-small")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(names) <= set(runs)
    vw = runs["vw_cb_adf"]
    assert vw.data.params["param.exploration"] == "--epsilon 0.05"
    assert "regret_pct" in vw.data.metrics
    artifacts = {a.path for a in client.list_artifacts(vw.info.run_id)}
    assert {"plots", "decision_log"} <= artifacts


def test_missing_library_is_skipped_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        peers_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pybandits" else real(name, *a),
    )
    reason = missing_library("pybandits_cc")
    assert reason is not None and "pybandits" in reason and ".[peers]" in reason
    from rich.console import Console

    console = Console(record=True, width=200)
    assert _playable(["thompson", "pybandits_cc", "vw_cb_adf"], console) == [
        "thompson",
        "vw_cb_adf",
    ]
    text = console.export_text()
    assert "skipping peer 'pybandits_cc'" in text
    assert "pip install -e '.[peers]'" in text


def test_seed_tables_merge_and_the_verdict_names_who_wins() -> None:
    def table(thompson: float, static: float, reaction: float) -> pd.DataFrame:
        rows = {
            "oracle": {"utility": 10.0, "regret_pct": 0.0, "outage_reaction_s": 1.0},
            "thompson": {
                "utility": thompson,
                "regret_pct": 100 - 10 * thompson,
                "outage_reaction_s": reaction,
            },
            "static": {
                "utility": static,
                "regret_pct": 100 - 10 * static,
                "outage_reaction_s": 5.0,
            },
        }
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("policy")

    merged = mean_over_seeds([table(9.0, 8.0, 30.0), table(7.0, 9.0, 90.0)])
    assert list(merged.index) == ["oracle", "thompson", "static"]
    assert merged.loc["thompson", "utility"] == pytest.approx(8.0)
    assert merged.loc["static", "utility"] == pytest.approx(8.5)
    assert merged.loc["thompson", "outage_reaction_s"] == 90.0  # the slowest seed
    assert merged.loc["thompson", "utility_sd"] == pytest.approx(np.std([9.0, 7.0], ddof=1))
    assert verdict(merged) == "`thompson` is beaten on utility by: static (+0.5)."
    assert verdict(table(9.0, 8.0, 30.0)).startswith("`thompson` has the highest utility")
    # With the seeds' tables: the paired standard error of static − thompson (+1, −2, +3).
    seeds = [table(9.0, 10.0, 30.0), table(9.0, 7.0, 30.0), table(7.0, 10.0, 30.0)]
    merged = mean_over_seeds(seeds)
    se = np.std([1.0, -2.0, 3.0], ddof=1) / np.sqrt(3)
    assert verdict(merged, seeds=seeds) == (
        f"`thompson` is beaten on utility by: static (+0.6667 ± {se:,.2g} paired se over 3 "
        "seeds, within noise)."
    )
    # The luck-free regret is compared when the runs have it.
    merged["expected_regret_pct"] = [0.0, 1.5, 2.5]
    assert verdict(merged).endswith("Its luck-free regret (1.5%) is the lowest of all policies.")
    merged["expected_regret_pct"] = [0.0, 1.5, 0.5]
    assert verdict(merged).endswith("Its luck-free regret (1.5%) is above that of: static (0.5%).")
