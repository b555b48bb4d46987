"""A receipt's time from the carrier's clock: zones, offsets, minute precision, nothing refused.

Unit tests of `carriers.smpp.receipt_time` (the worker's side), then the router's side over HTTP: an
outcome whose time is impossible is recorded clamped and flagged, never refused, and a coarse
(minute-precision) receipt is judged against the SLA by the share of its interval within it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from carriers.smpp.dlr import Receipt, parse_receipt_text
from carriers.smpp.receipt_time import ReceiptClock, receipt_timezone
from router.core.engine import within_sla
from tests.conftest import LiveServer, start_server

T0 = datetime(2026, 12, 4, 14, 29, 0, tzinfo=UTC)


def _receipt(done: datetime | None, precision: float = 60.0) -> Receipt:
    if done is not None and precision == 60.0:
        done = done.replace(second=0, microsecond=0)
    return Receipt("1", "DELIVRD", "000", None, done, precision)


def test_ten_digit_dates_are_minutes_in_the_carrier_zone() -> None:
    """Appendix B's YYMMDDhhmm is read with minute precision, in the zone the link names."""
    text = "id:7 sub:001 dlvrd:001 submit date:2612041729 done date:2612041730 stat:DELIVRD err:0"
    moscow = parse_receipt_text(text, receipt_timezone("Europe/Moscow"))
    assert moscow.done_date == datetime(2026, 12, 4, 14, 30, tzinfo=UTC)
    assert moscow.date_precision_s == 60.0
    assert parse_receipt_text(text, receipt_timezone("+03:00")).done_date == moscow.done_date
    assert parse_receipt_text(text).done_date == datetime(2026, 12, 4, 17, 30, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["Mars/Olympus", "+3", "+25:00", "03:00"])
def test_bad_receipt_zone_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="receipt time zone"):
        receipt_timezone(bad)


def test_a_right_clock_is_left_alone_and_the_minute_becomes_an_interval() -> None:
    """Delivered at 14:29:40, stated 14:29, received 0.2 s later: the event lies in
    [14:29:00, 14:29:40.2] (the minute, cut at the arrival), not at 14:29:00."""
    clock = ReceiptClock()
    sent = T0.timestamp() + 35
    arrived = T0.timestamp() + 40.2
    placed = clock.place(_receipt(T0 + timedelta(seconds=40)), arrived, sent)
    assert placed.offset_s == 0.0 and placed.flags == ("coarse",)
    assert (placed.earliest, placed.latest) == (sent, arrived)
    assert placed.at == pytest.approx((sent + arrived) / 2)


def test_a_clock_three_minutes_fast_is_found_and_corrected() -> None:
    """Every receipt of a clock 180 s fast states a time up to 3 minutes in the future: within
    a few receipts the offset is known and the times land inside [submit, arrival]."""
    clock = ReceiptClock()
    base = T0.timestamp()
    placed = None
    for i in range(20):
        sent = base + 60 * i + 7 * (i % 5)
        done = sent + 2 + (i % 7)
        placed = clock.place(_receipt(datetime.fromtimestamp(done + 180, UTC)), done + 0.1, sent)
        assert sent <= placed.earliest <= placed.at <= placed.latest <= done + 0.1
    assert placed is not None and "clock_offset" in placed.flags
    assert 120 <= clock.offset_s <= 182


def test_an_unannounced_utc_plus_3_is_found_like_a_fast_clock() -> None:
    clock = ReceiptClock()
    base = T0.timestamp()
    for i in range(10):
        sent = base + 97 * i
        done = sent + 4
        local = datetime.fromtimestamp(done, UTC).replace(tzinfo=None) + timedelta(hours=3)
        placed = clock.place(_receipt(local.replace(tzinfo=UTC)), done + 0.2, sent)
        assert sent <= placed.at <= done + 0.2
    assert clock.offset_s == pytest.approx(3 * 3600, abs=60)


