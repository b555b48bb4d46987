"""Bad input: every field of every endpoint gets a 4xx with a clear message, nothing is learned or
logged from it, and the server stays up (DESIGN.md, "What bad input gets").

Most cases run against the module's `server` (conftest: `router serve --replay`). `--replay`
accepts any event time, so timestamps far in the future, and the probes that would move learned
state if the product misbehaved, run against a second server started here without `--replay`
(`live_now`). Test order matters: the last test of the file checks that none of the bad requests
before it changed the decision/outcome counters, the decision log, or leaked a phone number.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow.parquet as pq
import pytest
from conftest import T0, LiveServer, launch_server, wait_ready
from prometheus_client.parser import text_string_to_metric_families

FAR_FUTURE = "2100-01-01T00:00:00+00:00"
UNKNOWN_ID = "unknown-decision-42"

# Every phone number this module sends; none may come back in an answer, a log or on disk.
RU = "+79161234567"
RU2 = "+79031234567"
IN = "+919876543210"
FR = "+33612345678"
BR = "+5511987654321"
DE_LANDLINE = "+4930123456"  # phonenumbers: FIXED_LINE
DE_INVALID = "+4900012345"
RU_INVALID = "+7000123456"  # +7 is a known country code (RU, KZ); this number is not valid
UNKNOWN_CC = "+99912345678"
NON_GEOGRAPHIC = "+80012345678"
NO_PLUS = "79161234567"
LETTERS = "+7916abc4567"
TOO_SHORT = "+7916"
TOO_LONG = "+7916123456789012"
SPACED = "+7 916 123 45 67"
FULLWIDTH = "+７９１６１２３４５６７"
PHONES = (
    RU,
    RU2,
    IN,
    FR,
    BR,
    DE_LANDLINE,
    DE_INVALID,
    RU_INVALID,
    UNKNOWN_CC,
    NON_GEOGRAPHIC,
    NO_PLUS,
    LETTERS,
    TOO_SHORT,
    TOO_LONG,
    SPACED,
    FULLWIDTH,
)

# Valid work done by the tests themselves after the baseline snapshot (batch items that route).
LEGIT = {"decisions": 0}


def _digit_forms(number: str, tails: bool = True, min_len: int = 4) -> set[str]:
    """Ways a number could leak: its digits, its raw form, and (`tails`) its subscriber part."""
    digits = "".join(str(unicodedata.digit(ch)) for ch in number if ch.isdigit())
    forms = {digits, number.lstrip("+")}
    if tails and len(digits) >= 10:
        forms.add(digits[-7:])
    return {f for f in forms if len(f) >= min_len}


# Error bodies carry no numbers of their own: any form, even a 7-digit tail, is a leak. Answers
# with decisions (propensities, ids), logs and files are checked for whole numbers only.
LEAK_FORMS = set().union(*(_digit_forms(p) for p in PHONES))
LONG_LEAK_FORMS = set().union(*(_digit_forms(p, tails=False, min_len=8) for p in PHONES))


def assert_no_number(text: str, forms: set[str] = LEAK_FORMS, where: str = "answer") -> None:
    """No form of any phone number sent appears in `text`."""
    leaked = sorted(f for f in forms if f in text)
    assert not leaked, f"phone number digits {leaked} appear in the {where}: {text[:2000]}"


def assert_error(
    resp: httpx.Response,
    status: int,
    code: str | None = None,
    field_name: str | None = None,
    mention: str | None = None,
) -> dict[str, Any]:
    """A JSON error with `status`, `code`, naming `field_name`, with no phone number in it."""
    assert resp.status_code == status, f"{resp.status_code} (expected {status}): {resp.text[:2000]}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"], err
    assert isinstance(err.get("message"), str) and err["message"].strip(), err
    if code is not None:
        assert err["code"] == code, err
    if field_name is not None:
        named = {err.get("field")} | {
            f.get("field") for f in (err.get("details") or {}).get("fields", [])
        }
        assert field_name in named, f"field {field_name!r} not named: {err}"
        if mention is None:
            mention = field_name.rsplit(".", 1)[-1].split("]")[-1]
    if mention is not None:
        assert mention.lower() in err["message"].lower(), f"{mention!r} not in {err['message']!r}"
    assert_no_number(resp.text)
    return err


# ---- cases -----------------------------------------------------------------------------------

_NO_BODY = object()
Body = Any  # a JSON value, or a callable of the context (decision ids, ...) returning one


@dataclass(frozen=True)
class Case:
    """One bad request and the error it must get."""

    method: str
    path: str
    status: int
    code: str | None = "invalid_request"
    field: str | None = None
    mention: str | None = None
    json: Body = _NO_BODY
    content: bytes | None = None
    content_type: str = "application/json"

    def send(self, client: httpx.Client, ctx: dict[str, Any]) -> httpx.Response:
        """Send the request; `ctx` fills in ids known only at run time."""
        if self.content is not None:
            headers = {"content-type": self.content_type}
            return client.request(self.method, self.path, content=self.content, headers=headers)
        if self.json is _NO_BODY:
            return client.request(self.method, self.path)
        body = self.json(ctx) if callable(self.json) else self.json
        return client.request(self.method, self.path, json=body)


def case(case_id: str, method: str, path: str, status: int, **kw: Any) -> Any:
    """A parametrized case with its own test id."""
    return pytest.param(Case(method, path, status, **kw), id=case_id)


def route(case_id: str, body: Body, status: int = 422, **kw: Any) -> Any:
    """A bad POST /v1/route."""
    return case(case_id, "POST", "/v1/route", status, json=body, **kw)


def ru(**extra: Any) -> dict[str, Any]:
    """A valid route body at T0 with `extra` fields."""
    return {"to": RU, "at": T0, **extra}


ROUTE_CASES = [
    # `to`: missing, wrong types, not E.164
    route("to-missing", {"at": T0}, field="to"),
    route("to-int", {"to": 79161234567, "at": T0}, field="to"),
    route("to-list", {"to": [RU], "at": T0}, field="to"),
    route("to-null", {"to": None, "at": T0}, field="to"),
    route("to-empty", {"to": "", "at": T0}, field="to"),
    route("to-no-plus", {"to": NO_PLUS, "at": T0}, field="to", mention="E.164"),
    route("to-letters", {"to": LETTERS, "at": T0}, field="to", mention="digits"),
    route("to-spaces", {"to": SPACED, "at": T0}, field="to", mention="digits"),
    route("to-too-short", {"to": TOO_SHORT, "at": T0}, field="to", mention="digits"),
    route("to-too-long", {"to": TOO_LONG, "at": T0}, field="to", mention="digits"),
    route("to-longer-than-32", {"to": "+" + "7" * 40, "at": T0}, field="to"),
    route("to-unknown-country-code", {"to": UNKNOWN_CC, "at": T0}, field="to", mention="country"),
    route("to-non-geographic", {"to": NON_GEOGRAPHIC, "at": T0}, field="to", mention="country"),
    route("to-invalid-for-country", {"to": DE_INVALID, "at": T0}, field="to", mention="valid"),
    route("to-invalid-for-shared-code", {"to": RU_INVALID, "at": T0}, field="to", mention="valid"),
    route("to-landline", {"to": DE_LANDLINE, "at": T0}, field="to", mention="mobile"),
    route(
        "to-country-without-coverage",
        {"to": FR, "at": T0},
        code="no_eligible_carrier",
        mention="FR",
    ),
    # message_class, tenant, sender_type
    route(
        "message-class-unknown",
        ru(message_class="spam"),
        field="message_class",
        mention="message class",
    ),
    route("message-class-int", ru(message_class=5), field="message_class"),
    route("message-class-null", ru(message_class=None), field="message_class"),
    route("tenant-unknown", ru(tenant="nope"), field="tenant"),
    route("tenant-int", ru(tenant=5), field="tenant"),
    route("sender-type-unknown", ru(sender_type="fax"), field="sender_type"),
    route("sender-type-int", ru(sender_type=1), field="sender_type"),
    # segments
    route("segments-0", ru(segments=0), field="segments"),
    route("segments-negative", ru(segments=-1), field="segments"),
    route("segments-256", ru(segments=256), field="segments"),
    route("segments-string", ru(segments="x"), field="segments"),
    route("segments-fraction", ru(segments=1.5), field="segments"),
    route("segments-huge", ru(segments=10**30), field="segments"),
    # mccmnc
    route("mccmnc-letters", ru(mccmnc="abc"), field="mccmnc"),
    route("mccmnc-4-digits", ru(mccmnc="1234"), field="mccmnc"),
    route("mccmnc-int", ru(mccmnc=25001), field="mccmnc"),
    route("mccmnc-other-country", {"to": RU2, "mccmnc": "26201", "at": T0}, field="mccmnc"),
    # exclude
    route("exclude-string", ru(exclude="globalprime"), field="exclude"),
    route("exclude-null", ru(exclude=None), field="exclude"),
    route("exclude-int-item", ru(exclude=[1]), field="exclude[0]"),
    route("exclude-unknown-carrier", ru(exclude=["nope"]), field="exclude", mention="nope"),
    # attempt, parent_decision_id
    route("attempt-0", ru(attempt=0), field="attempt"),
    route("attempt-21", ru(attempt=21), field="attempt"),
    route("attempt-string", ru(attempt="two"), field="attempt"),
    route(
        "parent-unknown",
        ru(parent_decision_id=UNKNOWN_ID),
        404,
        code="unknown_decision",
        field="parent_decision_id",
        mention=UNKNOWN_ID,
    ),
    route("parent-bad-chars", ru(parent_decision_id="../x"), field="parent_decision_id"),
    # at
    route("at-not-a-date", ru(at="yesterday"), field="at"),
    route("at-naive", ru(at="2026-11-02T10:00:00"), field="at"),
    route("at-bad-offset", ru(at="2026-11-02T10:00:00+25:00"), field="at"),
    route("at-beyond-year-9999", ru(at=1e20), field="at"),
    # the body itself
    route("unknown-field-typo", {"too": RU, "at": T0}, field="too"),
    route("unknown-extra-field", ru(priority="high"), field="priority"),
    route("body-json-array", [ru()], field="body"),
    route("body-json-string", RU, field="body"),
    case("body-json-null", "POST", "/v1/route", 422, content=b"null", field="body"),
    case("body-empty", "POST", "/v1/route", 422, content=b"", field="body"),
    case(
        "body-malformed-json",
        "POST",
        "/v1/route",
        400,
        content=b'{"to": "+7916',
        code="malformed_json",
        mention="JSON",
    ),
    case("body-not-utf8", "POST", "/v1/route", 400, content=b"\xff\xfe\x00", code=None),
    case(
        "body-nested-100k-deep",
        "POST",
        "/v1/route",
        400,
        code=None,
        content=b"[" * 100_000 + b"]" * 100_000,
    ),
    case(
        "body-text-plain",
        "POST",
        "/v1/route",
        422,
        field="body",
        content=orjson.dumps(ru()),
        content_type="text/plain",
    ),
    # permissions and eligibility
    route(
        "tenant-may-not-send-to-country",
        {"to": IN, "tenant": "globex", "at": T0},
        403,
        code="forbidden",
        field="tenant",
        mention="IN",
    ),
]


def batch(case_id: str, body: Body, status: int = 422, **kw: Any) -> Any:
    """A bad POST /v1/route/batch."""
    return case(case_id, "POST", "/v1/route/batch", status, json=body, **kw)


BATCH_CASES = [
    batch("batch-object-not-list", ru(), field="body"),
    batch("batch-empty", [], field="body"),
    batch("batch-1001-items", [ru()] * 1001, field="body", mention="1000"),
    batch("batch-item-wrong-type", [ru(), {"to": 79161234567, "at": T0}], field="[1].to"),
    batch("batch-item-unknown-field", [ru(), ru(colour="red")], field="[1].colour"),
    batch("batch-item-not-object", [ru(), RU], field="[1]"),
    case(
        "batch-malformed-json", "POST", "/v1/route/batch", 400, content=b"[{", code="malformed_json"
    ),
]


def outcome(case_id: str, body: Body, status: int = 422, **kw: Any) -> Any:
    """A bad POST /v1/outcomes."""
    return case(case_id, "POST", "/v1/outcomes", status, json=body, **kw)


def ev(**extra: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """An outcome for the baseline decision, at T0, with `extra` fields (None removes one)."""

    def make(ctx: dict[str, Any]) -> dict[str, Any]:
        body = {"decision_id": ctx["decision_id"], "event": "submit", "at": T0, **extra}
        return {k: v for k, v in body.items() if v is not None}

    return make


OUTCOME_CASES = [
    outcome(
        "decision-unknown",
        ev(decision_id=UNKNOWN_ID),
        404,
        code="unknown_decision",
        field="decision_id",
        mention=UNKNOWN_ID,
    ),
    outcome("decision-id-bad-chars", ev(decision_id="bad id!"), field="decision_id"),
    outcome("decision-id-65-chars", ev(decision_id="a" * 65), field="decision_id"),
    outcome("decision-id-int", ev(decision_id=42), field="decision_id"),
    outcome("decision-id-missing", {"event": "submit", "at": T0}, field="decision_id"),
    outcome("event-missing", ev(event=None), field="event"),
    outcome("event-unknown", ev(event="bounce"), field="event"),
    outcome("event-int", ev(event=1), field="event"),
    outcome("dlr-without-status", ev(event="dlr"), field="status"),
    outcome("dlr-status-not-smpp", ev(event="dlr", status="GONE"), field="status"),
    outcome("dlr-status-int", ev(event="dlr", status=2), field="status"),
    outcome("cost-negative", ev(cost=-0.01), field="cost"),
    outcome("cost-string", ev(cost="cheap"), field="cost"),
    outcome("cost-too-large", ev(cost=1001), field="cost"),
    outcome("cost-list", ev(cost=[0.02]), field="cost"),
    outcome("currency-lowercase", ev(cost=0.02, currency="usd"), field="currency"),
    outcome("currency-too-long", ev(cost=0.02, currency="DOLLARS"), field="currency"),
    outcome("error-code-int", ev(error_code=5), field="error_code"),
    outcome("at-not-a-date", ev(at="soon"), field="at"),
    outcome("at-naive", ev(at="2026-11-02T10:00:01"), field="at"),
    outcome("unknown-field", ev(price=0.02), field="price"),
    outcome(
        "list-one-invalid-value",
        lambda ctx: [ev()(ctx), ev(cost=-1)(ctx)],
        field="[1].cost",
    ),
    outcome(
        "list-one-bad-dlr-status",
        lambda ctx: [ev()(ctx), ev(event="dlr", status="NOPE")(ctx)],
        field="[1].status",
        mention="status",
    ),
    outcome(
        "list-one-unknown-decision",
        lambda ctx: [ev()(ctx), ev(decision_id=UNKNOWN_ID)(ctx)],
        404,
        code="unknown_decision",
        field="[1].decision_id",
        mention=UNKNOWN_ID,
    ),
    outcome(
        "submit-receipt-word",
        ev(status="ACCEPTD"),
        field="status",
        mention="dlr event",
    ),
    outcome("submit-unknown-word", ev(status="GREAT"), field="status", mention="ESME_R"),
    outcome("at-flag-unknown-word", ev(at_flag="fudged"), field="at_flag", mention="coarse"),
    outcome("at-flag-not-words", ev(at_flag="a b"), field="at_flag"),
    outcome("list-empty", [], field="body"),
    outcome("list-1001-items", lambda ctx: [ev()(ctx)] * 1001, field="body", mention="1000"),
    outcome("body-json-string", "submit", field="body"),
    outcome("body-json-number", 42, field="body"),
    case("body-empty", "POST", "/v1/outcomes", 422, content=b"", field="body"),
    case(
        "body-malformed-json",
        "POST",
        "/v1/outcomes",
        400,
        content=b'{"decision_id": ',
        code="malformed_json",
        mention="JSON",
    ),
]

# Non-finite costs cannot be written by a JSON encoder: sent as raw text.
RAW_COST_CASES = [
    pytest.param(b"NaN", id="cost-NaN"),
    pytest.param(b"Infinity", id="cost-Infinity"),
    pytest.param(b"-Infinity", id="cost-minus-Infinity"),
    pytest.param(b"1e999", id="cost-overflows-to-inf"),
]

OTHER_CASES = [
    case(
        "decision-unknown",
        "GET",
        f"/v1/decisions/{UNKNOWN_ID}",
        404,
        code="unknown_decision",
        field="decision_id",
        mention=UNKNOWN_ID,
    ),
    case("decision-id-bad-chars", "GET", "/v1/decisions/bad%20id!", 422, field="path.decision_id"),
    case("decision-id-65-chars", "GET", "/v1/decisions/" + "a" * 65, 422, field="path.decision_id"),
    case(
        "decision-id-path-traversal", "GET", "/v1/decisions/..%2F..%2Fetc%2Fpasswd", 404, code=None
    ),
    case(
        "pause-unknown-carrier",
        "POST",
        "/v1/carriers/nope/pause",
        404,
        code="unknown_carrier",
        field="carrier",
        mention="nope",
    ),
    case(
        "resume-unknown-carrier",
        "POST",
        "/v1/carriers/nope/resume",
        404,
        code="unknown_carrier",
        field="carrier",
        mention="nope",
    ),
    case(
        "pause-carrier-id-bad-chars",
        "POST",
        "/v1/carriers/bad%20id/pause",
        422,
        field="path.carrier_id",
    ),
    case(
        "pause-reason-too-long",
        "POST",
        "/v1/carriers/globalprime/pause",
        422,
        json={"reason": "x" * 201},
        field="reason",
    ),
    case(
        "pause-reason-int",
        "POST",
        "/v1/carriers/globalprime/pause",
        422,
        json={"reason": 5},
        field="reason",
    ),
    case(
        "pause-unknown-field",
        "POST",
        "/v1/carriers/globalprime/pause",
        422,
        json={"why": "maintenance"},
        field="why",
    ),
    case(
        "pause-body-list",
        "POST",
        "/v1/carriers/globalprime/pause",
        422,
        json=["maintenance"],
        field="body",
    ),
    case(
        "pause-malformed-json",
        "POST",
        "/v1/carriers/globalprime/pause",
        400,
        content=b"{",
        code="malformed_json",
    ),
    case(
        "carriers-country-lowercase", "GET", "/v1/carriers?country=ru", 422, field="query.country"
    ),
    case(
        "carriers-country-3-letters", "GET", "/v1/carriers?country=RUS", 422, field="query.country"
    ),
    case("carriers-country-empty", "GET", "/v1/carriers?country=", 422, field="query.country"),
    case(
        "carriers-country-unknown", "GET", "/v1/carriers?country=XX", 422, code=None, mention="XX"
    ),
    case("unknown-path", "GET", "/v1/nope", 404, code="not_found"),
    case("unknown-version", "POST", "/v2/route", 404, code="not_found", json=ru()),
    case("wrong-method-route", "GET", "/v1/route", 405, code="method_not_allowed"),
    case("wrong-method-outcomes", "DELETE", "/v1/outcomes", 405, code="method_not_allowed"),
    case(
        "wrong-method-pause",
        "PUT",
        "/v1/carriers/globalprime/pause",
        405,
        code="method_not_allowed",
    ),
    case("wrong-method-healthz", "POST", "/healthz", 405, code="method_not_allowed"),
]


# ---- metrics, decision log ---------------------------------------------------------------------


def metric_sum(client: httpx.Client, name: str) -> float:
    """The sum of all samples of counter `name` (Prometheus text from GET /metrics)."""
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    total = 0.0
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def log_rows(data_dir: Path, stream: str) -> list[dict[str, Any]]:
    """Every row of a decision-log stream: open journals and finished Parquet segments."""
    folder = data_dir / "decision_log" / stream
    rows: list[dict[str, Any]] = []
    for journal in sorted(folder.glob("open-*.jsonl")):
        rows += [orjson.loads(line) for line in journal.read_bytes().splitlines() if line.strip()]
    for segment in sorted(folder.glob("*.parquet")):
        rows += pq.read_table(segment).to_pylist()
    return rows


def decision_ids_logged(data_dir: Path) -> set[str]:
    """Ids of the decisions in the log (a roll may briefly hold a row twice: deduplicated)."""
    return {r["decision_id"] for r in log_rows(data_dir, "decisions")}


def assert_nothing_on_disk(data_dir: Path) -> None:
    """No phone number in the decision log (journals and segments) or the state snapshot."""
    for stream in ("decisions", "outcomes"):
        text = "\n".join(map(str, log_rows(data_dir, stream)))
        assert_no_number(text, LONG_LEAK_FORMS, f"decision log ({stream})")
    for path in (data_dir / "decision_log").rglob("*.jsonl"):
        assert_no_number(path.read_text(errors="replace"), LONG_LEAK_FORMS, str(path))
    snapshot = data_dir / "state.json"
    if snapshot.exists():
        assert_no_number(snapshot.read_text(errors="replace"), LONG_LEAK_FORMS, "snapshot")


# ---- servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def now_launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The non-replay server, launched early so it starts while the main one does."""
    live = launch_server(tmp_path_factory.mktemp("server-no-replay"), "--no-mlflow", replay=False)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def live_now(now_launch: LiveServer) -> LiveServer:
    """A `router serve` without --replay: event times may be at most 300 s in the future."""
    return wait_ready(now_launch)


