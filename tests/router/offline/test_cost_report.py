"""`router report cost`: totals that reconcile with the raw outcome log, hand-computed figures,
the previous-period change, the files written and clear errors."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from carriers.catalog import load_catalog
from router.cli import main
from router.log.decision_log import DecisionLog
from router.offline.cost_report import build_report, parse_when
from tests.bandit.test_ope import simulate

DAY1 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)


@pytest.fixture(scope="module")
def sim_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("sim") / "logs"
    simulate(load_catalog(), "uniform", 1, logs)
    return logs


def decision(i: int, at: datetime, carrier: str, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "decision_id": f"d{i}",
        "at": at,
        "tenant": "acme",
        "message_class": "otp",
        "country": "DE",
        "operator": "telekom",
        "mccmnc": "26201",
        "local_hour": 13,
        "weekday": 2,
        "segments": 1,
        "sender_type": "alphanumeric",
        "attempt": 1,
        "parent_decision_id": None,
        "eligible": ["onsubmit", "ondelivery"],
        "probabilities": [0.5, 0.5],
        "scores": [0.1, 0.1],
        "carrier": carrier,
        "propensity": 0.5,
        "fallbacks": [],
        "policy": "uniform",
        "policy_version": "1",
        "price": 0.01,
        "msisdn_hmac": f"h{i}",
    }
    row.update(changes)
    return row


def outcome(
    d: dict[str, Any], seconds: float, event: str, status: str, cost: float | None
) -> dict[str, Any]:
    return {
        "decision_id": d["decision_id"],
        "at": d["at"] + timedelta(seconds=seconds),
        "event": event,
        "status": status,
        "error_code": None,
        "cost": cost,
        "currency": "EUR" if cost is not None else None,
        "latency_ms": round(seconds * 1000),
        "carrier": d["carrier"],
        "tenant": d["tenant"],
    }


def write_log(directory: Path, rows: list[tuple[dict[str, Any], list[tuple]]]) -> Path:
    log = DecisionLog(directory)
    for d, events in rows:
        log.log_decision(d)
        for seconds, event, status, cost in events:
            log.log_outcome(outcome(d, seconds, event, status, cost))
    log.close()
    return directory


def raw_period(logs: Path, start: datetime | None, end: datetime | None) -> tuple[int, float]:
    """Decisions in [start, end) and the sum of their outcomes' cost, straight from the files."""
    decisions = pd.concat(
        pq.read_table(p).to_pandas() for p in sorted((logs / "decisions").glob("*.parquet"))
    )
    outcomes = pd.concat(
        pq.read_table(p).to_pandas() for p in sorted((logs / "outcomes").glob("*.parquet"))
    )
    keep = pd.Series(True, index=decisions.index)
    if start is not None:
        keep &= decisions["at"] >= pd.Timestamp(start)
    if end is not None:
        keep &= decisions["at"] < pd.Timestamp(end)
    ids = set(decisions.loc[keep, "decision_id"])
    costs = outcomes.loc[outcomes["decision_id"].isin(ids), "cost"].dropna()
    return len(ids), sum(float(c) for c in costs)


@pytest.mark.parametrize(
    ("start", "end"),
    [(None, None), ("2026-11-02T09:05", "2026-11-02T09:15"), ("2026-11-02T09:12", None)],
)
def test_totals_reconcile_with_the_raw_outcome_log(
    sim_logs: Path, start: str | None, end: str | None
) -> None:
    lo = parse_when(start) if start else None
    hi = parse_when(end) if end else None
    report = build_report(sim_logs, lo, hi, ("carrier", "country", "day"))
    messages, spend = raw_period(sim_logs, lo, hi)
    assert messages > 100
    assert report.totals["messages"] == messages
    assert math.isclose(report.totals["spend"], spend, rel_tol=1e-12)
    assert report.table["messages"].sum() == messages
    assert math.isclose(report.table["spend"].sum(), spend, rel_tol=1e-12)
    assert report.currency == "USD"