def test_impossible_and_missing_dates_never_lose_the_receipt() -> None:
    """No date, a date from another century, a date before the submit: a time is always given,
    inside [submit, arrival], and flagged."""
    clock = ReceiptClock()
    sent, arrived = T0.timestamp(), T0.timestamp() + 5
    assert clock.place(_receipt(None), arrived, sent).flags == ("no_date",)
    far = clock.place(_receipt(datetime(1999, 1, 1, tzinfo=UTC)), arrived, sent)
    assert far.at == arrived and far.flags == ("no_date",)
    early = ReceiptClock().place(_receipt(T0 - timedelta(seconds=30), 1.0), arrived, sent)
    assert early.at == sent and "clamped" in early.flags
    unknown_submit = ReceiptClock().place(_receipt(T0, 1.0), arrived, None)
    assert unknown_submit.at == T0.timestamp() and unknown_submit.flags == ()


def test_within_sla_weighs_a_coarse_interval() -> None:
    assert within_sla(30.0, 60.0) is True and within_sla(61.0, 60.0) is False
    assert within_sla(50.0, 60.0, 40.0, 80.0) == pytest.approx(0.5)
    assert within_sla(50.0, 60.0, 20.0, 50.0) == 1.0
    assert within_sla(70.0, 60.0, 61.0, 79.0) == 0.0


# ---- the router's side, over HTTP -------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A router in wall time (no --replay), so 'the future' means the router's clock."""
    srv = start_server(tmp_path_factory.mktemp("receipt-time"), "--no-mlflow", replay=False)
    yield srv
    srv.stop()