@dataclass
class Baseline:
    """The main server after its valid setup, before any bad request."""

    decision_id: str
    decisions: float
    outcomes: float
    logged_decisions: set[str]
    logged_outcomes: int
    decision_view: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module", autouse=True)
def baseline(now_launch: LiveServer, server: LiveServer) -> Baseline:
    """One valid decision to post bad outcomes against, then the counters to compare with."""
    resp = server.client.post("/v1/route", json={"to": RU, "tenant": "acme", "at": T0})
    assert resp.status_code == 200, resp.text
    did = resp.json()["decision_id"]
    view = server.client.get(f"/v1/decisions/{did}").json()
    LEGIT["decisions"] = 0
    return Baseline(
        did,
        metric_sum(server.client, "router_decisions_total"),
        metric_sum(server.client, "router_outcomes_total"),
        decision_ids_logged(server.data_dir),
        len(log_rows(server.data_dir, "outcomes")),
        view,
    )


@pytest.fixture(scope="module")
def ctx(baseline: Baseline) -> dict[str, Any]:
    """Run-time values the cases refer to."""
    return {"decision_id": baseline.decision_id}


# ---- the main server: every field of every endpoint ---------------------------------------------


@pytest.mark.parametrize("c", ROUTE_CASES)
def test_route_bad_input(server: LiveServer, ctx: dict[str, Any], c: Case) -> None:
    assert_error(c.send(server.client, ctx), c.status, c.code, c.field, c.mention)


