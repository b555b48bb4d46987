"""`router evaluate` end to end: simulated logs in, a table and an MLflow run out."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from test_ope import simulate, true_value

from carriers.catalog import load_catalog
from router.cli import main


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
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"estimates.csv", "estimates.png"}


def test_evaluate_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--logs", str(tmp_path), "--candidate", "uniform"]) == 2
    assert "no decisions/ folder" in capsys.readouterr().err
    assert main(["evaluate", "--logs", str(tmp_path), "--candidate", "bogus"]) == 2
    assert "unknown candidate 'bogus'" in capsys.readouterr().err
