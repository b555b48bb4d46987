"""Tests for the append-only Parquet decision log and its finalized view."""

from __future__ import annotations

import logging
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bandit.reward import MessageClass
from router.log.decision_log import (
    DECISION_SCHEMA,
    OUTCOME_SCHEMA,
    DecisionLog,
    SegmentWriter,
    finalized_view,
    iter_segments,
    read_stream,
)

ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def decision(i: int, **changes: Any) -> dict[str, Any]:
    """A complete decision record with id `d<i>`."""
    row: dict[str, Any] = {
        "decision_id": f"d{i}",
        "at": T0 + timedelta(seconds=i),
        "tenant": "plain",
        "message_class": "otp",
        "country": "RU",
        "operator": "mts",
        "mccmnc": "25001",
        "local_hour": 15,
        "weekday": 2,
        "segments": 1,
        "sender_type": "alphanumeric",
        "attempt": 1,
        "parent_decision_id": None,
        "eligible": ["c1", "c2", "c3"],
        "probabilities": [0.7, 0.2, 0.1],
        "scores": [0.08, 0.05, -0.01],
        "carrier": "c1",
        "propensity": 0.7,
        "fallbacks": ["c2", "c3"],
        "policy": "thompson",
        "policy_version": "7",
        "price": 0.021,
        "msisdn_hmac": "a1b2c3",
    }
    row.update(changes)
    return row


def outcome(decision_id: str, seconds: float, event: str, **fields: Any) -> dict[str, Any]:
    """An outcome event `seconds` after T0; fields not given are null."""
    row: dict[str, Any] = {
        "decision_id": decision_id,
        "at": T0 + timedelta(seconds=seconds),
        "event": event,
        "status": None,
        "error_code": None,
        "cost": None,
        "currency": None,
        "latency_ms": None,
        "carrier": "c1",
        "tenant": "plain",
        "at_source": None,
        "at_flag": None,
        "latency_min_ms": None,
        "latency_max_ms": None,
    }
    row.update(fields)
    return row


def ids(table: pa.Table) -> list[str]:
    """The decision ids of a table, in order."""
    return table.column("decision_id").to_pylist()


def files(directory: Path, pattern: str) -> list[Path]:
    """Files in a folder matching a glob pattern, sorted."""
    return sorted(directory.glob(pattern))


# --- writing and reading -------------------------------------------------------------------


def test_rolls_by_rows_and_close_rolls_the_rest(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path / "decisions", DECISION_SCHEMA, max_rows=3)
    for i in range(7):
        writer.append(decision(i))
    assert len(files(writer.directory, "*.parquet")) == 2
    assert writer.buffered_rows == 1
    (journal,) = files(writer.directory, "open-*.jsonl")
    assert len(journal.read_bytes().splitlines()) == 1

    last = writer.close()

    segments = list(iter_segments(tmp_path, "decisions"))
    assert [pq.read_metadata(p).num_rows for p in segments] == [3, 3, 1]
    assert segments[-1] == last
    assert files(writer.directory, "open-*") == []
    assert ids(read_stream(tmp_path, "decisions", DECISION_SCHEMA)) == [f"d{i}" for i in range(7)]
    with pytest.raises(RuntimeError, match="closed"):
        writer.append(decision(8))


def test_rolls_by_age_of_oldest_row(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, DECISION_SCHEMA, max_age_seconds=0.2)
    writer.append(decision(0))
    assert writer.roll_if_due() is None
    time.sleep(0.25)
    writer.append(decision(1))  # the oldest row is now too old: this append rolls both
    assert writer.buffered_rows == 0
    (segment,) = files(tmp_path, "*.parquet")
    assert pq.read_metadata(segment).num_rows == 2

    writer.append(decision(2))
    time.sleep(0.25)
    assert writer.roll_if_due() is not None  # a ticker can roll a quiet stream
    writer.close()
    assert len(files(tmp_path, "*.parquet")) == 2


