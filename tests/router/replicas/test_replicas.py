"""Replicas on one Redis learn as one: real `router serve` processes and a real redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import T0, LiveServer, launch_server, start_server, wait_ready
from tests.redis_server import ExternalRedis, LocalCluster, RedisServer

RU = "+79031234567"


def replica_args(redis_url: str, *extra: str) -> tuple[str, ...]:
    """`router serve` options of a replica on the test Redis (fast checkpoints, no MLflow; API
    keys off: these tests are about shared learning, tenants have tests of their own)."""
    return (
        "--redis-url",
        redis_url,
        "--no-mlflow",
        "--checkpoint-seconds",
        "2",
        "--auth",
        "off",
        *extra,
    )


def at(seconds: float) -> str:
    """T0 plus some seconds, RFC 3339."""
    return (datetime.fromisoformat(T0) + timedelta(seconds=seconds)).isoformat()


def route(server: LiveServer, n: int = 1, t: float = 0.0) -> list[dict]:
    """Route n messages to RU at T0 + t; every answer must be a decision."""
    body = [{"to": RU, "at": at(t)} for _ in range(n)]
    resp = server.client.post("/v1/route/batch", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert all("decision_id" in d for d in out), out
    return out


def delivered(server: LiveServer, decisions: list[dict], t: float = 5.0) -> dict:
    """Report a DELIVRD receipt for each decision, 5 s after it (within the SLA)."""
    body = [
        {"decision_id": d["decision_id"], "event": "dlr", "status": "DELIVRD", "at": at(t)}
        for d in decisions
    ]
    resp = server.client.post("/v1/outcomes", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """Sum of a Prometheus series (samples matching the labels) on one replica."""
    text = server.client.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def learned(server: LiveServer) -> float:
    """How many final answers this replica's learner has taken."""
    return metric(server, "router_learner_updates_total")


def wait_for(check: callable, timeout: float = 10.0) -> float:
    """Poll until check() is true; returns the seconds it took (fails on timeout)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)
    return time.monotonic() - t0


def evidence(server: LiveServer) -> dict[str, float]:
    """Per carrier, the evidence behind its RU estimate."""
    body = server.client.get("/v1/carriers", params={"country": "RU"}).json()
    return {c["id"]: c["countries"]["RU"]["evidence"] for c in body["carriers"] if c["countries"]}


@pytest.fixture(scope="module")
def pair(
    shared_redis: RedisServer | ExternalRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two replicas (own data folders, as on two hosts) sharing one Redis; the tests below
    count what they add (deltas), at event times of their own."""
    a = launch_server(tmp_path_factory.mktemp("a"), *replica_args(shared_redis.url))
    b = launch_server(tmp_path_factory.mktemp("b"), *replica_args(shared_redis.url))
    wait_ready(a)
    wait_ready(b)
    yield a, b
    for s in (a, b):
        s.stop()


