"""API keys over a real `router serve`: 401/403, scopes, tenant isolation both ways, admin,
revocation, rate limits (429 + Retry-After, recovery), tenants' countries and carriers, keys made
with the `router keys` command and stored only as hashes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carriers.catalog import EXAMPLE_CATALOG, load_catalog
from router.contract.redact import redact
from router.http.keys import new_key
from tests.conftest import T0, LiveServer, start_server

pytestmark = pytest.mark.usefixtures("without_redis_env")
ROOT = Path(__file__).resolve().parents[3]
CLI = (sys.executable, "-m", "router.cli")
RU = "+79031234567"
IN = "+919876543210"


def keys_cli(data_dir: Path, *args: str) -> dict:
    """Run `router keys …` as a subprocess; its JSON output."""
    out = subprocess.run(
        [*CLI, "keys", *args, "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def hdr(key: str) -> dict[str, str]:
    """The bearer header of a key."""
    return {"Authorization": f"Bearer {key}"}


class Keys:
    """The raw keys this module made with the CLI, by role."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.records: dict[str, dict] = {}
        self.raw: dict[str, str] = {}
        for role, args in {
            "acme": ["--tenant", "acme", "--scopes", "route,outcomes"],
            "acme_route_only": ["--tenant", "acme", "--scopes", "route"],
            "globex": ["--tenant", "globex", "--scopes", "route,outcomes"],
            "initech": ["--tenant", "initech"],
            "operator": ["--scopes", "route,outcomes,admin"],
            "limited": ["--tenant", "acme", "--rate", "1", "--burst", "2"],
            "default": ["--tenant", "default"],
            "doomed": ["--tenant", "acme"],
        }.items():
            rec = keys_cli(data_dir, "create", *args)
            self.raw[role], self.records[role] = rec.pop("key"), rec

    def __getitem__(self, role: str) -> dict[str, str]:
        return hdr(self.raw[role])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Keys created with the CLI in a fresh data dir."""
    return Keys(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def live(keys: Keys) -> Iterator[LiveServer]:
    """A server in `auto` mode over a store that holds keys: auth is on."""
    srv = start_server(keys.data_dir, "--no-mlflow")
    yield srv
    srv.stop()


def route(live: LiveServer, key: dict[str, str], status: int = 200, **body: object) -> dict:
    """POST /v1/route with a key; the JSON answer, after checking the status."""
    resp = live.client.post("/v1/route", json={"to": RU, "at": T0, **body}, headers=key)
    assert resp.status_code == status, resp.text
    return resp.json()


def dlr(decision_id: str, status: str = "DELIVRD") -> dict:
    """A delivery receipt for a decision, one minute after T0's decisions."""
    return {
        "decision_id": decision_id,
        "event": "dlr",
        "status": status,
        "at": "2026-11-02T10:00:05+00:00",
    }


def test_keys_are_stored_only_as_hashes(keys: Keys) -> None:
    text = (keys.data_dir / "api_keys.json").read_text()
    listing = keys_cli(keys.data_dir, "list")
    assert len(listing["keys"]) == len(keys.raw)
    for role, raw in keys.raw.items():
        assert raw.startswith("rk_") and len(raw) > 40
        assert raw not in text and raw.split("_", 2)[2] not in text
        assert keys.records[role]["id"] in text
    assert all("key" not in k and "key_hash" not in k for k in listing["keys"])
    assert (keys.data_dir / "api_keys.json").stat().st_mode & 0o077 == 0


