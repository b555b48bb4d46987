"""Privacy scan: after a real run, no raw phone number anywhere (DESIGN.md: keyed HMAC only).

A live `router serve` (its state shared on a Redis, whose content and files are scanned too)
takes routes, outcomes and bad input carrying phone numbers (invalid ones,
and numbers in every wrong field); then `router evaluate` and `router report cost` run on its
logs and `router experiment run` plays a short scenario into a temporary MLflow store. Every
number used, in E.164 with and without '+', its national digits and its national and
international formats, is then looked for in every file under the data dirs (Parquet decoded,
the SQLite stores dumped, and the raw bytes), the server's output, /metrics and every answer.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers
import pyarrow.parquet as pq
import pytest
import redis
import yaml

from carriers.catalog import load_catalog
from experiments.world import World, load_scenario
from tests.conftest import T0, LiveServer, start_server
from tests.redis_server import RedisServer, redis_from_env

ROOT = Path(__file__).resolve().parents[1]
AFTER = "2026-11-02T10:00:07+00:00"
LATER = "2026-11-02T13:00:00+00:00"

GOOD = ["+79161234567", "+79031234567", "+4915112345678", "+919876543210", "+5511987654321"]
BAD_TO = [
    "+7000123456",  # +7 but not a valid number
    "+4930123456",  # a landline
    "+447700900123",  # a reserved range
    "79165554433",  # no '+'
    "8 (916) 765-43-21",  # national format
    "+7 916 765 43 22",  # spaced
]
# Numbers put in the wrong field, each its own, so a hit names the field that leaked.
WRONG = {
    "tenant": "+79169990011",
    "message_class": "+79169990022",
    "exclude": "+79169990033",
    "parent_decision_id": "79169990044",
    "decision_path": "79169990055",
    "outcome_decision_id": "79169990066",
    "error_code": "79169990077",
    "submit_status": "+79169990088",
    "pause_reason": "+79169990099",
    "carrier_path": "79169990100",
    "country": "+79169990111",
    "mccmnc": "79169990122",
    "sender_type": "+79169990133",
    "batch_tenant": "+79169990144",
}
DIGIT_RUN = re.compile(r"(?<![.\d])\d{7,}")


def _variants(number: str) -> set[str]:
    """The ways a number can be written: as given, E.164 with and without '+', national digits
    and the national and international formats."""
    out = {number, re.sub(r"\D", "", number)}
    for region in (None, "RU"):
        try:
            num = phonenumbers.parse(number, region)
        except phonenumbers.NumberParseException:
            continue
        e164 = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
        national = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.NATIONAL)
        out |= {
            e164,
            e164.lstrip("+"),
            national,
            re.sub(r"\D", "", national),
            phonenumbers.national_significant_number(num),
            phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.INTERNATIONAL),
        }
        break
    return {v for v in out if sum(c.isdigit() for c in v) >= 7}


@dataclass
class Needles:
    """What to look for: digit strings (found inside any run of digits) and formatted ones."""

    digits: dict[str, str] = field(default_factory=dict)  # digits -> the number it comes from
    literal: dict[str, str] = field(default_factory=dict)

    def add(self, number: str, variants: Iterable[str]) -> None:
        """Look for these variants of `number`."""
        for v in variants:
            (self.digits if v.isdigit() else self.literal)[v] = number

    def hits(self, text: str) -> Iterator[tuple[str, str]]:
        """(variant, number) found in `text`; digit runs after a '.' (decimals) are skipped."""
        lengths = sorted({len(d) for d in self.digits})
        for m in DIGIT_RUN.finditer(text):
            run = m.group()
            for n in lengths:
                for i in range(len(run) - n + 1):
                    if run[i : i + n] in self.digits:
                        yield run[i : i + n], self.digits[run[i : i + n]]
        for v, number in self.literal.items():
            if v in text:
                yield v, number


def _texts(path: Path) -> Iterator[str]:
    """A file's raw bytes as text, plus its decoded content where it is Parquet or SQLite."""
    raw = path.read_bytes()
    yield raw.decode("latin-1")
    if path.suffix == ".parquet":
        yield str(pq.read_table(path).to_pylist())
    if raw[:16] == b"SQLite format 3\x00":
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            yield "\n".join(db.iterdump())


