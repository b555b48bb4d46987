"""Tests for the serving policy's MLflow run, against a real SQLite tracking store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from router.decision_log import DecisionLog, iter_segments
from router.tracking import ServingRun, default_artifact_location, default_tracking_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tracking store per module: MLflow's first SQLite migration takes a few seconds."""
    data_dir = tmp_path_factory.mktemp("mlflow")
    return {
        "tracking_uri": default_tracking_uri(data_dir),
        "artifact_location": default_artifact_location(data_dir),
    }


def serving_run(store: dict[str, str], **params: Any) -> ServingRun:
    """A serving run in the module's store."""
    return ServingRun(
        store["tracking_uri"],
        "serving-tests",
        "serve",
        params=params,
        tags={"component": "router"},
        artifact_location=store["artifact_location"],
    )


def decision(i: int) -> dict[str, Any]:
    """A minimal complete decision record."""
    return {
        "decision_id": f"d{i}",
        "at": datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
        "tenant": "acme",
        "message_class": "otp",
        "country": "DE",
        "operator": "telekom",
        "mccmnc": None,
        "local_hour": 13,
        "weekday": 2,
        "segments": 1,
        "sender_type": "alphanumeric",
        "attempt": 1,
        "parent_decision_id": None,
        "eligible": ["c1", "c2"],
        "probabilities": [0.9, 0.1],
        "scores": [0.07, 0.02],
        "carrier": "c1",
        "propensity": 0.9,
        "fallbacks": ["c2"],
        "policy": "thompson",
        "policy_version": "1",
        "price": 0.01,
        "msisdn_hmac": "ff00",
    }


def test_run_gets_params_metrics_and_segment_artifacts(
    store: dict[str, str], tmp_path: Path
) -> None:
    run = serving_run(store, policy="thompson", half_life_hours=6, notes="x" * 7000)
    log = DecisionLog(
        tmp_path, max_rows=2, on_roll=lambda stream, path: run.log_segment(path, stream)
    )
    for i in range(5):
        log.log_decision(decision(i))
    run.log_metrics({"decisions": 5, "reward_mean": 0.25}, step=1)
    run.log_metrics({"decisions": 9}, step=2, timestamp_ms=1_700_000_000_000)
    run.log_dict({"carriers": ["c1", "c2"]}, "state/carriers.json")
    log.close()
    run.close()

    client = MlflowClient(store["tracking_uri"])
    info = client.get_run(run.run_id)
    assert info.info.status == "FINISHED"
    assert info.info.experiment_id == run.experiment_id
    assert info.data.params["policy"] == "thompson"
    assert info.data.params["half_life_hours"] == "6"
    assert len(info.data.params["notes"]) == MAX_PARAM_VAL_LENGTH
    assert info.data.tags["component"] == "router"
    history = sorted(client.get_metric_history(run.run_id, "decisions"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 5.0), (2, 9.0)]
    assert history[1].timestamp == 1_700_000_000_000
    assert info.data.metrics["reward_mean"] == 0.25

    segments = list(iter_segments(tmp_path, "decisions"))
    assert len(segments) == 3
    logged = client.list_artifacts(run.run_id, "decision_log/decisions")
    assert sorted(Path(a.path).name for a in logged) == [p.name for p in segments]
    local = Path(
        client.download_artifacts(run.run_id, "decision_log/decisions", str(tmp_path / "dl"))
    )
    assert sum(pq.read_table(p).num_rows for p in local.glob("*.parquet")) == 5
    saved = client.download_artifacts(run.run_id, "state/carriers.json", str(tmp_path / "dl"))
    assert json.loads(Path(saved).read_text()) == {"carriers": ["c1", "c2"]}
    assert run.errors == 0


def test_experiment_is_reused(store: dict[str, str]) -> None:
    first, second = serving_run(store), serving_run(store)
    assert first.experiment_id == second.experiment_id
    assert first.run_id != second.run_id
    first.close()
    second.close(status="KILLED")
    client = MlflowClient(store["tracking_uri"])
    assert client.get_run(second.run_id).info.status == "KILLED"


def test_mlflow_failure_is_counted_not_raised(store: dict[str, str], tmp_path: Path) -> None:
    run = serving_run(store)
    run.log_segment(tmp_path / "no-such-segment.parquet", "decisions")
    run.log_metrics({"bad": "not a number"}, step=1)  # type: ignore[dict-item]
    assert run.flush()
    assert run.errors == 2
    run.close()
    assert MlflowClient(store["tracking_uri"]).get_run(run.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("uri", ["bogus://nowhere", "sqlite:///{file}/under/a/file.db"])
def test_bad_tracking_uri_does_not_raise(uri: str, tmp_path: Path) -> None:
    plain_file = tmp_path / "file"
    plain_file.write_text("not a folder")
    run = ServingRun(uri.format(file=plain_file), "serving-tests", "serve", params={"a": 1})
    assert run.run_id is None and run.experiment_id is None
    run.log_segment(plain_file, "decisions")
    run.log_metrics({"decisions": 1}, step=1)
    run.log_dict({"a": 1}, "a.json")
    assert run.flush()
    run.close()
    assert run.errors == 5  # the start, three calls and the close


def test_close_is_idempotent_and_later_calls_are_dropped(store: dict[str, str]) -> None:
    run = serving_run(store)
    with pytest.raises(ValueError, match="FINISHED"):
        run.close(status="DONE")
    run.close()
    run.close()
    run.log_metrics({"late": 1.0}, step=1)
    assert run.flush(timeout=1)
    assert "late" not in MlflowClient(store["tracking_uri"]).get_run(run.run_id).data.metrics


def test_default_locations(tmp_path: Path) -> None:
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_artifact_location(tmp_path) == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert default_artifact_location(tmp_path).startswith("file:///")