def test_key_ids_survive_redaction_so_errors_can_name_them() -> None:
    # A hex id had a 7-digit run about one time in five, and errors then hid the key's name.
    ids = [new_key("t", ("route",))[1].id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(redact(f"key {i}") == f"key {i}" for i in ids)


def test_admin_scope_is_for_operators_only(keys: Keys) -> None:
    out = subprocess.run(
        [
            *CLI,
            "keys",
            "create",
            "--tenant",
            "acme",
            "--scopes",
            "admin",
            "--data-dir",
            str(keys.data_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "operator scope" in out.stderr and not out.stdout


def test_no_or_unknown_key_is_401_with_the_json_error(live: LiveServer, keys: Keys) -> None:
    bad_keys = [
        {},
        hdr("rk_nope_nope"),
        hdr(keys.raw["acme"][:-2] + "xx"),  # right id, wrong secret
        {"Authorization": f"Basic {keys.raw['acme']}"},
    ]
    for key in bad_keys:
        resp = live.client.post("/v1/route", json={"to": RU, "at": T0}, headers=key)
        assert resp.status_code == 401, (key, resp.text)
        assert resp.json()["error"]["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    # an unauthenticated request learns nothing about its body either
    resp = live.client.post("/v1/outcomes", json={"decision_id": "x", "event": "nope"})
    assert resp.status_code == 401
    ok = live.client.post(
        "/v1/route", json={"to": RU, "at": T0}, headers={"X-API-Key": keys.raw["acme"]}
    )
    assert ok.status_code == 200, ok.text


def test_health_is_open_and_says_auth_is_on_metrics_need_admin(
    live: LiveServer, keys: Keys
) -> None:
    health = live.client.get("/healthz")
    assert health.status_code == 200 and health.json()["auth"] == "on"
    assert live.client.get("/metrics").status_code == 401
    forbidden = live.client.get("/metrics", headers=keys["acme"])
    assert forbidden.status_code == 403 and forbidden.json()["error"]["details"]["required"] == [
        "admin"
    ]
    metrics = live.client.get("/metrics", headers=keys["operator"])
    assert metrics.status_code == 200 and "router_decisions_total" in metrics.text


def test_missing_scope_is_403(live: LiveServer, keys: Keys) -> None:
    d = route(live, keys["acme_route_only"])
    resp = live.client.post(
        "/v1/outcomes", json=dlr(d["decision_id"]), headers=keys["acme_route_only"]
    )
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["code"] == "forbidden" and err["details"]["required"] == ["outcomes"]
    # the refused outcome was not recorded: the decision has no outcome yet
    rec = live.client.get(f"/v1/decisions/{d['decision_id']}", headers=keys["acme"]).json()
    assert rec["outcomes"] == []


def test_a_tenant_key_routes_for_its_own_tenant_only(live: LiveServer, keys: Keys) -> None:
    d = route(live, keys["acme"])  # no tenant in the body: the key's
    rec = live.client.get(f"/v1/decisions/{d['decision_id']}", headers=keys["acme"]).json()
    assert rec["tenant"] == "acme"
    route(live, keys["acme"], tenant="acme")
    err = route(live, keys["acme"], status=403, tenant="globex")["error"]
    assert err["field"] == "tenant" and "acme" in err["message"]
    batch = [{"to": RU, "at": T0}, {"to": RU, "at": T0, "tenant": "globex"}]
    resp = live.client.post("/v1/route/batch", json=batch, headers=keys["acme"])
    assert resp.status_code == 403 and resp.json()["error"]["field"] == "[1].tenant"
    # an operator key routes for any tenant
    d = route(live, keys["operator"], tenant="globex")
    assert (
        live.client.get(f"/v1/decisions/{d['decision_id']}", headers=keys["operator"]).json()[
            "tenant"
        ]
        == "globex"
    )


@pytest.mark.parametrize(("owner", "other"), [("acme", "globex"), ("globex", "acme")])
def test_tenants_cannot_see_or_report_each_others_decisions(
    live: LiveServer, keys: Keys, owner: str, other: str
) -> None:
    mine = route(live, keys[owner])["decision_id"]
    theirs = route(live, keys[other])["decision_id"]
    unknown = "f" * 32
    # reading: another tenant's decision answers exactly as an id that never existed
    probe = live.client.get(f"/v1/decisions/{theirs}", headers=keys[owner])
    never = live.client.get(f"/v1/decisions/{unknown}", headers=keys[owner])
    assert probe.status_code == never.status_code == 404
    quoted = re.compile(r"'[^']*'")
    assert quoted.sub("ID", probe.json()["error"]["message"]) == quoted.sub(
        "ID", never.json()["error"]["message"]
    )
    # reporting: refused as unknown, and a batch mixing own and other's is all-or-nothing
    resp = live.client.post("/v1/outcomes", json=dlr(theirs), headers=keys[owner])
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_decision"
    resp = live.client.post("/v1/outcomes", json=[dlr(mine), dlr(theirs)], headers=keys[owner])
    assert resp.status_code == 404 and resp.json()["error"]["field"] == "[1].decision_id"
    # a retry cannot name another tenant's decision as its parent
    err = route(live, keys[owner], status=404, parent_decision_id=theirs, attempt=2)["error"]
    assert err["field"] == "parent_decision_id"
    for did, key in ((mine, keys[owner]), (theirs, keys[other])):
        rec = live.client.get(f"/v1/decisions/{did}", headers=key).json()
        assert rec["outcomes"] == [], "nothing was recorded by the refused requests"
    # the owner itself still can
    resp = live.client.post("/v1/outcomes", json=[dlr(mine)], headers=keys[owner])
    assert resp.status_code == 200 and resp.json()["recorded"] == 1
    assert route(live, keys[owner], parent_decision_id=mine, attempt=2)["decision_id"]


def test_admin_endpoints_need_the_admin_scope(live: LiveServer, keys: Keys) -> None:
    for key in ({}, keys["acme"], keys["globex"]):
        resp = live.client.post("/v1/carriers/budgetroute/pause", headers=key)
        assert resp.status_code in (401, 403), resp.text
    carriers = live.client.get("/v1/carriers", headers=keys["operator"]).json()["carriers"]
    assert not any(c["paused"] for c in carriers)
    resp = live.client.post("/v1/carriers/budgetroute/pause", headers=keys["operator"])
    assert resp.status_code == 200 and resp.json()["paused"] is True
    d = route(live, keys["acme"])
    assert "budgetroute" not in [d["carrier"], *d["fallbacks"]]
    resp = live.client.post("/v1/carriers/budgetroute/resume", headers=keys["operator"])
    assert resp.status_code == 200 and resp.json()["paused"] is False


def test_tenant_countries_and_carriers_are_enforced(live: LiveServer, keys: Keys) -> None:
    catalog = load_catalog(EXAMPLE_CATALOG)
    globex, initech = catalog.tenants["globex"], catalog.tenants["initech"]
    assert "IN" not in (globex.countries or ())
    err = route(live, keys["globex"], status=403, to=IN)["error"]
    assert err["code"] == "forbidden" and "IN" in err["message"]
    assert route(live, keys["acme"], to=IN)["context"]["country"] == "IN"
    allowed = set(initech.carriers or ())
    for _ in range(5):
        d = route(live, keys["initech"])
        rec = live.client.get(f"/v1/decisions/{d['decision_id']}", headers=keys["initech"]).json()
        assert set(rec["eligible"]) <= allowed and rec["carrier"] in allowed
    listed = live.client.get("/v1/carriers", headers=keys["initech"]).json()["carriers"]
    assert {c["id"] for c in listed} <= allowed
    every = live.client.get("/v1/carriers", headers=keys["operator"]).json()["carriers"]
    assert {c["id"] for c in every} > allowed


def test_key_rate_limit_answers_429_with_retry_after_and_recovers(
    live: LiveServer, keys: Keys
) -> None:
    codes = [route(live, keys["limited"], status=s) for s in (200, 200)]
    assert all("decision_id" in c for c in codes)
    resp = live.client.post("/v1/route", json={"to": RU, "at": T0}, headers=keys["limited"])
    assert resp.status_code == 429, resp.text
    err = resp.json()["error"]
    assert err["code"] == "rate_limited" and err["details"]["limit"].startswith("key ")
    assert keys.records["limited"]["id"] in err["message"]
    wait = int(resp.headers["Retry-After"])
    assert 1 <= wait <= 2
    # the same tenant's other keys are not held back by this key's own limit
    route(live, keys["acme"])
    time.sleep(wait)
    route(live, keys["limited"])


def test_tenant_rate_limit_counts_batch_items(live: LiveServer, keys: Keys) -> None:
    keys_cli(keys.data_dir, "limit", "default", "--rate", "2", "--burst", "4")
    time.sleep(0.05)
    batch = [{"to": RU, "at": T0}] * 3
    resp = live.client.post("/v1/route/batch", json=batch, headers=keys["default"])
    assert resp.status_code == 200 and len(resp.json()) == 3
    resp = live.client.post("/v1/route/batch", json=batch, headers=keys["default"])
    assert resp.status_code == 429
    err = resp.json()["error"]
    assert err["details"]["limit"] == "tenant default" and "tenant default" in err["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    too_big = live.client.post("/v1/route/batch", json=batch * 2, headers=keys["default"])
    assert too_big.status_code == 413 and "burst of 4" in too_big.json()["error"]["message"]
    time.sleep(float(resp.headers["Retry-After"]))
    resp = live.client.post("/v1/route/batch", json=batch, headers=keys["default"])
    assert resp.status_code == 200, resp.text
    keys_cli(keys.data_dir, "limit", "default", "--rate", "0")


def test_a_revoked_key_is_refused_at_once(live: LiveServer, keys: Keys) -> None:
    route(live, keys["doomed"])
    out = keys_cli(keys.data_dir, "revoke", keys.records["doomed"]["id"])
    assert out["revoked"]
    resp = live.client.post("/v1/route", json={"to": RU, "at": T0}, headers=keys["doomed"])
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    route(live, keys["acme"])  # the others still work


def test_an_unreadable_key_store_fails_closed(live: LiveServer, keys: Keys) -> None:
    path = keys.data_dir / "api_keys.json"
    good = path.read_bytes()
    try:
        path.write_bytes(good[: len(good) // 2])  # a torn file (what atomic writes prevent)
        resp = live.client.post("/v1/route", json={"to": RU, "at": T0}, headers=keys["acme"])
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "auth_unavailable"
        assert live.client.get("/healthz").json()["auth"] == "unavailable"
    finally:
        path.write_bytes(good)
    route(live, keys["acme"])


def test_required_mode_without_keys_refuses_and_off_mode_is_open(
    tmp_path: Path, keys: Keys
) -> None:
    required = start_server(tmp_path / "required", "--no-mlflow", "--auth", "required")
    try:
        assert required.client.get("/healthz").json()["auth"] == "on"
        assert required.client.post("/v1/route", json={"to": RU, "at": T0}).status_code == 401
    finally:
        required.stop()
    off_dir = tmp_path / "off"
    off_dir.mkdir()
    (off_dir / "api_keys.json").write_bytes((keys.data_dir / "api_keys.json").read_bytes())
    opened = start_server(off_dir, "--no-mlflow", "--auth", "off")
    try:
        assert opened.client.get("/healthz").json()["auth"] == "off"
        assert "auth: off (--auth off)" in opened.output()
        resp = opened.client.post("/v1/route", json={"to": RU, "at": T0, "tenant": "globex"})
        assert resp.status_code == 200
    finally:
        opened.stop()


def test_auto_mode_with_an_empty_store_is_open_and_warns(server: LiveServer) -> None:
    assert server.client.get("/healthz").json()["auth"] == "off"
    assert "auth: off (auto mode and no API key in the store)" in server.output()
    assert httpx.post(f"{server.url}/v1/route", json={"to": RU, "at": T0}).status_code == 200