def test_outcomes_posted_to_one_replica_move_the_other(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    base_a, base_b, before = learned(a), learned(b), evidence(b)
    lag_before = metric(b, "router_replication_lag_seconds_count")
    decisions = route(a, 60, t=0)
    assert delivered(a, decisions, t=5)["recorded"] == 60
    lag = wait_for(lambda: learned(b) == base_b + 60)
    assert learned(a) == base_a + 60
    after = evidence(b)
    gained = {c: after[c] - before[c] for c in after}
    assert all(gained[d["carrier"]] > 0 for d in decisions), gained  # B saw A's evidence
    assert evidence(a) == pytest.approx(after, abs=0.2)
    print(f"replication lag (outcomes on A -> learned on B, 60 events): {lag * 1000:.0f} ms")
    assert metric(b, "router_replication_lag_seconds_count") - lag_before == 120


def test_an_outcome_posted_to_both_replicas_is_applied_once(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    base = learned(a), learned(b)
    counted = metric(a, "router_outcomes_total") + metric(b, "router_outcomes_total")
    decisions = route(a, 5, t=20)
    first = delivered(a, decisions, t=25)
    second = delivered(b, decisions, t=25)
    assert first["recorded"] == 5 and second["duplicates"] == 5
    wait_for(lambda: learned(b) == base[1] + 5)
    time.sleep(0.3)  # anything applied twice would show by now
    assert (learned(a), learned(b)) == (base[0] + 5, base[1] + 5)
    both = metric(a, "router_outcomes_total") + metric(b, "router_outcomes_total")
    assert both - counted == 5  # counted once, by the replica that accepted it


def test_both_replicas_post_the_same_outcome_at_once(pair: tuple[LiveServer, LiveServer]) -> None:
    """The race: both accept before either has read the other's event; one wins everywhere."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = pair
    base = learned(a), learned(b)
    adopted = metric(a, "router_replicated_events_total", kind="decision")
    decisions = route(b, 30, t=40)
    wait_for(lambda: metric(a, "router_replicated_events_total", kind="decision") >= adopted + 30)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda s: delivered(s, decisions, t=45), (a, b)))
    assert sum(x["recorded"] for x in answers) == 30
    assert sum(x["duplicates"] for x in answers) == 30
    wait_for(lambda: (learned(a), learned(b)) == (base[0] + 30, base[1] + 30))
    time.sleep(0.3)
    assert (learned(a), learned(b)) == (base[0] + 30, base[1] + 30)


def test_an_outcome_for_a_decision_made_elsewhere_is_accepted(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    base = learned(a)
    for k in range(20):  # at once: B may not have read A's decision yet
        d = route(a, t=60 + k)[0]
        assert delivered(b, [d], t=65 + k)["recorded"] == 1
    wait_for(lambda: learned(a) == base + 20)
    got = b.client.get(f"/v1/decisions/{d['decision_id']}").json()
    assert got["carrier"] == d["carrier"] and got["state"]["final_status"] == "DELIVRD"
    unknown = b.client.post(
        "/v1/outcomes", json={"decision_id": "f" * 32, "event": "dlr", "status": "DELIVRD"}
    )
    assert unknown.status_code == 404


def test_a_new_replica_starts_from_the_checkpoint_and_the_stream(
    pair: tuple[LiveServer, LiveServer],
    shared_redis: RedisServer | ExternalRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    a, _ = pair
    delivered(a, route(a, 40, t=90), t=95)
    with shared_redis.client() as r:
        wait_for(lambda: r.exists("router:checkpoint") == 1, timeout=15)
    delivered(a, route(a, 10, t=100), t=105)  # maybe after the checkpoint: in the stream tail
    c = launch_server(tmp_path_factory.mktemp("c"), *replica_args(shared_redis.url))
    try:
        wait_ready(c)
        mine, theirs = (s.client.get("/healthz").json()["shared"] for s in (c, a))
        assert mine["redis"] == "up" and mine["replica"] != theirs["replica"]
        assert mine["learned"] == theirs["learned"]  # from checkpoint + tail, nothing missed
        assert evidence(c) == pytest.approx(evidence(a), abs=0.2)
    finally:
        c.stop()


def test_workers_of_one_server_serve_and_learn_as_one(
    redis_server: RedisServer | ExternalRedis, tmp_path_factory: pytest.TempPathFactory
) -> None:
    live = launch_server(
        tmp_path_factory.mktemp("workers"), *replica_args(redis_server.url, "--workers", "2")
    )
    try:
        wait_ready(live)
        seen: dict[str, int] = {}

        def look() -> bool:
            with httpx.Client(base_url=live.url, timeout=10) as fresh:  # a new connection
                shared = fresh.get("/healthz").json()["shared"]
            seen[shared["replica"]] = shared["learned"]
            return len(seen) == 2

        wait_for(look, timeout=30)  # both workers answer
        for _ in range(10):  # decisions and outcomes spread over both workers
            with httpx.Client(base_url=live.url, timeout=10) as fresh:
                decisions = fresh.post("/v1/route/batch", json=[{"to": RU, "at": at(0)}] * 4)
                decisions = decisions.json()
            with httpx.Client(base_url=live.url, timeout=10) as fresh:
                body = [
                    {"decision_id": d["decision_id"], "event": "dlr", "status": "DELIVRD"}
                    | {"at": at(5)}
                    for d in decisions
                ]
                assert fresh.post("/v1/outcomes", json=body).json()["recorded"] == 4
        seen.clear()
        wait_for(lambda: look() and set(seen.values()) == {40}, timeout=30)
    finally:
        live.stop()
    # Both workers logged into one folder; a clean stop leaves only segments, which all read.
    log_dir = live.data_dir / "decision_log"
    assert not list(log_dir.rglob("open-*.jsonl"))
    tables = [pq.read_table(p) for p in (log_dir / "decisions").glob("*.parquet")]
    assert sum(t.num_rows for t in tables) == 40


def test_workers_without_redis_are_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--workers",
            "2",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode != 0
    assert "--workers > 1 needs shared state" in done.stderr


def test_a_pause_on_one_replica_pauses_the_carrier_on_all(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair

    def paused(server: LiveServer) -> bool:
        body = server.client.get("/v1/carriers").json()
        return next(c["paused"] for c in body["carriers"] if c["id"] == "rulocal")

    assert a.client.post("/v1/carriers/rulocal/pause", json={"reason": "drill"}).status_code == 200
    wait_for(lambda: paused(b))
    assert all(d["carrier"] != "rulocal" for d in route(b, 20, t=120))
    assert b.client.post("/v1/carriers/rulocal/resume").status_code == 200
    wait_for(lambda: not paused(a))


def test_replicas_learn_as_one_on_a_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    args = replica_args(cluster.url, "--redis-cluster")
    a = launch_server(tmp_path_factory.mktemp("ca"), *args)
    b = launch_server(tmp_path_factory.mktemp("cb"), *args)
    try:
        wait_ready(a)
        wait_ready(b)
        decisions = route(a, 30)
        assert delivered(b, decisions)["recorded"] == 30  # A's decisions, B's outcomes
        wait_for(lambda: learned(a) == 30 and learned(b) == 30)
        assert evidence(a) == pytest.approx(evidence(b), abs=0.2)
    finally:
        for s in (a, b):
            s.stop()
        cluster.kill()


def test_an_outcome_posted_to_two_replicas_while_redis_is_away_is_logged_once(
    redis_server: RedisServer | ExternalRedis, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 13.1: with Redis away, the same receipt posted to both replicas is `recorded` by
    each (neither can ask the other), yet once Redis returns it is in the decision logs once,
    in spend and outcome counters once (summed over the replicas), in MLflow artifacts once,
    and `router report cost` / `router evaluate` read it once. A second final receipt with
    another status (UNDELIV on B, DELIVRD on A) is the same outcome: one of them, Redis's."""
    import shutil

    from mlflow.tracking import MlflowClient

    from router.log.decision_log import DECISIONS, OUTCOMES
    from router.log.tracking import default_tracking_uri
    from router.offline.cost_report import build_report

    if isinstance(redis_server, ExternalRedis):
        pytest.skip("needs a private redis-server it can stop")
    args = ("--redis-url", redis_server.url, "--checkpoint-seconds", "2", "--auth", "off")
    a = launch_server(tmp_path_factory.mktemp("oa"), *args)  # MLflow on: artifacts counted
    b = launch_server(tmp_path_factory.mktemp("ob"), *args)
    try:
        wait_ready(a)
        wait_ready(b)
        base = {s.url: metric(s, "router_outcomes_total") for s in (a, b)}
        made = route(a, 10, t=0)  # made by A, known by both before Redis goes
        wait_for(lambda: metric(b, "router_replicated_events_total", kind="decision") >= 10)
        redis_server.kill()
        wait_for(
            lambda: all(s.client.get("/healthz").json()["status"] == "degraded" for s in (a, b)),
            timeout=15,
        )
        own = route(b, 5, t=30)  # made by B while Redis is away: reported to B only

        def post(server: LiveServer, ds: list[dict], status: str, t: float) -> dict:
            body = [
                {"decision_id": d["decision_id"], "event": "dlr", "status": status, "at": at(t)}
                | {"cost": 0.05, "currency": "EUR"}
                for d in ds
            ]
            resp = server.client.post("/v1/outcomes", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()

        assert post(a, made, "DELIVRD", 5)["recorded"] == 10
        assert post(b, made[:5], "DELIVRD", 5)["recorded"] == 5  # the very same receipt
        assert post(b, made[5:], "UNDELIV", 6)["recorded"] == 5  # another final receipt
        assert post(b, own, "DELIVRD", 35)["recorded"] == 5
        assert post(b, own, "DELIVRD", 35)["duplicates"] == 5  # a repeat on one replica
        # Nothing logged or counted yet: the rows wait in the outbox for Redis's verdict.
        assert metric(a, "router_spend_total") + metric(b, "router_spend_total") == 0

        redis_server.start()
        wait_for(
            lambda: all(
                (h := s.client.get("/healthz").json())["status"] == "ok"
                and h["shared"]["outbox"] == 0
                for s in (a, b)
            ),
            timeout=30,
        )
        wait_for(lambda: learned(a) == learned(b) == 15, timeout=15)
        spend = metric(a, "router_spend_total") + metric(b, "router_spend_total")
        assert spend == pytest.approx(15 * 0.05)
        counted = sum(metric(s, "router_outcomes_total") - base[s.url] for s in (a, b))
        assert counted == 15
        repeats = sum(
            metric(s, "router_published_total", kind="o", result="repeat") for s in (a, b)
        )
        assert repeats == 10  # B's copies of A's decisions' receipts lost in Redis
    finally:
        for s in (a, b):
            s.stop()

    # Every outcome once in the two replicas' segments, and in their MLflow artifacts.
    rows = [
        row
        for s in (a, b)
        for p in (s.data_dir / "decision_log" / OUTCOMES).glob("*.parquet")
        for row in pq.read_table(p).to_pylist()
    ]
    ids = [r["decision_id"] for r in rows]
    assert sorted(ids) == sorted(d["decision_id"] for d in made + own)
    assert sum(r["cost"] for r in rows) == pytest.approx(15 * 0.05)
    artifacts = 0
    for s in (a, b):
        client = MlflowClient(default_tracking_uri(s.data_dir))
        exp = client.get_experiment_by_name("sms-routing-serving")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.data.metrics["spend"] >= 0
        local = Path(
            client.download_artifacts(run.info.run_id, "decision_log", str(s.data_dir / "dl"))
        )
        artifacts += sum(pq.read_table(p).num_rows for p in (local / OUTCOMES).glob("*.parquet"))
    assert artifacts == 15

    # Finance gathers both replicas' segments in one folder: spend once, one status each.
    both = tmp_path_factory.mktemp("both")
    for stream in (DECISIONS, OUTCOMES):
        (both / stream).mkdir()
        for s in (a, b):
            for p in (s.data_dir / "decision_log" / stream).glob("*.parquet"):
                shutil.copy(p, both / stream / f"{s.data_dir.name}-{p.name}")
    report = build_report(both)
    assert report.totals["messages"] == 15
    assert report.totals["spend"] == pytest.approx(15 * 0.05)
    assert (report.view["n_events"] == 1).all()


def test_outcomes_acked_while_redis_was_away_by_a_replica_then_killed_are_logged_once(
    redis_server: RedisServer | ExternalRedis, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issues 13.1 and 13.2 together: receipts acknowledged from the outbox while Redis is
    away, the replica SIGKILLed, Redis back, the replica restarted on its folder: each outcome
    is once in the folder's segments and once in the MLflow artifacts of its runs; the killed
    run ends KILLED and holds the decisions it made."""
    import signal

    from mlflow.tracking import MlflowClient

    from router.log.decision_log import DECISIONS, OUTCOMES
    from router.log.tracking import default_tracking_uri

    if isinstance(redis_server, ExternalRedis):
        pytest.skip("needs a private redis-server it can stop")
    args = ("--redis-url", redis_server.url, "--auth", "off")
    a = start_server(tmp_path_factory.mktemp("ka"), *args)
    made = [route(a, t=120 * k)[0] for k in range(12)]  # spread: most settle for evaluate
    redis_server.kill()
    wait_for(lambda: a.client.get("/healthz").json()["status"] == "degraded", timeout=15)
    for k, d in enumerate(made):  # fsynced in the outbox only
        assert delivered(a, [d], t=120 * k + 5)["recorded"] == 1
    a.stop(signal.SIGKILL)
    redis_server.start()
    again = start_server(a.data_dir, *args)
    try:
        wait_for(lambda: again.client.get("/healthz").json()["shared"]["outbox"] == 0, 30)
        assert learned(again) == 12
    finally:
        again.stop()

    def ids(folder: Path, stream: str) -> list[str]:
        return [
            i
            for p in (folder / stream).glob("*.parquet")
            for i in pq.read_table(p)["decision_id"].to_pylist()
        ]

    want = sorted(d["decision_id"] for d in made)
    assert sorted(ids(a.data_dir / "decision_log", OUTCOMES)) == want
    assert sorted(ids(a.data_dir / "decision_log", DECISIONS)) == want
    client = MlflowClient(default_tracking_uri(a.data_dir))
    exp = client.get_experiment_by_name("sms-routing-serving")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    logged: dict[str, list[str]] = {OUTCOMES: [], DECISIONS: []}
    for run in runs:
        local = Path(
            client.download_artifacts(run.info.run_id, "decision_log", str(a.data_dir / "dl"))
        )
        for stream in logged:
            logged[stream] += ids(local, stream)
        (local.parent / "decision_log").rename(a.data_dir / f"dl-{run.info.run_id}")
    assert sorted(logged[OUTCOMES]) == want and sorted(logged[DECISIONS]) == want
    # `router evaluate --run-id` of the killed run: its decisions, and their outcomes logged
    # by the run that recovered it, as the data folder holds them
    from router.offline.evaluate_run import EvaluateOptions, run_evaluation

    (killed,) = [r.info.run_id for r in runs if r.info.status == "KILLED"]
    common = {"candidates": ["uniform"], "bootstrap": 0}
    by_run = run_evaluation(
        EvaluateOptions(
            run_id=killed,
            tracking_uri=default_tracking_uri(a.data_dir),
            out=a.data_dir / "e1",
            **common,
        )
    )
    on_disk = run_evaluation(
        EvaluateOptions(logs=a.data_dir / "decision_log", out=a.data_dir / "e2", **common)
    )
    numbers = by_run.select_dtypes("number").columns
    assert by_run["n"].iloc[0] >= 9
    pd.testing.assert_frame_equal(by_run[numbers], on_disk[numbers])