def test_hand_case_cost_per_delivered_and_retries(tmp_path: Path) -> None:
    t = DAY1
    d1 = decision(1, t, "onsubmit", segments=2)
    d2 = decision(2, t + timedelta(seconds=30), "ondelivery", segments=2, attempt=2)
    d2["parent_decision_id"] = "d1"
    d3 = decision(3, t + timedelta(seconds=40), "ondelivery")
    d4 = decision(4, t + timedelta(seconds=50), "onsubmit")
    d5 = decision(5, t + timedelta(seconds=60), "ondelivery")
    logs = write_log(
        tmp_path / "logs",
        [
            (d1, [(1, "submit", "ACCEPTED", 0.02), (20, "dlr", "UNDELIV", None)]),
            (d2, [(1, "submit", "ACCEPTED", None), (5, "dlr", "DELIVRD", 0.05)]),
            # billed on delivery, never delivered: costs nothing
            (d3, [(1, "submit", "ACCEPTED", None), (30, "dlr", "UNDELIV", None)]),
            # delivered after the 60 s OTP SLA
            (d4, [(1, "submit", "ACCEPTED", 0.01), (90, "dlr", "DELIVRD", None)]),
            (d5, [(1, "submit", "ACCEPTED", None), (10, "dlr", "DELIVRD", 0.025)]),
        ],
    )
    report = build_report(logs, by=["carrier"])
    rows = report.table.set_index("carrier")
    sub, dlv = rows.loc["onsubmit"], rows.loc["ondelivery"]
    assert (sub["messages"], sub["parts"], sub["delivered"]) == (2, 3, 1)
    assert (dlv["messages"], dlv["parts"], dlv["delivered"]) == (3, 4, 2)
    assert (sub["delivered_within_sla"], dlv["delivered_within_sla"]) == (0, 2)
    assert sub["spend"] == pytest.approx(0.03, rel=1e-12)
    assert dlv["spend"] == pytest.approx(0.075, rel=1e-12)
    assert sub["cost_per_delivered"] == pytest.approx(0.03, rel=1e-12)
    assert dlv["cost_per_delivered"] == pytest.approx(0.0375, rel=1e-12)
    assert sub["retries_share_of_spend"] == 0.0
    assert dlv["retries_share_of_spend"] == pytest.approx(0.05 / 0.075, rel=1e-12)
    assert math.isnan(dlv["spend_change_pct"])  # no --from/--to: no previous period
    totals = report.totals
    assert totals["messages"] == 5
    assert totals["spend"] == pytest.approx(0.105, rel=1e-12)
    assert totals["cost_per_delivered"] == pytest.approx(0.035, rel=1e-12)
    assert totals["retries_share_of_spend"] == pytest.approx(0.05 / 0.105, rel=1e-12)
    assert report.currency == "EUR"

    # a group with nothing delivered has no cost per delivered
    only_d3 = build_report(logs, DAY1 + timedelta(seconds=40), DAY1 + timedelta(seconds=41))
    assert math.isnan(only_d3.table.loc[0, "cost_per_delivered"])
    assert only_d3.table.loc[0, "spend"] == 0.0


def two_day_logs(directory: Path) -> Path:
    rows = []
    # day 1: two messages on `onsubmit`, both delivered, 0.01 each
    for i in range(2):
        d = decision(i, DAY1 + timedelta(minutes=i), "onsubmit")
        rows.append((d, [(1, "submit", "ACCEPTED", 0.01), (5, "dlr", "DELIVRD", None)]))
    # day 2: two on `onsubmit` at 0.015, one delivered; one on `ondelivery`, new that day
    for i in range(2):
        d = decision(10 + i, DAY2 + timedelta(minutes=i), "onsubmit")
        status = "DELIVRD" if i == 0 else "UNDELIV"
        rows.append((d, [(1, "submit", "ACCEPTED", 0.015), (5, "dlr", status, None)]))
    d = decision(20, DAY2, "ondelivery")
    rows.append((d, [(1, "submit", "ACCEPTED", None), (5, "dlr", "DELIVRD", 0.04)]))
    return write_log(directory, rows)