def test_no_eligible_carrier_says_why_for_each_carrier(server: LiveServer) -> None:
    # globalprime is the only carrier with shortcode senders to RU; excluding it leaves none.
    body = ru(sender_type="shortcode", exclude=["globalprime"])
    err = assert_error(server.client.post("/v1/route", json=body), 422, "no_eligible_carrier")
    reasons = err["details"]["reasons"]
    carriers = [c["id"] for c in server.client.get("/v1/carriers").json()["carriers"]]
    assert sorted(reasons) == sorted(carriers), err
    assert reasons["globalprime"] == "excluded by the request"
    assert "sender type shortcode" in reasons["eurodirect"]
    assert "no coverage for RU" in reasons["afrilink"]
    for carrier, reason in reasons.items():
        assert f"{carrier}: {reason}" in err["message"], err["message"]


@pytest.mark.parametrize("c", BATCH_CASES)
def test_batch_bad_input(server: LiveServer, ctx: dict[str, Any], c: Case) -> None:
    assert_error(c.send(server.client, ctx), c.status, c.code, c.field, c.mention)


def test_batch_domain_errors_are_per_item(server: LiveServer) -> None:
    items = [
        ru(),
        {"to": TOO_SHORT, "at": T0},
        ru(tenant="nope"),
        {"to": DE_LANDLINE, "at": T0},
        {"to": IN, "tenant": "globex", "at": T0},
        ru(sender_type="shortcode", exclude=["globalprime"]),
        ru(parent_decision_id=UNKNOWN_ID),
        {"to": RU2, "at": T0},
    ]
    resp = server.client.post("/v1/route/batch", json=items)
    assert resp.status_code == 200, resp.text
    answers = resp.json()
    assert len(answers) == len(items)
    assert_no_number(resp.text, LONG_LEAK_FORMS)
    expected = [None, "to", "tenant", "to", "tenant", None, "parent_decision_id", None]
    codes = [
        None,
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "forbidden",
        "no_eligible_carrier",
        "unknown_decision",
        None,
    ]
    for answer, field_name, code in zip(answers, expected, codes, strict=True):
        if code is None:
            assert "decision_id" in answer and "error" not in answer, answer
            continue
        assert set(answer) == {"error"}, answer
        assert answer["error"]["code"] == code, answer
        assert answer["error"]["message"].strip(), answer
        assert answer["error"].get("field") == field_name, answer
    LEGIT["decisions"] += sum("decision_id" in a for a in answers)