def test_segment_names_and_format(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, OUTCOME_SCHEMA)
    writer.append(outcome("d1", 1, "submit"))
    path = writer.roll()
    assert path is not None
    prefix, stamp, seq, short_id = path.stem.split("-")
    assert (prefix, seq, len(short_id)) == ("part", "000000", 12)
    assert datetime.strptime(stamp, "%Y%m%dT%H%M%S")
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert writer.roll() is None  # nothing buffered
    writer.close()


def test_round_trip_keeps_lists_nulls_and_utc_instants(tmp_path: Path) -> None:
    moscow = timezone(timedelta(hours=3))
    decisions = [
        decision(1),
        decision(2, mccmnc=None, parent_decision_id="d1", attempt=2, fallbacks=[], scores=[]),
        decision(3, at=datetime(2025, 1, 1, 15, 0, 0, 123456, tzinfo=moscow)),
    ]
    outcomes = [
        outcome("d1", 1.5, "submit", cost=0.021, currency="EUR", error_code="000"),
        outcome("d1", 4, "dlr", status="DELIVRD", latency_ms=2500),
    ]
    log = DecisionLog(tmp_path)
    for row in decisions:
        log.log_decision(row)
    for row in outcomes:
        log.log_outcome(row)
    log.close()

    read_decisions = read_stream(tmp_path, "decisions", DECISION_SCHEMA)
    read_outcomes = read_stream(tmp_path, "outcomes", OUTCOME_SCHEMA)
    assert read_decisions.schema == DECISION_SCHEMA
    assert read_decisions.to_pylist() == decisions  # datetimes compare as instants
    assert read_outcomes.to_pylist() == outcomes
    third_at = read_decisions.column("at")[2].as_py()
    assert third_at.utcoffset() == timedelta(0)
    assert third_at == datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert log.decisions_dir == tmp_path / "decisions"
    assert log.outcomes_dir == tmp_path / "outcomes"


def test_segments_older_than_the_time_columns_still_read(tmp_path: Path) -> None:
    """An outcome segment written before at_source/at_flag/latency bounds existed reads with
    those columns null."""
    old_schema = pa.schema(
        [f for f in OUTCOME_SCHEMA if not f.name.startswith(("at_", "latency_m"))]
    )
    row = {
        k: v for k, v in outcome("d1", 4, "dlr", status="DELIVRD").items() if k in old_schema.names
    }
    (tmp_path / "outcomes").mkdir()
    pq.write_table(pa.Table.from_pylist([row], old_schema), tmp_path / "outcomes" / "0.parquet")
    (read,) = read_stream(tmp_path, "outcomes", OUTCOME_SCHEMA).to_pylist()
    assert read == outcome("d1", 4, "dlr", status="DELIVRD")


def test_empty_stream_reads_as_empty_table(tmp_path: Path) -> None:
    table = read_stream(tmp_path, "decisions", DECISION_SCHEMA)
    assert table.num_rows == 0
    assert table.schema == DECISION_SCHEMA


def test_iter_segments_lists_only_parquet_in_name_order(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path / "outcomes", OUTCOME_SCHEMA, max_rows=1)
    for i in range(3):
        writer.append(outcome(f"d{i}", i, "submit"))
    (tmp_path / "outcomes" / "notes.txt").write_text("not a segment")
    writer.append(outcome("d9", 9, "submit"))  # rolls immediately (max_rows=1)
    segments = list(iter_segments(tmp_path, "outcomes"))
    assert [p.suffix for p in segments] == [".parquet"] * 4
    assert segments == sorted(segments)
    assert ids(read_stream(tmp_path, "outcomes", OUTCOME_SCHEMA)) == ["d0", "d1", "d2", "d9"]
    writer.close()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (decision(1, colour="red"), "unknown field"),
        ({k: v for k, v in decision(1).items() if k != "carrier"}, "carrier"),
        (decision(1, propensity=None), "propensity"),
        (decision(1, local_hour="15"), "local_hour"),
        (decision(1, local_hour=300), "local_hour"),
        (decision(1, eligible=["c1", 2]), "eligible"),
        (decision(1, at=datetime(2025, 1, 1, 12)), "timezone-aware"),
        (decision(1, at="2025-01-01T12:00:00Z"), "timezone-aware"),
    ],
)
def test_bad_rows_are_refused_and_not_journaled(
    tmp_path: Path, row: dict[str, Any], message: str
) -> None:
    writer = SegmentWriter(tmp_path, DECISION_SCHEMA)
    with pytest.raises(ValueError, match=message):
        writer.append(row)
    assert writer.buffered_rows == 0
    assert files(tmp_path, "open-*") == []
    writer.close()
    assert files(tmp_path, "*.parquet") == []