@dataclass
class Run:
    """Everything the workload produced that must be scanned."""

    roots: list[Path]
    answers: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _post(live: LiveServer, run: Run, path: str, body: object, ok: bool) -> dict:
    resp = live.client.post(path, json=body)
    run.answers.append(resp.text)
    assert (resp.status_code == 200) == ok, (path, body, resp.text)
    return resp.json()


def _serve_workload(live: LiveServer, run: Run) -> None:
    """Routes, outcomes and bad input with numbers in them."""
    decisions = []
    for i, to in enumerate(GOOD * 4):
        tenant = ("acme", "default", "initech")[i % 3]
        d = _post(live, run, "/v1/route", {"to": to, "at": T0, "tenant": tenant}, ok=True)
        decisions.append(d["decision_id"])
    batch = [{"to": to, "at": T0} for to in GOOD] + [{"to": to, "at": T0} for to in BAD_TO]
    batch.append({"to": GOOD[0], "at": T0, "tenant": WRONG["batch_tenant"]})
    answers = _post(live, run, "/v1/route/batch", batch, ok=True)
    assert sum("error" in a for a in answers) == len(BAD_TO) + 1
    decisions += [a["decision_id"] for a in answers if "decision_id" in a]
    events = []
    for i, did in enumerate(decisions):
        events.append({"decision_id": did, "event": "submit", "status": "ACCEPTED", "at": AFTER})
        events.append({"decision_id": did, "event": "dlr", "status": "DELIVRD", "at": AFTER})
        if i % 3 == 0:
            events.append({"decision_id": did, "event": "conversion", "at": AFTER})
    _post(live, run, "/v1/outcomes", events, ok=True)
    # hours later in event time: the decisions above settle (deadlines, conversion windows)
    _post(live, run, "/v1/route", {"to": GOOD[2], "at": LATER}, ok=True)

    for to in BAD_TO:
        _post(live, run, "/v1/route", {"to": to, "at": T0}, ok=False)
    good = {"to": GOOD[0], "at": T0}
    for name in ("tenant", "message_class", "sender_type", "mccmnc", "parent_decision_id"):
        _post(live, run, "/v1/route", {**good, name: WRONG[name]}, ok=False)
    _post(live, run, "/v1/route", {**good, "exclude": [WRONG["exclude"]]}, ok=False)
    _post(live, run, "/v1/route", {**good, "to": None, "tenant": GOOD[1]}, ok=False)
    did = _post(live, run, "/v1/route", {"to": GOOD[1], "at": T0}, ok=True)["decision_id"]
    bad_events = [
        {"decision_id": WRONG["outcome_decision_id"], "event": "dlr", "status": "DELIVRD"},
        {
            "decision_id": did,
            "event": "dlr",
            "status": "UNDELIV",
            "error_code": WRONG["error_code"],
        },
        {"decision_id": did, "event": "submit", "status": WRONG["submit_status"]},
        {"decision_id": did, "event": GOOD[2]},
        {"decision_id": did, "event": "dlr", "status": "DELIVRD", "cost": GOOD[3]},
    ]
    for ev in bad_events:
        _post(live, run, "/v1/outcomes", {**ev, "at": AFTER}, ok=False)
    for path in (
        f"/v1/decisions/{WRONG['decision_path']}",
        f"/v1/carriers?country={WRONG['country']}",
        f"/v1/decisions/{GOOD[4]}",
    ):
        resp = live.client.get(path)
        run.answers.append(resp.text)
        assert resp.status_code >= 400, resp.text
    for path, body in (
        (f"/v1/carriers/{WRONG['carrier_path']}/pause", None),
        ("/v1/carriers/rulocal/pause", {"reason": f"call {WRONG['pause_reason']}"}),
    ):
        resp = live.client.post(path, json=body)
        run.answers.append(resp.text)
        assert resp.status_code >= 400, resp.text
    metrics = live.client.get("/metrics")
    assert metrics.status_code == 200
    run.answers.append(metrics.text)


def _spawn(*args: str) -> subprocess.Popen[str]:
    """Start a `router` command (the commands run side by side: each spends seconds importing)."""
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(run: Run, *procs: subprocess.Popen[str]) -> None:
    """Wait for the commands; their output is scanned too."""
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        run.outputs += [out, err]
        assert proc.returncode == 0, (proc.args, err[-3000:])