@pytest.mark.parametrize("c", OUTCOME_CASES)
def test_outcomes_bad_input(server: LiveServer, ctx: dict[str, Any], c: Case) -> None:
    assert_error(c.send(server.client, ctx), c.status, c.code, c.field, c.mention)


@pytest.mark.parametrize("number", RAW_COST_CASES)
def test_outcome_cost_not_finite(server: LiveServer, ctx: dict[str, Any], number: bytes) -> None:
    body = b'{"decision_id": "%s", "event": "submit", "cost": %s, "at": "%s"}' % (
        ctx["decision_id"].encode(),
        number,
        T0.encode(),
    )
    resp = server.client.post(
        "/v1/outcomes", content=body, headers={"content-type": "application/json"}
    )
    assert_error(resp, 422, "invalid_request", "cost")


def test_rejected_outcomes_applied_nothing(server: LiveServer, baseline: Baseline) -> None:
    """Lists with one bad item were rejected whole: the good item of each was not applied."""
    view = server.client.get(f"/v1/decisions/{baseline.decision_id}").json()
    assert view["outcomes"] == [] == baseline.decision_view["outcomes"], view["outcomes"]
    assert view["state"]["final_status"] is None, view["state"]
    assert view["state"]["converted"] is False, view["state"]
    assert view["state"]["open"] is True, view["state"]