# --- callbacks and threads -----------------------------------------------------------------


def test_on_roll_gets_every_segment_with_its_stream(tmp_path: Path) -> None:
    rolled: list[tuple[str, Path]] = []
    log = DecisionLog(
        tmp_path, max_rows=2, on_roll=lambda stream, path: rolled.append((stream, path))
    )
    for i in range(5):
        log.log_decision(decision(i))
    log.log_outcome(outcome("d0", 1, "submit"))
    assert [s for s, _ in rolled] == ["decisions", "decisions"]
    assert sorted(p.name for p in log.roll_all()) == sorted(p.name for _, p in rolled[2:])
    log.close()  # nothing left to roll

    assert [s for s, _ in rolled] == ["decisions"] * 3 + ["outcomes"]
    assert [p for s, p in rolled if s == "decisions"] == list(iter_segments(tmp_path, "decisions"))
    assert [p for s, p in rolled if s == "outcomes"] == list(iter_segments(tmp_path, "outcomes"))


def test_failing_on_roll_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(path: Path) -> None:
        raise RuntimeError("artifact store down")

    writer = SegmentWriter(tmp_path, OUTCOME_SCHEMA, max_rows=1, on_roll=explode)
    with caplog.at_level(logging.ERROR, logger="router.log.decision_log"):
        writer.append(outcome("d1", 1, "submit"))
    assert "on_roll callback failed" in caplog.text
    assert len(files(tmp_path, "*.parquet")) == 1
    writer.close()