def _route(live: LiveServer) -> dict:
    resp = live.client.post("/v1/route", json={"to": "+4915123456789", "tenant": "acme"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _post(live: LiveServer, body: object) -> dict:
    resp = live.client.post("/v1/outcomes", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _metric(live: LiveServer, name: str, flag: str) -> float:
    text = live.client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(f'{name}{{flag="{flag}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_receipt_stated_before_its_decision_is_recorded_clamped(live: LiveServer) -> None:
    """The issue's 10-digit receipt 28.7 s 'before' its decision: recorded at the decision's
    time with a flag and the stated time kept, learned, counted; not a 422."""
    d = _route(live)
    at = datetime.fromisoformat(d["at"])
    stated = (at - timedelta(seconds=28.7)).isoformat()
    before = _metric(live, "router_outcome_time_adjusted_total", "before_decision")
    answer = _post(
        live, {"decision_id": d["decision_id"], "event": "dlr", "status": "DELIVRD", "at": stated}
    )
    assert answer["results"] == ["recorded"]
    view = live.client.get(f"/v1/decisions/{d['decision_id']}").json()
    (event,) = view["outcomes"]
    assert datetime.fromisoformat(event["at"]) == at
    assert event["at_flag"] == "before_decision"
    assert datetime.fromisoformat(event["at_source"]) == datetime.fromisoformat(stated)
    assert view["state"]["learner_done"] is True
    assert _metric(live, "router_outcome_time_adjusted_total", "before_decision") == before + 1


def test_a_receipt_from_the_future_is_recorded_at_the_router_clock(live: LiveServer) -> None:
    d = _route(live)
    far = (datetime.now(UTC) + timedelta(days=400)).isoformat()
    answer = _post(
        live, {"decision_id": d["decision_id"], "event": "dlr", "status": "UNDELIV", "at": far}
    )
    assert answer["results"] == ["recorded"]
    (event,) = live.client.get(f"/v1/decisions/{d['decision_id']}").json()["outcomes"]
    assert event["at_flag"] == "future"
    assert datetime.fromisoformat(event["at"]) <= datetime.now(UTC) + timedelta(seconds=1)


def test_a_coarse_receipt_keeps_its_interval_and_flags_in_the_log(live: LiveServer) -> None:
    d = _route(live)
    at = datetime.fromisoformat(d["at"])
    body = {
        "decision_id": d["decision_id"],
        "event": "dlr",
        "status": "DELIVRD",
        "at": (at + timedelta(seconds=30)).isoformat(),
        "at_earliest": (at + timedelta(seconds=10)).isoformat(),
        "at_latest": (at + timedelta(seconds=50)).isoformat(),
        "source_at": (at + timedelta(seconds=190)).replace(second=0).isoformat(),
        "at_flag": "coarse,clock_offset",
    }
    assert _post(live, body)["results"] == ["recorded"]
    view = live.client.get(f"/v1/decisions/{d['decision_id']}").json()
    (event,) = view["outcomes"]
    assert (event["latency_min_ms"], event["latency_max_ms"]) == (10_000, 50_000)
    assert event["at_flag"] == "coarse,clock_offset"
    assert view["state"]["learner_success"] == 1  # the whole interval is inside 60 s
    assert _metric(live, "router_outcome_time_adjusted_total", "coarse") >= 1


def test_submit_words_are_explicit(live: LiveServer) -> None:
    """SMPP names and numbers are failures; ACCEPTD (a receipt word) is refused, not learned."""
    ok, named, numbered, word = (_route(live) for _ in range(4))
    answers = _post(
        live,
        [
            {"decision_id": ok["decision_id"], "event": "submit", "status": "ESME_ROK"},
            {"decision_id": named["decision_id"], "event": "submit", "status": "ESME_RTHROTTLED"},
            {"decision_id": numbered["decision_id"], "event": "submit", "status": "0x0000000B"},
            {"decision_id": word["decision_id"], "event": "submit", "status": "connection_lost"},
        ],
    )
    assert answers["results"] == ["recorded"] * 4
    states = [
        live.client.get(f"/v1/decisions/{d['decision_id']}").json()["state"]
        for d in (ok, named, numbered, word)
    ]
    assert [s["final_status"] for s in states] == [None, *["SUBMIT_FAILED"] * 3]
    refused = live.client.post(
        "/v1/outcomes",
        json={"decision_id": ok["decision_id"], "event": "submit", "status": "ACCEPTD"},
    )
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "status"


def test_an_unconfirmed_submit_awaits_its_receipt_and_is_billed(live: LiveServer) -> None:
    """UNCONFIRMED (sent, no answer: the sender does not send it again) is not a failure: the
    decision waits for its receipt, and a carrier billing on submit bills it."""
    d = _route(live)
    did = d["decision_id"]
    answer = _post(live, {"decision_id": did, "event": "submit", "status": "UNCONFIRMED"})
    assert answer["results"] == ["recorded"]
    view = live.client.get(f"/v1/decisions/{did}").json()
    assert view["state"]["final_status"] is None  # pending, not SUBMIT_FAILED
    (submit,) = view["outcomes"]
    assert submit["status"] == "UNCONFIRMED"
    carrier = next(
        c for c in live.client.get("/v1/carriers").json()["carriers"] if c["id"] == d["carrier"]
    )
    if carrier["billing"] == "submit":
        assert submit["cost"] > 0
    else:
        assert not submit["cost"]
    _post(live, {"decision_id": did, "event": "dlr", "status": "DELIVRD"})
    view = live.client.get(f"/v1/decisions/{did}").json()
    assert view["state"]["final_status"] == "DELIVRD"


def test_the_log_holds_the_time_columns(live: LiveServer) -> None:
    """After the server stops, the outcome segments carry at_source/at_flag/latency bounds."""
    live.stop()
    rows = [
        r
        for path in sorted(Path(live.data_dir).rglob("outcomes/*.parquet"))
        for r in pq.read_table(path).to_pylist()
    ]
    flags = {r["at_flag"] for r in rows}
    assert {"before_decision", "future", "coarse,clock_offset"} <= flags
    coarse = next(r for r in rows if r["at_flag"] == "coarse,clock_offset")
    assert (coarse["latency_min_ms"], coarse["latency_max_ms"]) == (10_000, 50_000)
    assert coarse["at_source"] is not None


def test_fixed_offsets_are_zones() -> None:
    assert receipt_timezone("-0530") == timezone(-timedelta(hours=5, minutes=30))
    assert receipt_timezone(None) is UTC