@pytest.mark.parametrize("c", OTHER_CASES)
def test_other_endpoints_bad_input(server: LiveServer, ctx: dict[str, Any], c: Case) -> None:
    assert_error(c.send(server.client, ctx), c.status, c.code, c.field, c.mention)


def test_rejected_pause_paused_nothing(server: LiveServer) -> None:
    carriers = server.client.get("/v1/carriers").json()["carriers"]
    assert [c["id"] for c in carriers if c["paused"]] == []


# ---- far-future timestamps and state-moving probes: a server without --replay ----------------


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.fixture(scope="module")
def now_decision(live_now: LiveServer) -> str:
    """A valid decision on the non-replay server, at wall time."""
    resp = live_now.client.post("/v1/route", json={"to": RU})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["decision_id"])


FUTURE_CASES = [
    pytest.param("/v1/route", lambda d: {"to": RU, "at": FAR_FUTURE}, "at", id="route-year-2100"),
    pytest.param("/v1/route", lambda d: {"to": RU, "at": _in(3600)}, "at", id="route-in-1-hour"),
    pytest.param("/v1/route", lambda d: {"to": RU, "at": 4102444800}, "at", id="route-epoch-2100"),
]


@pytest.mark.parametrize(("path", "make", "field_name"), FUTURE_CASES)
def test_far_future_timestamp_rejected(
    live_now: LiveServer,
    now_decision: str,
    path: str,
    make: Callable[[str], Any],
    field_name: str,
) -> None:
    resp = live_now.client.post(path, json=make(now_decision))
    assert_error(resp, 422, "invalid_request", field_name, "future")