def test_appends_from_many_threads_all_land_once(tmp_path: Path) -> None:
    rolled: list[Path] = []
    writer = SegmentWriter(tmp_path, DECISION_SCHEMA, max_rows=97, on_roll=rolled.append)

    def work(thread: int) -> None:
        for i in range(400):
            writer.append(decision(thread * 10_000 + i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()

    table = read_stream(tmp_path.parent, tmp_path.name, DECISION_SCHEMA)
    expected = {f"d{t * 10_000 + i}" for t in range(8) for i in range(400)}
    assert table.num_rows == len(expected) == 3200
    assert set(ids(table)) == expected
    assert sorted(rolled) == files(tmp_path, "*.parquet")
    sizes = [pq.read_metadata(p).num_rows for p in sorted(rolled)]
    assert sizes[:-1] == [97] * (len(sizes) - 1)
    assert sum(sizes) == 3200


# --- crash safety --------------------------------------------------------------------------

CHILD = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from router.log.decision_log import DECISION_SCHEMA, SegmentWriter
sys.path.insert(0, sys.argv[3])
from test_decision_log import decision

writer = SegmentWriter(Path(sys.argv[1]), DECISION_SCHEMA, max_rows=25)
start = int(sys.argv[2])
for i in range(start, start + 1_000_000):
    writer.append(decision(i))
    print(i, flush=True)
"""


def append_until_killed(directory: Path, start: int, acked_at_least: int) -> int:
    """Run a child that appends rows d<start>...; SIGKILL it mid-stream; return rows acked."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(start), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        cwd=ROOT,  # `python -c` puts the working directory on sys.path
    )
    assert child.stdout is not None
    acked = 0
    for line in child.stdout:
        acked = int(line) - start + 1
        if acked >= acked_at_least:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL, "the child must die mid-stream, not finish"
    return acked


def test_sigkill_mid_stream_loses_no_journaled_row(tmp_path: Path) -> None:
    directory = tmp_path / "decisions"
    first = append_until_killed(directory, 0, acked_at_least=260)
    second = append_until_killed(directory, 100_000, acked_at_least=140)  # also recovers the first

    recovered: list[Path] = []
    writer = SegmentWriter(directory, DECISION_SCHEMA, on_roll=recovered.append)
    assert files(directory, "open-*") == []
    assert files(directory, "*.tmp") == []
    for path in files(directory, "*.parquet"):
        assert pq.read_table(path).schema == DECISION_SCHEMA  # every segment opens
    got = ids(read_stream(tmp_path, "decisions", DECISION_SCHEMA))
    firsts = [int(i[1:]) for i in got if int(i[1:]) < 100_000]
    seconds = [int(i[1:]) - 100_000 for i in got if int(i[1:]) >= 100_000]
    # Contiguous, in write order, nothing doubled, and at least every acknowledged row.
    assert firsts == list(range(len(firsts))) and len(firsts) >= first
    assert seconds == list(range(len(seconds))) and len(seconds) >= second
    assert all(p in files(directory, "*.parquet") for p in recovered)
    writer.close()


def test_torn_last_line_is_skipped_and_stray_tmp_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def journal_line(row: dict[str, Any]) -> bytes:
        micros = (row["at"] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        return orjson.dumps({**row, "at": micros}) + b"\n"

    whole = journal_line(decision(1)) + journal_line(decision(2))
    torn = journal_line(decision(3))[:-40]
    (tmp_path / "open-0123456789abcdef0123456789abcdef.jsonl").write_bytes(whole + torn)
    (tmp_path / "part-20250101T000000-000007-deadbeefdead.parquet.tmp").write_bytes(b"PAR1 half")

    recovered: list[Path] = []
    with caplog.at_level(logging.WARNING, logger="router.log.decision_log"):
        writer = SegmentWriter(tmp_path, DECISION_SCHEMA, on_roll=recovered.append)

    assert "torn line 3" in caplog.text
    assert files(tmp_path, "open-*") == [] and files(tmp_path, "*.tmp") == []
    (segment,) = files(tmp_path, "*.parquet")
    assert recovered == [segment]
    assert segment.name.endswith("-0123456789ab.parquet")
    assert pq.read_table(segment).to_pylist() == [decision(1), decision(2)]
    writer.close()


def test_journal_of_an_already_written_segment_is_not_recovered_twice(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, OUTCOME_SCHEMA)
    writer.append(outcome("d1", 1, "submit"))
    writer.append(outcome("d2", 2, "submit"))
    (journal,) = files(tmp_path, "open-*.jsonl")
    saved = tmp_path.parent / "saved.jsonl"
    shutil.copy(journal, saved)
    segment = writer.close()
    shutil.copy(saved, journal)  # as if killed between the rename and the journal's deletion

    recovered: list[Path] = []
    SegmentWriter(tmp_path, OUTCOME_SCHEMA, on_roll=recovered.append).close()
    assert recovered == [segment]  # re-announced (its artifact may not have been logged)
    assert files(tmp_path, "open-*") == []
    assert ids(read_stream(tmp_path.parent, tmp_path.name, OUTCOME_SCHEMA)) == ["d1", "d2"]


# --- finalized view ------------------------------------------------------------------------

CLASSES = {
    "otp": MessageClass(
        "otp", value=1.0, sla_seconds=60, latency_penalty_per_second=0.01, dlr_timeout_seconds=3600
    ),
    "marketing": MessageClass("marketing", value=0.5, sla_seconds=3600, dlr_timeout_seconds=7200),
}

VIEW_DECISIONS = [
    decision(1),  # DELIVRD within SLA
    decision(2),  # DELIVRD after the SLA
    decision(3),  # ENROUTE then DELIVRD, billed on delivery
    decision(4),  # UNDELIV
    decision(5, tenant="conv"),  # lying DELIVRD: no conversion
    decision(6, tenant="conv"),  # DELIVRD and converted
    decision(7),  # the DELIVRD receipt arrives twice
    decision(8),  # pending: submitted, nothing since
    decision(9),  # timed out
    decision(10, message_class="marketing"),  # latency derived from event times
]

VIEW_OUTCOMES = [
    outcome("d1", 2, "submit", cost=0.02),
    outcome("d1", 6, "dlr", status="DELIVRD", latency_ms=5000),
    outcome("d2", 3, "submit", cost=0.02),
    outcome("d2", 92, "dlr", status="DELIVRD", latency_ms=90000),
    outcome("d3", 13, "dlr", status="DELIVRD", latency_ms=10000, cost=0.03),  # listed first
    outcome("d3", 4, "submit"),
    outcome("d3", 5, "dlr", status="ENROUTE", latency_ms=2000),
    outcome("d4", 5, "submit", cost=0.02),
    outcome("d4", 30, "dlr", status="UNDELIV", error_code="001"),
    outcome("d5", 6, "submit", cost=0.02),
    outcome("d5", 8, "dlr", status="DELIVRD", latency_ms=3000),
    outcome("d6", 7, "submit", cost=0.02),
    outcome("d6", 10, "dlr", status="DELIVRD", latency_ms=4000),
    outcome("d6", 30, "conversion"),
    outcome("d7", 15, "dlr", status="DELIVRD", latency_ms=8000, cost=0.01),  # the repeat
    outcome("d7", 8, "submit", cost=0.02),
    outcome("d7", 13, "dlr", status="DELIVRD", latency_ms=6000, cost=0.01),
    outcome("d8", 9, "submit", cost=0.02),
    outcome("d9", 10, "submit", cost=0.02),
    outcome("d9", 3700, "timeout"),
    outcome("d10", 11, "submit", cost=0.005),
    outcome("d10", 130, "dlr", status="DELIVRD"),  # no latency_ms: 130 s - 10 s = 120 s
    outcome("unknown", 5, "dlr", status="DELIVRD"),  # ignored
]

NAN = math.nan
# decision: delivered, latency_ms, within_sla, converted, cost, n_events, final_status, final,
#           success, reward
EXPECTED = {
    "d1": (True, 5000.0, True, False, 0.02, 2, "DELIVRD", True, 1.0, 1 - 0.02 - 0.05),
    "d2": (True, 90000.0, False, False, 0.02, 2, "DELIVRD", True, 0.0, -0.02 - 0.60),
    "d3": (True, 10000.0, True, False, 0.03, 3, "DELIVRD", True, 1.0, 1 - 0.03 - 0.10),
    "d4": (False, NAN, False, False, 0.02, 2, "UNDELIV", True, 0.0, -0.02),
    "d5": (True, 3000.0, True, False, 0.02, 2, "DELIVRD", True, 0.0, -0.02 - 0.03),
    "d6": (True, 4000.0, True, True, 0.02, 3, "DELIVRD", True, 1.0, 1 - 0.02 - 0.04),
    "d7": (True, 6000.0, True, False, 0.03, 2, "DELIVRD", True, 1.0, 1 - 0.03 - 0.06),
    "d8": (False, NAN, False, False, 0.02, 1, "PENDING", False, 0.0, -0.02),
    "d9": (False, NAN, False, False, 0.02, 2, "TIMEOUT", True, 0.0, -0.02),
    "d10": (True, 120000.0, True, False, 0.005, 2, "DELIVRD", True, 1.0, 0.5 - 0.005),
}
VIEW_COLUMNS = [
    "delivered",
    "latency_ms",
    "delivered_within_sla",
    "converted",
    "cost",
    "n_events",
    "final_status",
    "final",
    "success",
    "reward",
]


def logged_tables(directory: Path) -> tuple[pa.Table, pa.Table]:
    """The view's decisions and outcomes, written through a DecisionLog and read back."""
    log = DecisionLog(directory)
    for row in VIEW_DECISIONS:
        log.log_decision(row)
    for row in VIEW_OUTCOMES:
        log.log_outcome(row)
    log.close()
    return (
        read_stream(directory, "decisions", DECISION_SCHEMA),
        read_stream(directory, "outcomes", OUTCOME_SCHEMA),
    )


def assert_expected(view: Any) -> None:
    """Compare a finalized view with EXPECTED, column by column, exactly (floats to 1e-12)."""
    assert list(view["decision_id"]) == list(EXPECTED)
    for decision_id, expected in EXPECTED.items():
        row = view.loc[view["decision_id"] == decision_id].iloc[0]
        for column, want in zip(VIEW_COLUMNS, expected, strict=True):
            got = row[column]
            if isinstance(want, float) and math.isnan(want):
                assert math.isnan(got), (decision_id, column, got)
            elif isinstance(want, float):
                assert got == pytest.approx(want, abs=1e-12), (decision_id, column, got)
            else:
                assert got == want, (decision_id, column, got)


def test_finalized_view_hand_computed(tmp_path: Path) -> None:
    decisions, outcomes = logged_tables(tmp_path)
    view = finalized_view(decisions, outcomes, CLASSES, conversion_tenants={"conv"})
    assert_expected(view)
    kept = {"decision_id", "at", "tenant", "message_class", "country", "operator", "carrier"}
    kept |= {"attempt", "parent_decision_id", "propensity", "segments", "policy"}
    kept |= {"policy_version", "local_hour"}
    assert kept <= set(view.columns)
    assert view["delivered"].dtype == bool and view["final"].dtype == bool
    assert view["n_events"].dtype == "int64"


def test_finalized_view_accepts_dataframes(tmp_path: Path) -> None:
    decisions, outcomes = logged_tables(tmp_path)
    view = finalized_view(decisions.to_pandas(), outcomes.to_pandas(), CLASSES, ["conv"])
    assert_expected(view)


def test_finalized_view_as_of_closes_expired_records(tmp_path: Path) -> None:
    decisions, outcomes = logged_tables(tmp_path)
    # d8 was decided at T0+8s; the otp DLR timeout is one hour.
    before = finalized_view(
        decisions, outcomes, CLASSES, ["conv"], as_of=T0 + timedelta(seconds=3607)
    )
    after = finalized_view(
        decisions, outcomes, CLASSES, ["conv"], as_of=T0 + timedelta(seconds=3608)
    )
    d8 = before["decision_id"] == "d8"
    assert not before.loc[d8, "final"].item()
    assert after.loc[d8, "final"].item()
    assert after.loc[d8, "final_status"].item() == "PENDING"
    assert before.drop(index=before.index[d8]).equals(after.drop(index=after.index[d8]))


def test_finalized_view_without_outcomes_is_all_pending() -> None:
    decisions = pa.Table.from_pylist(VIEW_DECISIONS[:3], schema=DECISION_SCHEMA)
    view = finalized_view(decisions, OUTCOME_SCHEMA.empty_table(), CLASSES, [])
    assert list(view["final_status"]) == ["PENDING"] * 3
    assert list(view["n_events"]) == [0, 0, 0]
    assert list(view["reward"]) == [0.0, 0.0, 0.0]


def test_finalized_view_names_unknown_message_class() -> None:
    decisions = pa.Table.from_pylist(
        [decision(1), decision(2, message_class="carrier-pigeon")], schema=DECISION_SCHEMA
    )
    with pytest.raises(ValueError, match="carrier-pigeon"):
        finalized_view(decisions, OUTCOME_SCHEMA.empty_table(), CLASSES, [])
