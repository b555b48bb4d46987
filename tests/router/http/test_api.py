"""The HTTP API over a real `router serve` process on loopback: contract, learning, restart."""

from __future__ import annotations

import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import T0, LiveServer, start_server

RU = "+79031234567"  # Beeline by prefix
DE = "+4915112345678"


def _route(server: LiveServer, **body: object) -> dict:
    resp = server.client.post("/v1/route", json={"to": RU, "at": T0, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _outcome(server: LiveServer, body: object, status: int = 200) -> dict:
    resp = server.client.post("/v1/outcomes", json=body)
    assert resp.status_code == status, resp.text
    return resp.json()


def test_route_answers_the_contract(server: LiveServer) -> None:
    d = _route(server, tenant="acme", message_class="otp", mccmnc="25099")
    assert set(d) == {
        "decision_id",
        "carrier",
        "fallbacks",
        "propensity",
        "policy",
        "context",
        "at",
    }
    assert d["context"] == {
        "country": "RU",
        "operator": "beeline",
        "local_hour": 13,
        "weekday": 0,
        "mccmnc": "25099",
    }
    assert d["policy"].startswith("thompson@")
    assert 0 < d["propensity"] <= 1
    assert d["carrier"] not in d["fallbacks"]
    # RU/beeline is covered by every carrier with RU coverage and alphanumeric senders.
    assert sorted([d["carrier"], *d["fallbacks"]]) == [
        "asiahub",
        "budgetroute",
        "eurodirect",
        "globalprime",
        "rulocal",
    ]


def test_decision_explains_itself_and_keeps_no_number(server: LiveServer) -> None:
    d = _route(server, tenant="default")
    rec = server.client.get(f"/v1/decisions/{d['decision_id']}").json()
    assert rec["carrier"] == d["carrier"]
    assert abs(sum(rec["probabilities"]) - 1) < 1e-9
    assert rec["propensity"] == rec["probabilities"][rec["eligible"].index(rec["carrier"])]
    assert {w["carrier"] for w in rec["why"]} == set(rec["eligible"])
    assert len(rec["msisdn_hmac"]) == 32
    assert RU.lstrip("+") not in server.client.get(f"/v1/decisions/{d['decision_id']}").text
    assert rec["state"]["open"] is True and rec["state"]["learner_done"] is False


def test_batch_answers_in_order_with_per_item_errors(server: LiveServer) -> None:
    body = [{"to": RU, "at": T0}, {"to": "+7903", "at": T0}, {"to": DE, "at": T0}]
    resp = server.client.post("/v1/route/batch", json=body)
    assert resp.status_code == 200
    out = resp.json()
    assert len(out) == 3
    assert out[0]["context"]["country"] == "RU" and out[2]["context"]["country"] == "DE"
    assert out[1]["error"]["field"] == "to"


def test_outcomes_are_idempotent_and_learned(server: LiveServer) -> None:
    d = _route(server, tenant="acme")
    did = d["decision_id"]
    first = _outcome(
        server,
        [
            {"decision_id": did, "event": "submit", "at": "2026-11-02T10:00:00.200000+00:00"},
            {"decision_id": did, "event": "dlr", "status": "ENROUTE", "at": "2026-11-02T10:00:01Z"},
            {"decision_id": did, "event": "dlr", "status": "DELIVRD", "at": "2026-11-02T10:00:04Z"},
        ],
    )
    assert first["results"] == ["recorded", "recorded", "recorded"]
    again = _outcome(
        server,
        {"decision_id": did, "event": "dlr", "status": "DELIVRD", "at": "2026-11-02T10:00:05Z"},
    )
    assert again == {"recorded": 0, "duplicates": 1, "late": 0, "results": ["duplicate"]}
    rec = server.client.get(f"/v1/decisions/{did}").json()
    assert rec["state"]["learner_done"] is True and rec["state"]["learner_success"] is True
    assert [o["status"] for o in rec["outcomes"]] == ["ACCEPTED", "ENROUTE", "DELIVRD"]
    delivered = next(o for o in rec["outcomes"] if o["status"] == "DELIVRD")
    assert delivered["latency_ms"] == 4000


def test_a_list_with_an_unknown_decision_applies_nothing(server: LiveServer) -> None:
    d = _route(server)
    body = [
        {"decision_id": d["decision_id"], "event": "submit", "at": T0},
        {"decision_id": "doesnotexist", "event": "dlr", "status": "DELIVRD", "at": T0},
    ]
    err = _outcome(server, body, status=404)["error"]
    assert err["code"] == "unknown_decision" and err["field"] == "[1].decision_id"
    assert server.client.get(f"/v1/decisions/{d['decision_id']}").json()["outcomes"] == []


def test_pause_and_resume_change_eligibility(server: LiveServer) -> None:
    assert (
        server.client.post("/v1/carriers/rulocal/pause", json={"reason": "maintenance"}).status_code
        == 200
    )
    carriers = {c["id"]: c for c in server.client.get("/v1/carriers").json()["carriers"]}
    assert carriers["rulocal"]["paused"] and carriers["rulocal"]["pause_reason"] == "maintenance"
    for _ in range(30):
        d = _route(server)
        assert "rulocal" not in (d["carrier"], *d["fallbacks"])
    assert server.client.post("/v1/carriers/rulocal/resume").status_code == 200
    d = _route(server)
    assert "rulocal" in (d["carrier"], *d["fallbacks"])


def test_no_eligible_carrier_says_why(server: LiveServer) -> None:
    body = {
        "to": RU,
        "tenant": "initech",
        "at": T0,
        "sender_type": "shortcode",
        "exclude": ["globalprime"],
    }
    resp = server.client.post("/v1/route", json=body)
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["code"] == "no_eligible_carrier"
    assert err["details"]["reasons"] == {
        "globalprime": "excluded by the request",
        "eurodirect": "sender type shortcode not supported",
        "asiahub": "sender type shortcode not supported",
        "afrilink": "no coverage for RU",
        "latamobile": "no coverage for RU",
        "rulocal": "sender type shortcode not supported",
        "budgetroute": "tenant initech may not use this carrier",
    }
    assert "budgetroute: tenant initech may not use this carrier" in err["message"]


def test_carriers_health_and_metrics(server: LiveServer) -> None:
    body = server.client.get("/v1/carriers", params={"country": "RU"}).json()
    assert body["catalog_version"] == "2026-11-01"
    by_id = {c["id"]: c for c in body["carriers"]}
    assert len(by_id) == 7 and set(by_id["globalprime"]["countries"]) == {"RU"}
    assert 0 < by_id["globalprime"]["countries"]["RU"]["success_estimate"] < 1
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok" and health["policy"].startswith("thompson@")
    metrics = server.client.get("/metrics").text
    assert "router_decisions_total{" in metrics and 'country="RU"' in metrics
    assert "router_pending_decisions" in metrics
    assert RU.lstrip("+") not in metrics
    assert server.client.get("/openapi.json").json()["paths"]["/v1/route"]["post"]


def _decisions(data_dir: Path) -> int:
    folder = data_dir / "decision_log" / "decisions"
    return sum(pq.read_table(p).num_rows for p in folder.glob("*.parquet"))


def test_restart_keeps_learned_state_pending_decisions_and_logs(tmp_path: Path) -> None:
    live = start_server(tmp_path / "data")
    d1 = _route(live, tenant="acme")
    learned = _route(live, tenant="acme")
    _outcome(
        live,
        {
            "decision_id": learned["decision_id"],
            "event": "dlr",
            "status": "DELIVRD",
            "at": "2026-11-02T10:00:03Z",
        },
    )
    before = live.client.get("/v1/carriers", params={"country": "RU"}).json()
    assert live.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises after shutdown
    assert _decisions(tmp_path / "data") == 2  # rolled at shutdown

    live = start_server(tmp_path / "data")
    try:
        pending = live.client.get(f"/v1/decisions/{d1['decision_id']}").json()
        assert pending["state"]["open"] is True and pending["state"]["learner_done"] is False
        after = live.client.get("/v1/carriers", params={"country": "RU"}).json()
        assert after == before
        # The pending decision is still accepted, and still learned, after the restart.
        res = _outcome(
            live,
            {
                "decision_id": d1["decision_id"],
                "event": "dlr",
                "status": "UNDELIV",
                "at": "2026-11-02T10:00:09Z",
            },
        )
        assert res["results"] == ["recorded"]
        assert (
            live.client.get(f"/v1/decisions/{d1['decision_id']}").json()["state"]["learner_success"]
            is False
        )
    finally:
        live.stop()
    client = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sms-routing-serving").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    first = min(runs, key=lambda r: r.info.start_time)
    assert first.data.params["policy"] == "thompson"
    arts = [a.path for a in client.list_artifacts(first.info.run_id, "decision_log/decisions")]
    assert len(arts) == 1 and arts[0].endswith(".parquet")
    assert "decisions" in first.data.metrics


def test_sigkill_leaves_no_corrupt_segment_and_loses_no_logged_decision(tmp_path: Path) -> None:
    live = start_server(tmp_path / "data", "--no-mlflow")
    ids = {_route(live)["decision_id"] for _ in range(25)}
    live.stop(signal.SIGKILL)
    assert _decisions(tmp_path / "data") == 0  # nothing rolled yet: rows are in the journal
    live = start_server(tmp_path / "data", "--no-mlflow")
    try:
        folder = tmp_path / "data" / "decision_log" / "decisions"
        recovered = set()
        for p in folder.glob("*.parquet"):
            recovered |= set(pq.read_table(p).column("decision_id").to_pylist())
        assert recovered == ids
    finally:
        live.stop()


@pytest.mark.parametrize(
    "policy", ["static", "cheapest", "round_robin", "uniform", "epsilon_greedy"]
)
def test_every_policy_serves(tmp_path: Path, policy: str) -> None:
    live = start_server(tmp_path / policy, "--no-mlflow", "--policy", policy)
    try:
        d = _route(live)
        assert d["policy"].startswith(f"{policy}@")
        if policy == "static":
            assert d["carrier"] == "globalprime" and d["propensity"] == 1.0
        if policy == "cheapest":
            assert d["carrier"] == "budgetroute"
    finally:
        live.stop()