def test_far_future_batch_item_rejected(live_now: LiveServer) -> None:
    resp = live_now.client.post("/v1/route/batch", json=[{"to": RU, "at": FAR_FUTURE}])
    assert resp.status_code == 200, resp.text
    [answer] = resp.json()
    assert answer["error"]["code"] == "invalid_request", answer
    assert answer["error"]["field"] == "at", answer
    assert "future" in answer["error"]["message"], answer


SKEW_CASES = [
    pytest.param(-3600, "past", "3,600 s in the past", id="route-1-hour-ago"),
    pytest.param(-38 * 3600, "past", "136,800 s in the past", id="route-38-hours-ago"),
    pytest.param(-14 * 86400, "past", "1,209,600 s in the past", id="route-14-days-ago"),
    pytest.param(3600, "future", "3,600 s in the future", id="route-1-hour-ahead"),
]


@pytest.mark.parametrize(("offset", "side", "figure"), SKEW_CASES)
def test_route_at_outside_the_skew_window_names_at_and_the_bound(
    live_now: LiveServer, offset: float, side: str, figure: str
) -> None:
    """Issue 13.7: the accepted window is symmetric around the router's clock (300 s either
    side without --replay); the error names `at`, the offset and the bound, and redaction
    (which hides digit runs that could be phone numbers) leaves these figures readable."""
    resp = live_now.client.post("/v1/route", json={"to": RU, "at": _in(offset)})
    err = assert_error(resp, 422, "invalid_request", "at", side)
    message = err["message"]
    assert message.startswith("at: "), message
    assert figure in message and "300 s" in message, message
    assert "digits hidden" not in message, message
    assert err["details"]["max_skew_seconds"] == 300, err
    assert abs(err["details"]["offset_seconds"] - offset) < 60, err


