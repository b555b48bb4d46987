"""Append-only, crash-safe Parquet log of routing decisions and their outcomes.

Each stream (`decisions`, `outcomes`) is a folder of immutable Parquet segments plus at most one
open JSON-lines journal. A row is written to the journal (flushed to the OS) before `append`
returns; a roll writes the buffered rows as one segment atomically (tmp file, fsync, rename, fsync
of the folder) and only then deletes the journal. A segment is named after its journal, so a
process killed at any moment leaves only complete segments and journals, and the next writer on
the folder turns leftover journals into segments exactly once: no journaled row is lost or doubled.
A live writer holds an exclusive `flock` on its journal, so several processes can share one folder
(replicas, worker processes): each recovers only the journals of dead writers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bandit.reward import MessageClass, reward_array
from router.contract.messages import FINAL_DLR, SUBMIT_OK

logger = logging.getLogger(__name__)

DECISIONS = "decisions"
OUTCOMES = "outcomes"

_UTC_US = pa.timestamp("us", tz="UTC")

DECISION_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("at", _UTC_US, nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("message_class", pa.string(), nullable=False),
        pa.field("country", pa.string(), nullable=False),
        pa.field("operator", pa.string(), nullable=False),
        pa.field("mccmnc", pa.string()),
        pa.field("local_hour", pa.int8(), nullable=False),
        pa.field("weekday", pa.int8(), nullable=False),
        pa.field("segments", pa.int16(), nullable=False),
        pa.field("sender_type", pa.string(), nullable=False),
        pa.field("attempt", pa.int16(), nullable=False),
        pa.field("parent_decision_id", pa.string()),
        pa.field("eligible", pa.list_(pa.string()), nullable=False),
        pa.field("probabilities", pa.list_(pa.float64()), nullable=False),
        pa.field("scores", pa.list_(pa.float64()), nullable=False),
        pa.field("carrier", pa.string(), nullable=False),
        pa.field("propensity", pa.float64(), nullable=False),
        pa.field("fallbacks", pa.list_(pa.string()), nullable=False),
        pa.field("policy", pa.string(), nullable=False),
        pa.field("policy_version", pa.string(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("msisdn_hmac", pa.string(), nullable=False),
    ]
)

OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("at", _UTC_US, nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("status", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("cost", pa.float64()),
        pa.field("currency", pa.string()),
        pa.field("latency_ms", pa.int64()),
        pa.field("carrier", pa.string(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        # How the event time was derived (added 2026-12; older segments read them as null):
        pa.field("at_source", _UTC_US),  # the time as the sender/carrier stated it, if adjusted
        pa.field(
            "at_flag", pa.string()
        ),  # comma-separated words, see router.core.engine.TIME_FLAGS
        pa.field("latency_min_ms", pa.int64()),  # a coarse time's interval (minute precision)
        pa.field("latency_max_ms", pa.int64()),
    ]
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_SEGMENT_ID_LEN = 12
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


class SegmentWriter:
    """One stream of the log: journals every row, rolls buffered rows into Parquet segments."""

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        max_rows: int = 50_000,
        max_age_seconds: float = 300.0,
        on_roll: Callable[[Path], None] | None = None,
        validate: bool = True,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if max_age_seconds <= 0:
            raise ValueError("max_age_seconds must be > 0")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.max_rows = max_rows
        self.max_age_seconds = max_age_seconds
        self._on_roll = on_roll
        self.validate = validate
        self._columns: list[str] = schema.names
        self._timestamps = [f.name for f in schema if pa.types.is_timestamp(f.type)]
        self._required = [f.name for f in schema if not f.nullable]
        self._validators = [(f.name, _validator(f.type)) for f in schema]
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._oldest = 0.0
        self._journal: int | None = None
        self._journal_id = ""
        self._closed = False
        self._owner: str | None = None
        # segments made from dead writers' journals, with the owner their writer had declared
        self.recovered: dict[Path, str | None] = {}
        self._seq = _next_seq(self.directory)
        for path in self._recover():
            self._notify(path)

    def set_owner(self, owner: str | None) -> None:
        """Name who this writer writes for (the serving process's MLflow run id): every journal
        gets an `open-<id>.owner` file beside it, so that if this process dies, the process
        that recovers the journal knows whose segment it makes (`recovered`)."""
        with self._lock:
            self._owner = owner
            if self._journal is not None:
                self._write_owner()

    def _write_owner(self) -> None:
        """Write the current journal's owner file (caller holds the lock)."""
        path = self.directory / f"open-{self._journal_id}.owner"
        if self._owner is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(self._owner)

    def append(self, row: Mapping[str, Any]) -> None:
        """Journal one row (flushed to the OS before returning) and roll when the buffer is due."""
        record, line = self._encode(row)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"segment writer for {self.directory} is closed")
            journal = self._journal if self._journal is not None else self._open_journal()
            _append_line(journal, line)
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.append(record)
            path = self._roll_after_append()
        self._notify(path)

    def roll(self) -> Path | None:
        """Write the buffered rows as one segment now; None when nothing is buffered."""
        with self._lock:
            path = self._roll_locked()
        self._notify(path)
        return path

    def roll_if_due(self) -> Path | None:
        """Roll only if the buffer is full or too old; lets a quiet stream roll from a ticker."""
        with self._lock:
            path = self._roll_locked() if self._due() else None
        self._notify(path)
        return path

    def close(self) -> Path | None:
        """Roll what is left and refuse further appends."""
        with self._lock:
            if self._closed:
                return None
            try:
                path = self._roll_locked()
            finally:
                self._closed = True
                self._close_journal()
        self._notify(path)
        return path

    @property
    def buffered_rows(self) -> int:
        """Rows journaled but not yet in a segment."""
        with self._lock:
            return len(self._rows)

    def _encode(self, row: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Validate a row against the schema; return its journal form and journal line.

        With `validate` off (rows built by the engine itself) only the timestamps are converted:
        the checks and JSON round trip cost more than the decision they log.
        """
        if not self.validate:
            encoded = {name: row.get(name) for name in self._columns}
            for name in self._timestamps:
                encoded[name] = _to_micros("row", name, encoded[name])
            return encoded, orjson.dumps(encoded, option=_JSON_OPTIONS)
        label = f"{self.directory.name} row"
        unknown = [name for name in row if name not in self._columns]
        if unknown:
            raise ValueError(f"{label}: unknown field(s) {unknown}")
        encoded = {name: row.get(name) for name in self._columns}
        for name in self._timestamps:
            encoded[name] = _to_micros(label, name, encoded[name])
        try:
            line = orjson.dumps(encoded, option=_JSON_OPTIONS)
        except TypeError as exc:
            raise ValueError(f"{label}: {exc}") from exc
        record = orjson.loads(line)
        missing = [name for name in self._required if record[name] is None]
        if missing:
            raise ValueError(f"{label}: missing or null required field(s) {missing}")
        wrong = [
            f"{name} (expected {self.schema.field(name).type})"
            for name, fits in self._validators
            if record[name] is not None and not fits(record[name])
        ]
        if wrong:
            raise ValueError(f"{label}: wrong type for field(s) {', '.join(wrong)}")
        return record, line

    def _open_journal(self) -> int:
        """Start a new journal file; its id also names the segment it becomes."""
        self._journal_id = uuid.uuid4().hex
        path = self.directory / f"open-{self._journal_id}.jsonl"
        self._journal = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(self._journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if self._owner is not None:
            self._write_owner()
        return self._journal

    def _close_journal(self) -> None:
        """Close the journal's file descriptor, if one is open."""
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    def _due(self) -> bool:
        """Whether the buffer has reached max_rows or its oldest row max_age_seconds."""
        if not self._rows:
            return False
        too_old = time.monotonic() - self._oldest >= self.max_age_seconds
        return len(self._rows) >= self.max_rows or too_old

    def _roll_after_append(self) -> Path | None:
        """Roll if due; a failure keeps the rows journaled and buffered for the next try."""
        if not self._due():
            return None
        try:
            return self._roll_locked()
        except Exception:
            logger.exception("rolling %s failed; rows stay journaled, retrying", self.directory)
            return None

    def _roll_locked(self) -> Path | None:
        """Write the buffer as a segment, then drop the journal (caller holds the lock)."""
        if not self._rows:
            return None
        path = self._write_segment(self._rows, self._journal_id[:_SEGMENT_ID_LEN])
        self._rows = []
        self._close_journal()
        (self.directory / f"open-{self._journal_id}.jsonl").unlink(missing_ok=True)
        (self.directory / f"open-{self._journal_id}.owner").unlink(missing_ok=True)
        return path

    def _write_segment(self, rows: list[dict[str, Any]], segment_id: str) -> Path:
        """Write rows atomically as `part-<utc>-<seq>-<id>.parquet` (tmp, fsync, rename)."""
        table = pa.Table.from_pylist(rows, schema=self.schema)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        final = self.directory / f"part-{stamp}-{self._seq:06d}-{segment_id}.parquet"
        self._seq += 1
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        return final

    def _recover(self) -> list[Path]:
        """Turn journals left by dead writers into segments; delete their stray tmp files.
        Journals that a live writer holds (flock) are left alone."""
        locks = [(journal, _try_lock(journal)) for journal in self.directory.glob("open-*.jsonl")]
        live = {j.stem.removeprefix("open-")[:_SEGMENT_ID_LEN] for j, fd in locks if fd is None}
        for tmp in self.directory.glob("*.tmp"):
            if tmp.name.removesuffix(".parquet.tmp")[-_SEGMENT_ID_LEN:] not in live:
                tmp.unlink(missing_ok=True)
        for owner in self.directory.glob("open-*.owner"):  # its journal rolled, then a crash
            if not owner.with_suffix(".jsonl").exists():
                owner.unlink(missing_ok=True)
        dead = sorted(((j, fd) for j, fd in locks if fd is not None), key=_mtime)
        try:
            recovered = [self._recover_journal(journal) for journal, _ in dead]
        finally:
            for _, fd in dead:
                os.close(fd)
        return [path for path in recovered if path is not None]

    def _recover_journal(self, journal: Path) -> Path | None:
        """Make one leftover journal a segment, unless it was rolled before the crash."""
        segment_id = journal.stem.removeprefix("open-")[:_SEGMENT_ID_LEN]
        done = sorted(self.directory.glob(f"part-*-{segment_id}.parquet"))
        if done:
            path: Path | None = done[0]
        else:
            rows = _read_journal(journal)
            path = self._write_segment(rows, segment_id) if rows else None
            if path is not None:
                logger.warning("recovered %d row(s) from %s into %s", len(rows), journal, path)
        owner_file = journal.with_suffix(".owner")
        try:
            owner: str | None = owner_file.read_text().strip() or None
        except FileNotFoundError:
            owner = None
        if path is not None:
            self.recovered[path] = owner
        journal.unlink()
        owner_file.unlink(missing_ok=True)
        return path

    def _notify(self, path: Path | None) -> None:
        """Tell on_roll about a new segment; its failures are logged, never raised."""
        if path is None or self._on_roll is None:
            return
        try:
            self._on_roll(path)
        except Exception:
            logger.exception("on_roll callback failed for %s", path)


class DecisionLog:
    """The decision and outcome streams of one log folder, as two segment writers."""

    def __init__(
        self,
        directory: Path,
        max_rows: int = 50_000,
        max_age_seconds: float = 300.0,
        on_roll: Callable[[str, Path], None] | None = None,
        validate: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self._writers = {
            stream: SegmentWriter(
                self.directory / stream,
                schema,
                max_rows=max_rows,
                max_age_seconds=max_age_seconds,
                on_roll=_bind_stream(on_roll, stream),
                validate=validate,
            )
            for stream, schema in ((DECISIONS, DECISION_SCHEMA), (OUTCOMES, OUTCOME_SCHEMA))
        }

    @property
    def decisions_dir(self) -> Path:
        """Folder of the decision segments."""
        return self._writers[DECISIONS].directory

    @property
    def outcomes_dir(self) -> Path:
        """Folder of the outcome segments."""
        return self._writers[OUTCOMES].directory

    def set_owner(self, owner: str | None) -> None:
        """Name the owner of this process's journals (see `SegmentWriter.set_owner`)."""
        for writer in self._writers.values():
            writer.set_owner(owner)

    def recovered_owner(self, path: Path) -> str | None:
        """The owner declared by the dead writer whose journal became this segment (None when
        it declared none, or the segment was not recovered by this log)."""
        for writer in self._writers.values():
            if path in writer.recovered:
                return writer.recovered[path]
        return None

    def log_decision(self, row: Mapping[str, Any]) -> None:
        """Append one decision record (see DECISION_SCHEMA)."""
        self._writers[DECISIONS].append(row)

    def log_outcome(self, row: Mapping[str, Any]) -> None:
        """Append one outcome event (see OUTCOME_SCHEMA)."""
        self._writers[OUTCOMES].append(row)

    def roll_all(self) -> list[Path]:
        """Roll both streams now; returns the new segments."""
        return [p for p in (w.roll() for w in self._writers.values()) if p is not None]

    def roll_due(self) -> list[Path]:
        """Roll the streams whose buffer is full or too old; call it from a periodic ticker."""
        return [p for p in (w.roll_if_due() for w in self._writers.values()) if p is not None]

    def close(self) -> None:
        """Roll what is left in both streams and close them."""
        for writer in self._writers.values():
            writer.close()


def iter_segments(directory: Path, stream: str) -> Iterator[Path]:
    """The finished segments of a stream, in the order they were written."""
    yield from sorted((Path(directory) / stream).glob("*.parquet"))


def logged_outcomes(directory: Path, keys: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (decision_id, outcome signature) keys an outcome folder holds already,
    in its segments or open journals (used when a replayed outbox journal might repeat a row
    its dead writer had logged; a rare path, so it reads the folder)."""
    from router.core.engine import outcome_signature  # the engine imports this module

    wanted = {did for did, _ in keys}
    found: set[tuple[str, str]] = set()

    def look(did: str, event: str, status: str | None) -> None:
        if did in wanted:
            key = (did, outcome_signature(event, status))
            if key in keys:
                found.add(key)

    directory = Path(directory)
    for journal in directory.glob("open-*.jsonl"):  # journals first: one rolled meanwhile
        try:  # is then among the segments read below
            rows = _read_journal(journal)
        except FileNotFoundError:
            continue
        for row in rows:
            look(row.get("decision_id"), row.get("event"), row.get("status"))
    value_set = pa.array(sorted(wanted), pa.string())
    for path in sorted(directory.glob("*.parquet")):
        table = pq.read_table(path, columns=["decision_id", "event", "status"])
        table = table.filter(pc.is_in(table["decision_id"], value_set=value_set))
        for row in table.to_pylist():
            look(row["decision_id"], row["event"], row["status"])
    return found


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A segment's table in `schema`: nullable columns it predates are added as nulls."""
    for field in schema:
        if field.name not in table.column_names and field.nullable:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def read_stream(directory: Path, stream: str, schema: pa.Schema) -> pa.Table:
    """All segments of a stream as one table; an empty table with the schema when none."""
    tables = []
    for path in iter_segments(directory, stream):
        with pq.ParquetFile(path) as segment:
            tables.append(conform(segment.read(), schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


_VIEW_DECISION_COLUMNS = [f.name for f in DECISION_SCHEMA if not pa.types.is_list(f.type)]
_VIEW_REQUIRED_DECISION_COLUMNS = ["decision_id", "at", "tenant", "message_class"]
_VIEW_OUTCOME_COLUMNS = ["decision_id", "at", "event", "status", "cost", "latency_ms"]


def finalized_view(
    decisions: pa.Table | pd.DataFrame,
    outcomes: pa.Table | pd.DataFrame,
    classes: Mapping[str, MessageClass],
    conversion_tenants: Collection[str],
    as_of: datetime | None = None,
) -> pd.DataFrame:
    """One row per decision joined with its outcomes: delivery, latency, cost, success, reward.

    Outcome events are deduplicated on (decision, event, status), keeping the earliest, so a
    repeated receipt changes nothing. Latency is the outcome's `latency_ms`, or the time from the
    decision to the event when that is missing. Outcomes of unknown decisions are ignored.
    """
    table = _unique_decisions(
        _table(decisions, _VIEW_DECISION_COLUMNS, _VIEW_REQUIRED_DECISION_COLUMNS)
    )
    params = _class_params(table["message_class"], classes)
    decided_us = _micros(table["at"])
    ev = _Events(_table(outcomes, _VIEW_OUTCOME_COLUMNS, _VIEW_OUTCOME_COLUMNS), table)
    delivered = ev.is_dlr & ev.status_in(["DELIVRD"])
    final = ev.is_dlr & ev.status_in(FINAL_DLR)
    rejected = ev.event_is("submit") & ev.has_status() & ~ev.status_in(SUBMIT_OK)
    submit_failed = ev.any_per(rejected)  # no status on a submit means accepted
    latency_ms = ev.per_decision(delivered, ev.latency_ms(decided_us), np.nan)
    within_sla = latency_ms <= params["sla_seconds"] * 1000.0
    converted = ev.any_per(ev.event_is("conversion"))
    timed_out = ev.any_per(ev.event_is("timeout"))
    has_final = ev.any_per(final)
    final_status = ev.per_decision(final, ev.statuses(), None, last=True)
    converts = _is_in(table["tenant"], conversion_tenants)
    success = np.where(converts, converted, within_sla).astype(float)

    view = table.to_pandas()
    view["delivered"] = ev.any_per(delivered)
    view["latency_ms"] = latency_ms
    view["delivered_within_sla"] = within_sla
    view["converted"] = converted
    view["cost"] = ev.sum_per(ev.cost)
    view["n_events"] = ev.count_per()
    view["final_status"] = np.select(
        [has_final, submit_failed, timed_out],
        [final_status, "SUBMIT_FAILED", "TIMEOUT"],
        "PENDING",
    ).astype(str)
    view["final"] = has_final | submit_failed | timed_out | _expired(decided_us, params, as_of)
    view["success"] = success
    view["reward"] = reward_array(
        params["value"],
        success,
        view["cost"].to_numpy(),
        latency_ms / 1000.0,
        params["sla_seconds"],
        params["latency_penalty_per_second"],
    )
    return view


class _Events:
    """Outcome events of known decisions in event-time order, each (event, status) once."""

    def __init__(self, outcomes: pa.Table, decisions: pa.Table) -> None:
        self._n = decisions.num_rows
        ids = decisions["decision_id"].combine_chunks()
        pos = _numpy(pc.fill_null(pc.index_in(outcomes["decision_id"], value_set=ids), -1))
        at_us = _micros(outcomes["at"])
        event, self._event_names = _codes(outcomes["event"])
        status, self._status_names = _codes(outcomes["status"])
        order = np.argsort(at_us, kind="stable")
        order = order[pos[order] >= 0]
        key = (pos[order] * len(self._event_names) + event[order]) * len(
            self._status_names
        ) + status[order]
        rows = order[~pd.Series(key).duplicated().to_numpy()]
        self.pos = pos[rows].astype(np.int64)
        self.at_us = at_us[rows]
        self._event = event[rows]
        self._status = status[rows]
        self.cost = np.nan_to_num(_floats(outcomes["cost"])[rows])
        self._latency_ms = _floats(outcomes["latency_ms"])[rows]
        self.is_dlr = self.event_is("dlr")

    def event_is(self, name: str) -> np.ndarray:
        """Mask of the events of one kind."""
        return np.isin(self._event, _indices(self._event_names, [name]))

    def status_in(self, names: Collection[str]) -> np.ndarray:
        """Mask of the events whose status is one of `names`."""
        return np.isin(self._status, _indices(self._status_names, names))

    def has_status(self) -> np.ndarray:
        """Mask of events that carry a status."""
        present = np.array([name is not None for name in self._status_names], dtype=bool)
        return present[self._status]

    def statuses(self) -> np.ndarray:
        """Each event's status as an object array (None when missing)."""
        return np.array(self._status_names, dtype=object)[self._status]

    def latency_ms(self, decided_us: np.ndarray) -> np.ndarray:
        """Each event's latency_ms, or event time minus decision time when it is missing."""
        derived = (self.at_us - decided_us[self.pos]) / 1000.0
        return np.where(np.isnan(self._latency_ms), derived, self._latency_ms)

    def any_per(self, mask: np.ndarray) -> np.ndarray:
        """Per decision: whether any of its events is in the mask."""
        return np.bincount(self.pos[mask], minlength=self._n) > 0

    def sum_per(self, values: np.ndarray) -> np.ndarray:
        """Per decision: the sum of `values` over its events."""
        return np.bincount(self.pos, weights=values, minlength=self._n)

    def count_per(self) -> np.ndarray:
        """Per decision: how many (distinct) events it has."""
        return np.bincount(self.pos, minlength=self._n).astype(np.int64)

    def per_decision(
        self, mask: np.ndarray, values: np.ndarray, default: object, last: bool = False
    ) -> np.ndarray:
        """Per decision: `values` of its first (or last) masked event in time; else default."""
        pos = self.pos[mask]
        keep = ~pd.Series(pos).duplicated(keep="last" if last else "first").to_numpy()
        out = np.full(self._n, default, dtype=values.dtype)
        out[pos[keep]] = values[mask][keep]
        return out


def _table(data: pa.Table | pd.DataFrame, columns: list[str], required: list[str]) -> pa.Table:
    """The known, non-list columns of a table or frame, as an Arrow table."""
    names = data.column_names if isinstance(data, pa.Table) else list(data.columns)
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"missing column(s) {missing}")
    present = [c for c in columns if c in names]
    if isinstance(data, pa.Table):
        return data.select(present)
    return pa.table({name: _arrow_column(data[name]) for name in present})


def _arrow_column(series: pd.Series) -> pa.Array:
    """A pandas column as Arrow; tz-aware times go via UTC (pyarrow's own path is deprecated)."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        utc = pa.array(series.dt.tz_convert(None).to_numpy())
        return utc.cast(pa.timestamp(series.dtype.unit, tz="UTC"))
    return pa.array(series)


def _unique_decisions(table: pa.Table) -> pa.Table:
    """The table with only the first row of each decision_id."""
    ids = table["decision_id"]
    if pc.count_distinct(ids).as_py() == len(ids):
        return table
    first = pc.index_in(pc.unique(ids), value_set=ids.combine_chunks())
    return table.take(pc.sort_indices(first))


def _class_params(
    message_class: pa.ChunkedArray, classes: Mapping[str, MessageClass]
) -> dict[str, np.ndarray]:
    """Per-decision arrays of the reward settings of its message class."""
    names = list(classes)
    index = _numpy(pc.fill_null(pc.index_in(message_class, pa.array(names, pa.string())), -1))
    if (index < 0).any():
        unknown = sorted(set(_numpy(message_class)[index < 0]), key=str)
        raise ValueError(f"unknown message class(es) {unknown}; known: {sorted(names)}")
    fields = ("value", "sla_seconds", "latency_penalty_per_second", "dlr_timeout_seconds")
    return {
        field: np.array([getattr(classes[c], field) for c in names], dtype=float)[index]
        for field in fields
    }


def _expired(
    decided_us: np.ndarray, params: dict[str, np.ndarray], as_of: datetime | None
) -> np.ndarray:
    """Whether each decision's DLR timeout has passed at `as_of` (never, without as_of)."""
    if as_of is None:
        return np.zeros(len(decided_us), dtype=bool)
    as_of_us = _to_micros("as_of", "as_of", as_of)
    return decided_us + params["dlr_timeout_seconds"] * 1e6 <= as_of_us


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str | None]]:
    """Integer codes of a string column and the value of each code (code 0 is null)."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    codes = _numpy(pc.fill_null(encoded.indices, -1)).astype(np.int64) + 1
    return codes, [None, *encoded.dictionary.to_pylist()]


def _indices(names: list[str | None], wanted: Collection[str]) -> list[int]:
    """The codes of the wanted values among `names`."""
    return [i for i, name in enumerate(names) if name is not None and name in wanted]


def _is_in(column: pa.ChunkedArray, values: Collection[str]) -> np.ndarray:
    """Mask of the rows whose value is one of `values` (null is never in)."""
    mask = pc.is_in(column, value_set=pa.array(list(values), pa.string()))
    return _numpy(pc.fill_null(mask, False)).astype(bool)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64 with NaN for null."""
    return _numpy(column.cast(pa.float64())).astype(float)


def _numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow column as a NumPy array (copying when needed)."""
    return column.to_numpy(zero_copy_only=False)


def _micros(at: pa.ChunkedArray) -> np.ndarray:
    """Timestamps as int64 microseconds since the epoch (naive ones are taken as UTC)."""
    us = pc.cast(at, pa.timestamp("us", tz="UTC"), safe=False)
    return _numpy(us.cast(pa.int64())).astype(np.int64)


def _to_micros(label: str, name: str, value: object) -> int | None:
    """A timezone-aware datetime as integer microseconds since the epoch."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{label}: field {name!r} must be a timezone-aware datetime")
    return (value - _EPOCH) // _ONE_US


def _validator(data_type: pa.DataType) -> Callable[[Any], bool]:
    """A check that a non-null JSON value (a row's journal form) fits an Arrow column type."""
    if pa.types.is_string(data_type):
        return lambda v: isinstance(v, str)
    if pa.types.is_integer(data_type) or pa.types.is_timestamp(data_type):
        bounds = np.iinfo(
            np.int64 if pa.types.is_timestamp(data_type) else data_type.to_pandas_dtype()
        )
        return lambda v: type(v) is int and bounds.min <= v <= bounds.max
    if pa.types.is_floating(data_type):
        return lambda v: type(v) in (int, float)
    if pa.types.is_list(data_type):
        item = _validator(data_type.value_type)
        nullable = data_type.value_field.nullable
        return lambda v: isinstance(v, list) and all(nullable if x is None else item(x) for x in v)
    raise TypeError(f"unsupported column type {data_type}")


def _append_line(fd: int, line: bytes) -> None:
    """Append one journal line with write(2); undo a partial line if the disk refuses."""
    offset = os.lseek(fd, 0, os.SEEK_END)
    try:
        rest = memoryview(line)
        while rest:
            rest = rest[os.write(fd, rest) :]
    except OSError:
        os.ftruncate(fd, offset)
        raise


def _read_journal(journal: Path) -> list[dict[str, Any]]:
    """The complete rows of a journal; a torn or corrupt line is skipped with a warning."""
    rows = []
    for number, line in enumerate(journal.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            logger.warning("skipping torn line %d of journal %s", number, journal)
    return rows


def _try_lock(journal: Path) -> int | None:
    """An fd holding the journal's exclusive lock, or None if a live writer holds it."""
    try:
        fd = os.open(journal, os.O_RDONLY)
    except FileNotFoundError:
        return None  # rolled by its writer meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _mtime(item: tuple[Path, int]) -> int:
    """A journal's modification time (recovery order)."""
    return os.fstat(item[1]).st_mtime_ns


def _next_seq(directory: Path) -> int:
    """One past the highest segment sequence number in the folder, so names sort in order."""
    fields = (p.name.split("-") for p in directory.glob("part-*-*-*.parquet"))
    return max((int(f[2]) for f in fields if f[2].isdigit()), default=-1) + 1


def _fsync_dir(directory: Path) -> None:
    """Make a rename in the folder durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bind_stream(
    on_roll: Callable[[str, Path], None] | None, stream: str
) -> Callable[[Path], None] | None:
    """Adapt a (stream, path) callback to one stream's (path) callback."""
    if on_roll is None:
        return None
    return lambda path: on_roll(stream, path)
