"""`router evaluate` end to end: simulated logs in, a table and an MLflow run out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from carriers.catalog import load_catalog
from router.cli import main
from tests.bandit.test_ope import simulate, true_value


def test_evaluate_cli_logs_estimates_to_mlflow(tmp_path: Path) -> None:
    catalog = load_catalog()
    logs = tmp_path / "uniform"
    simulate(catalog, "uniform", 4, logs)
    truth_dir = tmp_path / "static"
    classes = simulate(catalog, "static", 4, truth_dir)
    truth = true_value(catalog, truth_dir, classes)
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--logs",
            str(logs),
            "--candidate",
            "static",
            "--candidate",
            "epsilon_greedy,epsilon=0.2",
            "--bootstrap",
            "50",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sms-routing-evaluation")
    (run,) = client.search_runs([exp.experiment_id])
    metrics = run.data.metrics
    assert metrics["static.dr.ci_low"] <= truth <= metrics["static.dr.ci_high"]
    assert metrics["epsilon_greedy_epsilon_0.2.snips.ess"] > 0
    rid = run.info.run_id
    names = {a.path for a in client.list_artifacts(rid)}
    assert names == {"estimates.csv", "estimates.png", "weights.csv", "weights.png"}
    for png in ("estimates.png", "weights.png"):
        assert Path(client.download_artifacts(rid, png, str(tmp_path))).read_bytes()[:4] == (
            b"\x89PNG"
        )
    weights = pd.read_csv(client.download_artifacts(rid, "weights.csv", str(tmp_path)))
    assert set(weights["candidate"]) == {"static", "epsilon_greedy,epsilon=0.2"}
    for name, g in weights.groupby("candidate"):
        # Every decision's weight is in one bin (w = 0 apart), and the ESS is the run's.
        assert g["share"].sum() + g["zero_share"].iloc[0] == pytest.approx(1.0)
        key = name.replace(",", "_").replace("=", "_")
        assert g["ess"].iloc[0] == pytest.approx(metrics[f"{key}.ips.ess"])
        assert g["ccdf"].is_monotonic_decreasing
    static = weights[weights["candidate"] == "static"]
    # static is deterministic and the log uniform over 2-5 carriers: w ∈ {0, 2, ..., 5}.
    nonzero = static[static["share"] > 0]
    assert nonzero["w_low"].min() >= 1.9 and nonzero["w_high"].max() <= 5.2
    assert 0.3 < static["zero_share"].iloc[0] < 0.9


def test_evaluate_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--logs", str(tmp_path), "--candidate", "uniform"]) == 2
    assert "no decisions/ folder" in capsys.readouterr().err
    assert main(["evaluate", "--logs", str(tmp_path), "--candidate", "bogus"]) == 2
    assert "unknown candidate 'bogus'" in capsys.readouterr().err