def test_skew_window_batch_item_in_the_past_rejected(live_now: LiveServer) -> None:
    resp = live_now.client.post("/v1/route/batch", json=[{"to": RU, "at": _in(-3600)}])
    assert resp.status_code == 200, resp.text
    [answer] = resp.json()
    assert answer["error"]["field"] == "at", answer
    assert "3,600 s in the past" in answer["error"]["message"], answer


def test_far_future_learned_and_logged_nothing(live_now: LiveServer, now_decision: str) -> None:
    assert metric_sum(live_now.client, "router_decisions_total") == 1
    assert metric_sum(live_now.client, "router_outcomes_total") == 0
    assert decision_ids_logged(live_now.data_dir) == {now_decision}
    assert log_rows(live_now.data_dir, "outcomes") == []
    view = live_now.client.get(f"/v1/decisions/{now_decision}").json()
    assert view["outcomes"] == [] and view["state"]["final_status"] is None, view


@pytest.mark.parametrize("offset", [-200, 200], ids=["200-s-ago", "200-s-ahead"])
def test_route_at_within_the_skew_window_is_accepted(live_now: LiveServer, offset: int) -> None:
    resp = live_now.client.post("/v1/route", json={"to": RU, "at": _in(offset)})
    assert resp.status_code == 200, resp.text


def test_redaction_leaves_figures_and_hides_numbers() -> None:
    from router.contract.errors import InvalidRequest

    err = InvalidRequest(f"timestamp is 1,209,600 s in the past (to {RU})", field="at").to_dict()
    assert "1,209,600 s in the past" in err["message"], err
    assert_no_number(err["message"])


def test_number_with_non_ascii_digits_is_not_e164(live_now: LiveServer) -> None:
    """E.164 is '+' and ASCII digits; full-width (or Arabic-Indic) digits are not a number."""
    decisions = metric_sum(live_now.client, "router_decisions_total")
    resp = live_now.client.post("/v1/route", json={"to": FULLWIDTH})
    assert_error(resp, 422, "invalid_request", "to")
    assert metric_sum(live_now.client, "router_decisions_total") == decisions


def test_boolean_is_not_a_segment_count(live_now: LiveServer) -> None:
    decisions = metric_sum(live_now.client, "router_decisions_total")
    resp = live_now.client.post("/v1/route", json={"to": RU, "segments": True})
    assert_error(resp, 422, "invalid_request", "segments")
    assert metric_sum(live_now.client, "router_decisions_total") == decisions