def _redis_dump(r: redis.Redis, prefix: str) -> str:
    """Every key under `prefix` and its value, as text."""
    readers = {
        b"string": r.get,
        b"hash": r.hgetall,
        b"list": lambda k: r.lrange(k, 0, -1),
        b"set": r.smembers,
        b"zset": lambda k: r.zrange(k, 0, -1, withscores=True),
        b"stream": r.xrange,
    }
    lines = [f"{key!r}: {readers[r.type(key)](key)!r}" for key in r.scan_iter(f"{prefix}*")]
    assert lines, "the shared state is in Redis"
    return "\n".join(lines)


TINY_SCENARIO = {
    "name": "privacy",
    "seed": 3,
    "start": "2026-11-02T09:00:00Z",
    "duration_minutes": 6,
    "traffic": {
        "rate_per_second": 1.0,
        "diurnal_amplitude": 0.0,
        "countries": {"DE": 0.5, "RU": 0.5},
        "tenants": {"acme": 0.5, "default": 0.5},
        "classes": {"otp": 1.0},
    },
    "defaults": {"deliver": 0.8, "latency_median_s": 8},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The workload: serve, evaluate, report, experiment."""
    tmp = tmp_path_factory.mktemp("privacy")
    data = tmp / "data"
    result = Run(roots=[tmp])
    scenario = tmp / "privacy.yaml"
    scenario.write_text(yaml.safe_dump(TINY_SCENARIO))
    experiment = _spawn(
        "experiment", "run", str(scenario), "--policies", "thompson", "--out", str(tmp / "exp")
    )
    redis_srv = redis_from_env(tmp / "redis")  # a private server keeps its files in `tmp`
    with redis_srv.client() as r:  # REDIS_URL's server may hold an earlier run's
        for key in r.scan_iter("privacy*"):
            r.delete(key)
    live = start_server(data, "--redis-url", redis_srv.url, "--redis-prefix", "privacy")
    try:
        _serve_workload(live, result)
    finally:
        assert live.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
    result.outputs.append(live.output())
    with redis_srv.client() as r:
        result.outputs.append(_redis_dump(r, "privacy"))
    if isinstance(redis_srv, RedisServer):
        redis_srv.stop()
    logs = str(data / "decision_log")
    _finish(
        result,
        experiment,
        _spawn(
            "evaluate",
            "--logs",
            logs,
            "--candidate",
            "uniform",
            "--bootstrap",
            "0",
            "--out",
            str(tmp / "eval"),
        ),
        _spawn("report", "cost", "--logs", logs, "--by", "tenant,day", "--out", str(tmp / "rep")),
    )
    return result


def _needles() -> Needles:
    needles = Needles()
    for number in [*GOOD, *BAD_TO, *WRONG.values()]:
        needles.add(number, _variants(number))
    return needles


def test_the_workload_wrote_what_is_scanned(run: Run) -> None:
    files = [p for root in run.roots for p in root.rglob("*") if p.is_file()]
    names = {p.suffix for p in files}
    assert {".parquet", ".db", ".html", ".csv", ".json", ".png", ".log"} <= names, names
    assert any("decisions" in p.parts for p in files if p.suffix == ".parquet")
    assert any("mlartifacts" in p.parts for p in files)
    assert len(run.answers) > 30 and any("router_decisions_total" in a for a in run.answers)


def test_no_raw_phone_number_anywhere(run: Run) -> None:
    needles = _needles()
    assert len(needles.digits) > 50 and len(needles.literal) > 20
    found: dict[str, set[str]] = {}
    for i, text in enumerate(run.answers + run.outputs):
        for variant, number in needles.hits(text):
            found.setdefault(f"answer/output #{i}: {text[:300]}", set()).add(f"{number}={variant}")
    for root in run.roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            for text in _texts(path):
                for variant, number in needles.hits(text):
                    found.setdefault(str(path.relative_to(root)), set()).add(f"{number}={variant}")
    assert not found, found


def test_no_simulated_number_in_the_experiment(run: Run) -> None:
    """The simulator's own numbers (every one it could draw) are not in its logs either."""
    catalog = load_catalog()
    world = World(load_scenario(run.roots[0] / "privacy.yaml", catalog), catalog)
    needles = Needles()
    for pool in world.numbers.values():
        for number, _ in pool:
            needles.add(number, {number, number.lstrip("+")})
    assert len(needles.digits) > 100
    found = set()
    for path in (run.roots[0] / "exp").rglob("*"):
        if path.is_file():
            for text in _texts(path):
                found |= {f"{path.name}: {n}" for _, n in needles.hits(text)}
    assert not found, sorted(found)[:20]
