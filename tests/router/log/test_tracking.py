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

from router.log.decision_log import DecisionLog, iter_segments
from router.log.tracking import ServingRun, default_artifact_location, default_tracking_uri


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


def test_a_sigkilled_server_s_segments_reach_its_run_which_ends_killed(tmp_path: Path) -> None:
    """Issue 13.2: `router serve` (MLflow on) SIGKILLed mid-traffic, restarted on its data dir:
    the segments recovered from its journals are artifacts of its own run, that run is ended
    KILLED (not left RUNNING), and `router evaluate --run-id` of it sees every decision it
    acknowledged."""
    import signal
    import threading

    import httpx

    from router.offline.evaluate_run import EvaluateOptions, run_evaluation
    from tests.conftest import start_server
    from tests.router.replicas.test_replicas import RU, at, wait_for

    data = tmp_path / "srv"
    live = start_server(data)
    decided: list[str] = []
    acked: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=live.url, timeout=10) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    resp = client.post("/v1/route", json={"to": RU, "at": at(n * 120)})
                    did = resp.json()["decision_id"]
                    decided.append(did)
                    body = {"decision_id": did, "event": "dlr", "status": "DELIVRD"}
                    answer = client.post("/v1/outcomes", json=body | {"at": at(n * 120 + 3)})
                except httpx.TransportError:
                    return
                if answer.status_code == 200 and answer.json()["recorded"] == 1:
                    acked.append(did)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    wait_for(lambda: len(acked) >= 40, timeout=60)
    live.proc.send_signal(signal.SIGKILL)  # mid-traffic: nothing rolled, all in journals
    live.proc.wait()
    stop.set()
    thread.join(timeout=30)
    live.client.close()

    uri = default_tracking_uri(data)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sms-routing-serving")
    (dead,) = client.search_runs([experiment.experiment_id])
    assert dead.info.status == "RUNNING"  # what SIGKILL leaves behind
    assert not client.list_artifacts(dead.info.run_id, "decision_log/decisions")

    again = start_server(data)
    again.stop()
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    dead_id = dead.info.run_id
    (new_id,) = set(runs) - {dead_id}
    assert runs[dead_id].info.status == "KILLED"
    assert runs[dead_id].data.tags["router.recovered_by"] == new_id
    assert runs[new_id].data.tags["router.recovered_from"] == dead_id
    assert runs[new_id].info.status == "FINISHED"
    assert not list((data / "runs").glob("*.lock"))  # clean stop: no live run left

    local = Path(client.download_artifacts(dead_id, "decision_log", str(tmp_path / "dl")))
    ids = {
        i
        for p in (local / "decisions").glob("*.parquet")
        for i in pq.read_table(p)["decision_id"].to_pylist()
    }
    outcome_ids = [
        i
        for p in (local / "outcomes").glob("*.parquet")
        for i in pq.read_table(p)["decision_id"].to_pylist()
    ]
    assert set(decided) <= ids  # every answered decision (and maybe one cut off by the kill)
    assert set(acked) <= set(outcome_ids)
    assert len(outcome_ids) == len(set(outcome_ids))
    # `router evaluate --run-id` of the dead run sees what the data folder's log holds
    frame = run_evaluation(
        EvaluateOptions(
            candidates=["uniform"], run_id=dead_id, tracking_uri=uri, out=tmp_path / "e1"
        )
    )
    on_disk = run_evaluation(
        EvaluateOptions(candidates=["uniform"], logs=data / "decision_log", out=tmp_path / "e2")
    )
    assert frame["n"].tolist() == on_disk["n"].tolist()
    assert frame["n"].iloc[0] >= len(acked) - 5  # all but the last few (not settled yet)


def test_run_locks_tell_live_runs_from_dead_ones(tmp_path: Path) -> None:
    import os

    from router.log.tracking import RunLocks

    live, dying = RunLocks(tmp_path), RunLocks(tmp_path)
    live.hold("run-live")
    dying.hold("run-dead")
    assert RunLocks(tmp_path).dead() == []  # both held
    assert dying._fd is not None
    os.close(dying._fd)  # the process dies: its lock goes, its file stays
    assert RunLocks(tmp_path).dead() == ["run-dead"]
    assert RunLocks(tmp_path).dead() == []  # claimed once
    live.release()
    assert not list(tmp_path.glob("*.lock"))