def test_mccmnc_with_another_countrys_mcc_is_rejected(live_now: LiveServer) -> None:
    """262 is Germany's MCC: an unknown German MNC cannot be the operator of a Russian number."""
    decisions = metric_sum(live_now.client, "router_decisions_total")
    resp = live_now.client.post("/v1/route", json={"to": RU2, "mccmnc": "26299"})
    assert_error(resp, 422, "invalid_request", "mccmnc")
    assert metric_sum(live_now.client, "router_decisions_total") == decisions


def test_boolean_is_not_a_cost(live_now: LiveServer, now_decision: str) -> None:
    outcomes = metric_sum(live_now.client, "router_outcomes_total")
    resp = live_now.client.post(
        "/v1/outcomes", json={"decision_id": now_decision, "event": "submit", "cost": True}
    )
    assert_error(resp, 422, "invalid_request", "cost")
    assert metric_sum(live_now.client, "router_outcomes_total") == outcomes


def test_ancient_timestamp_is_a_4xx_not_a_crash(live_now: LiveServer) -> None:
    """Year 1 in UTC is before year 1 in São Paulo: a local-hour overflow must not be a 500."""
    decisions = metric_sum(live_now.client, "router_decisions_total")
    resp = live_now.client.post("/v1/route", json={"to": BR, "at": "0001-01-01T00:00:00+00:00"})
    assert_error(resp, 422, "invalid_request", "at")
    live_now.client.close()  # a 500 closes the connection: reconnect
    live_now.client = httpx.Client(base_url=live_now.url, timeout=30)
    assert live_now.client.get("/healthz").status_code == 200
    assert metric_sum(live_now.client, "router_decisions_total") == decisions


def test_batch_with_a_crashing_item_routes_nothing_silently(live_now: LiveServer) -> None:
    """Either the batch answers per item, or it fails whole and nothing of it is logged."""
    decisions = metric_sum(live_now.client, "router_decisions_total")
    logged = decision_ids_logged(live_now.data_dir)
    items = [{"to": RU}, {"to": BR, "at": "0001-01-01T00:00:00+00:00"}]
    resp = live_now.client.post("/v1/route/batch", json=items)
    if resp.status_code >= 500:
        live_now.client.close()
        live_now.client = httpx.Client(base_url=live_now.url, timeout=30)
    new = decision_ids_logged(live_now.data_dir) - logged
    assert resp.status_code < 500, (
        f"{resp.status_code}: {resp.text[:300]}; decisions logged but never answered: {new}"
    )
    if resp.status_code == 200:
        answers = resp.json()
        assert "decision_id" in answers[0], answers
        assert answers[1]["error"]["field"] == "at", answers
    else:
        assert_error(resp, 422, "invalid_request", "at")
        assert new == set()
        assert metric_sum(live_now.client, "router_decisions_total") == decisions


def test_rejected_route_does_not_move_event_clock(live_now: LiveServer) -> None:
    """A request answered 'no eligible carrier' must not fire pending decisions' deadlines.

    Runs last on this server: if the product is wrong, the clock is 250 s ahead afterwards.
    """
    resp = live_now.client.post("/v1/route", json={"to": RU})
    assert resp.status_code == 200, resp.text
    did = resp.json()["decision_id"]
    learned = metric_sum(live_now.client, "router_learner_updates_total")
    body = {"to": RU, "sender_type": "shortcode", "exclude": ["globalprime"], "at": _in(250)}
    assert_error(live_now.client.post("/v1/route", json=body), 422, "no_eligible_carrier")
    view = live_now.client.get(f"/v1/decisions/{did}").json()
    assert view["state"]["learner_done"] is False, (
        f"a rejected request taught the learner: {view['state']}"
    )
    assert metric_sum(live_now.client, "router_learner_updates_total") == learned


# ---- last: server alive, nothing learned or logged, no number anywhere -------------------------


def test_zz_server_alive_nothing_learned_or_logged(server: LiveServer, baseline: Baseline) -> None:
    health = server.client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert server.proc.poll() is None

    decisions = metric_sum(server.client, "router_decisions_total")
    assert decisions == baseline.decisions + LEGIT["decisions"]
    assert metric_sum(server.client, "router_outcomes_total") == baseline.outcomes

    logged = decision_ids_logged(server.data_dir)
    assert baseline.logged_decisions <= logged
    assert len(logged) == len(baseline.logged_decisions) + LEGIT["decisions"]
    assert len(log_rows(server.data_dir, "outcomes")) == baseline.logged_outcomes

    assert_nothing_on_disk(server.data_dir)
    output = server.output()
    assert_no_number(output, LONG_LEAK_FORMS, "server output")
    assert "Traceback" not in output, output[-3000:]


def test_zz_no_number_leaked_by_the_server_without_replay(live_now: LiveServer) -> None:
    assert_nothing_on_disk(live_now.data_dir)
    assert_no_number(live_now.output(), LONG_LEAK_FORMS, "server output")