@pytest.mark.parametrize("by", [["carrier"], ["carrier", "day"]])
def test_change_against_previous_period(tmp_path: Path, by: list[str]) -> None:
    logs = two_day_logs(tmp_path / "logs")
    report = build_report(logs, parse_when("2025-01-02"), parse_when("2025-01-03"), by)
    rows = report.table.set_index("carrier")
    sub = rows.loc["onsubmit"]
    assert sub["spend"] == pytest.approx(0.03, rel=1e-12)
    assert sub["previous_spend"] == pytest.approx(0.02, rel=1e-12)
    assert sub["spend_change_pct"] == pytest.approx(50.0, rel=1e-9)
    assert sub["cost_per_delivered"] == pytest.approx(0.03, rel=1e-12)
    assert sub["previous_cost_per_delivered"] == pytest.approx(0.01, rel=1e-12)
    assert sub["cost_per_delivered_change_pct"] == pytest.approx(200.0, rel=1e-9)
    if "day" in by:
        assert sub["day"] == "2025-01-02"
    new = rows.loc["ondelivery"]
    assert math.isnan(new["previous_spend"]) and math.isnan(new["spend_change_pct"])
    assert report.totals["messages"] == 3
    assert report.totals["previous_spend"] == pytest.approx(0.02, rel=1e-12)
    assert report.totals["spend_change_pct"] == pytest.approx((0.07 / 0.02 - 1) * 100, rel=1e-9)
    first_day = build_report(logs, parse_when("2025-01-01"), parse_when("2025-01-02"), by)
    assert first_day.table["spend_change_pct"].isna().all()  # no earlier data


def test_cli_writes_csv_parquet_and_html(sim_logs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    args = ["report", "cost", "--logs", str(sim_logs), "--out", str(out)]
    span = ["--from", "2026-11-02T09:05", "--to", "2026-11-02T09:15"]
    assert main([*args, *span, "--by", "carrier,tenant,message_class"]) == 0
    printed = capsys.readouterr().out
    assert "cost_report.html" in printed and "total" in printed
    csv = pd.read_csv(out / "cost_report.csv")
    parquet = pd.read_parquet(out / "cost_report.parquet")
    assert list(csv.columns) == list(parquet.columns)
    assert list(csv.columns[:3]) == ["carrier", "tenant", "message_class"]
    assert len(csv) == len(parquet) > 1
    assert csv["spend"].sum() == pytest.approx(parquet["spend"].sum(), rel=1e-12)
    assert parquet["spend_change_pct"].notna().any()
    page = (out / "cost_report.html").read_text(encoding="utf-8")
    assert page.count("<img") == 2
    assert "2026-11-02 09:05 to 2026-11-02 09:15 UTC" in page
    assert "USD" in page and "cost_per_delivered" in page


def test_cli_errors(sim_logs: Path, tmp_path: Path, capsys) -> None:
    def run(*extra: str, logs: Path = sim_logs) -> str:
        argv = ["report", "cost", "--logs", str(logs), "--out", str(tmp_path / "o"), *extra]
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "no decisions/ folder" in run(logs=tmp_path)
    assert "unknown column(s) msisdn" in run("--by", "carrier,msisdn")
    assert "must be before" in run("--from", "2026-11-03", "--to", "2026-11-02")
    assert "must be before" in run("--from", "2026-11-02", "--to", "2026-11-02")
    assert "'2026-13-01' is not a date" in run("--from", "2026-13-01")
    assert "'yesterday' is not a date" in run("--to", "yesterday")
    assert not (tmp_path / "o").exists()
