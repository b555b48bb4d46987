"""Off-policy evaluation of candidate policies over a decision-log folder, streamed by partition.

The join of decisions with their outcomes must see every outcome of a decision, and outcomes of
one decision can sit in any later outcome segment. So logs larger than `rows_per_partition`
decisions are first split (one streaming pass, batch by batch) into P = ⌈decisions /
rows_per_partition⌉ temporary Parquet partitions by a hash of `decision_id`, outcomes with the
same hash; each partition then holds whole decisions with all their outcomes and is joined with
`router.log.decision_log.finalized_view` on its own. Memory bound: one partition (≈
rows_per_partition decisions, their outcomes and the joined view; roughly 1-2 kB per decision)
plus one chunk of flattened eligible sets, or while splitting, one source row group and the
split buffer; the reward model's per-key sums and prediction cache are O(carriers × contexts),
the accumulators O(1). Disk: one temporary copy of the logs when P > 1.

Pass 1 adds each decision's reward to the reward model's per-fold, per-key sums and fits one
ridge model per cross-fitting fold (`bandit.reward_model`); pass 2 predicts q̂ for every
eligible carrier of a decision with the model that never saw that decision's fold, computes each
candidate's π over the logged eligible set and feeds `bandit.ope` accumulators (and a histogram
of the importance weights), which merge across partitions (and machines). Retries (attempt > 1)
are decisions like any other, each over its own logged eligible set (which lacks the carriers it
excluded). A decision is evaluated once its reward is settled: `as_of` is past its SLA plus grace
(and its conversion window, for tenants that report conversions); that cut depends on time and
context only, never on the carrier chosen.
"""

from __future__ import annotations

import importlib
import math
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bandit.ope import Accumulator, Bootstrap, Estimate, W, WeightHistogram, z_matrix
from bandit.reward import MessageClass
from bandit.reward_model import CrossFitRewardModel, fold_of
from carriers.catalog import Catalog
from router.log.decision_log import (
    DECISION_SCHEMA,
    DECISIONS,
    OUTCOME_SCHEMA,
    OUTCOMES,
    finalized_view,
    iter_segments,
)

OUTCOME_COLUMNS = ["decision_id", "at", "event", "status", "cost", "latency_ms"]

# ---- logged decisions with their eligible sets flattened ------------------------------------


@dataclass(frozen=True)
class LoggedChunk:
    """A chunk of settled decisions; per-pair arrays run over every (decision, eligible carrier)."""

    table: pa.Table
    reward: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    position: np.ndarray
    carrier: np.ndarray
    probabilities: np.ndarray
    scores: np.ndarray
    chosen: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table, reward: np.ndarray) -> LoggedChunk:
        """Flatten the eligible lists and locate each logged carrier in its own list."""
        lengths = _numpy(pc.list_value_length(table["eligible"])).astype(np.int64)
        if (lengths < 1).any():
            raise ValueError("a decision has an empty eligible set")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        rows = np.repeat(np.arange(len(lengths)), lengths)
        carrier = _numpy(pc.list_flatten(table["eligible"])).astype(object)
        probs = _numpy(pc.list_flatten(table["probabilities"])).astype(float)
        scores = _numpy(pc.list_flatten(table["scores"])).astype(float)
        if len(probs) != len(carrier) or len(scores) != len(carrier):
            raise ValueError("probabilities and scores must align with the eligible lists")
        logged = _numpy(table["carrier"]).astype(object)
        chosen = np.flatnonzero(carrier == logged[rows])
        if len(chosen) != len(lengths) or not np.array_equal(rows[chosen], np.arange(len(lengths))):
            raise ValueError("each logged carrier must appear exactly once in its eligible set")
        propensity = _numpy(table["propensity"]).astype(float)
        if not np.allclose(propensity, probs[chosen], rtol=1e-9, atol=1e-12):
            raise ValueError("a logged propensity differs from π of its logged carrier")
        return cls(
            table,
            np.asarray(reward, dtype=float),
            offsets,
            rows,
            np.arange(len(rows)) - offsets[rows],
            carrier,
            probs,
            scores,
            chosen,
        )

    @property
    def n(self) -> int:
        """Number of decisions."""
        return len(self.chosen)

    def per_pair(self, column: str) -> np.ndarray:
        """A decision column repeated for each of its eligible carriers."""
        return _numpy(self.table[column])[self.rows]

    def row_sum(self, values: np.ndarray) -> np.ndarray:
        """Per decision: the sum of a per-pair array over its eligible carriers."""
        return np.bincount(self.rows, weights=values, minlength=self.n)


# ---- candidate policies ---------------------------------------------------------------------


class Candidate(Protocol):
    """A candidate policy: π per (decision, eligible carrier) pair of a chunk."""

    def __call__(self, chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
        """π over each logged eligible set, flattened like the chunk's pairs."""


def _first_per_row(chunk: LoggedChunk, *keys: np.ndarray) -> np.ndarray:
    """One-hot π on the pair with the smallest keys (first key first), ties to the earlier pair."""
    order = np.lexsort((chunk.position, *reversed(keys), chunk.rows))
    pi = np.zeros(len(chunk.rows))
    pi[order[chunk.offsets[:-1]]] = 1.0
    return pi


def _lookup(values: np.ndarray, table: Mapping[Any, float], what: str) -> np.ndarray:
    """Map each value through `table`, naming the first value it lacks."""
    uniq, inverse = np.unique(values, return_inverse=True)
    missing = [u for u in uniq if u not in table]
    if missing:
        raise ValueError(f"the catalog has no {what} for {missing[0]!r}")
    return np.array([table[u] for u in uniq], dtype=float)[inverse]


def _priority(chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
    """Catalog priority of each pair's carrier."""
    table = {c.id: float(c.priority) for c in catalog.carriers.values()}
    return _lookup(chunk.carrier, table, "carrier")


def _unit_price(chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
    """Catalog price per part of each pair's carrier for the decision's country and operator."""
    codes, keys = pd.MultiIndex.from_arrays(
        [chunk.carrier, chunk.per_pair("country"), chunk.per_pair("operator")]
    ).factorize()
    prices = np.empty(len(keys))
    for i, (carrier_id, country, operator) in enumerate(keys):
        car = catalog.carriers.get(carrier_id)
        if car is None or country not in car.coverage:
            raise ValueError(
                f"the catalog has no price (carrier|country|operator) for "
                f"{carrier_id!r}|{country!r}|{operator!r}"
            )
        prices[i] = car.coverage[country].price_for(operator)
    return prices[codes]


def uniform(chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
    """An equal share for every logged eligible carrier."""
    return 1.0 / np.diff(chunk.offsets)[chunk.rows]


def static_priority(chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
    """Failover: the eligible carrier with the best (lowest) catalog priority."""
    return _first_per_row(chunk, _priority(chunk, catalog))


def cheapest(chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
    """Least cost: the cheapest eligible carrier (then priority, then logged order)."""
    return _first_per_row(chunk, _unit_price(chunk, catalog), _priority(chunk, catalog))


def logged(chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
    """The logging policy itself (its value is the on-policy mean reward)."""
    return chunk.probabilities


@dataclass(frozen=True)
class EpsilonGreedy:
    """The best logged score (expected utility of the serving model), uniform with prob. ε."""

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")

    def __call__(self, chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
        """(1 − ε) one-hot on the best logged score + ε uniform."""
        best = _first_per_row(chunk, -chunk.scores)
        return (1.0 - self.epsilon) * best + self.epsilon * uniform(chunk, catalog)


@dataclass(frozen=True)
class PythonPolicy:
    """A user's class (`module:Class`) with `probabilities(record, catalog)` over its eligible."""

    path: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module_name, _, class_name = self.path.partition(":")
        if not module_name or not class_name:
            raise ValueError(f"policy path {self.path!r} must look like 'package.module:Class'")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None:
            raise ValueError(f"module {module_name!r} has no class {class_name!r}")
        object.__setattr__(self, "_policy", cls(**self.params))

    def __call__(self, chunk: LoggedChunk, catalog: Catalog) -> np.ndarray:
        """The user's π for each record, checked and concatenated."""
        parts = []
        for record in chunk.table.to_pylist():
            pi = np.asarray(self._policy.probabilities(record, catalog), dtype=float)
            if pi.shape != (len(record["eligible"]),) or not math.isclose(pi.sum(), 1.0):
                raise ValueError(
                    f"{self.path}: probabilities must sum to 1 over the eligible set "
                    f"(decision {record['decision_id']})"
                )
            parts.append(pi)
        return np.concatenate(parts) if parts else np.zeros(0)


BUILTIN: dict[str, Callable[..., Candidate]] = {
    "uniform": lambda: uniform,
    "static": lambda: static_priority,
    "cheapest": lambda: cheapest,
    "logged": lambda: logged,
    "greedy": lambda: EpsilonGreedy(0.0),
    "epsilon_greedy": EpsilonGreedy,
}


def make_candidate(spec: str, **params: Any) -> Candidate:
    """A built-in candidate by name (with parameters) or a user's `module:Class`."""
    if ":" in spec:
        return PythonPolicy(spec, params)
    factory = BUILTIN.get(spec)
    if factory is None:
        raise ValueError(f"unknown candidate {spec!r}; built-in: {', '.join(sorted(BUILTIN))}")
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"candidate {spec!r}: {exc}") from None


# ---- reward model for DM / DR ---------------------------------------------------------------


@dataclass
class RewardModel:
    """The cross-fitted ridge reward model (`bandit.reward_model`) on a chunk's decisions."""

    n_folds: int = 5
    alpha: float = 5.0
    band_hours: int = 6
    model: CrossFitRewardModel = field(init=False)

    def __post_init__(self) -> None:
        self.model = CrossFitRewardModel(self.n_folds, self.alpha)

    def keys(self, chunk: LoggedChunk, pairs: bool) -> pd.DataFrame:
        """The model's key columns for each pair (or each logged action)."""
        idx = chunk.rows if pairs else np.arange(chunk.n)
        column = {c: _numpy(chunk.table[c])[idx] for c in ("message_class", "country", "tenant")}
        return pd.DataFrame(
            {
                "carrier": chunk.carrier if pairs else chunk.carrier[chunk.chosen],
                **column,
                "operator": _numpy(chunk.table["operator"])[idx],
                "band": _numpy(chunk.table["local_hour"]).astype(np.int64)[idx] // self.band_hours,
                "retry": _numpy(chunk.table["attempt"])[idx] > 1,
            }
        )

    def folds(self, chunk: LoggedChunk, pairs: bool) -> np.ndarray:
        """Each pair's (or decision's) cross-fitting fold, from its decision id."""
        fold = fold_of(_numpy(chunk.table["decision_id"]), self.n_folds)
        return fold[chunk.rows] if pairs else fold

    def update(self, chunk: LoggedChunk) -> None:
        """Add the chunk's logged actions and rewards (pass 1)."""
        self.model.update(self.keys(chunk, False), self.folds(chunk, False), chunk.reward)

    def fit(self) -> RewardModel:
        """Fit the per-fold models; returns self."""
        self.model.fit()
        return self

    def predict(self, chunk: LoggedChunk) -> np.ndarray:
        """Cross-fitted q̂ for every (decision, eligible carrier) pair of the chunk (pass 2)."""
        return self.model.predict(self.keys(chunk, True), self.folds(chunk, True))


# ---- partitions of a log folder -------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """Decision and outcome files that hold whole decisions with all their outcomes."""

    decisions: tuple[Path, ...]
    outcomes: tuple[Path, ...]

    def load(self) -> tuple[pa.Table, pa.Table]:
        """The partition's decisions and outcomes as tables."""
        return _read(self.decisions, DECISION_SCHEMA, None), _read(
            self.outcomes, OUTCOME_SCHEMA, OUTCOME_COLUMNS
        )


def _read(paths: Sequence[Path], schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    """Files of one stream as one table (only `columns`, cast to the schema's types)."""
    names = columns or schema.names
    target = pa.schema([schema.field(n) for n in names])
    tables = [pq.read_table(p, columns=names).cast(target) for p in paths]
    return pa.concat_tables(tables) if tables else target.empty_table()


def _row_count(paths: Sequence[Path]) -> int:
    """Rows in Parquet files, from their metadata."""
    total = 0
    for path in paths:
        with pq.ParquetFile(path) as f:
            total += f.metadata.num_rows
    return total


def _bucket(ids: pa.Array, n: int) -> np.ndarray:
    """A stable partition number in [0, n) per decision id."""
    hashed = pd.util.hash_array(_numpy(ids).astype(object), categorize=False)
    return (hashed % np.uint64(n)).astype(np.int64)


_SPILL_BUFFER_ROWS = 131_072  # rows held before the buckets are written


def _spill(
    paths: Sequence[Path], schema: pa.Schema, columns: list[str] | None, n: int, out: Path
) -> list[list[Path]]:
    """Split a stream batch by batch into `n` buckets by decision-id hash; each bucket's files.

    Every flush writes one new file per bucket and closes it: a writer kept open would hold
    every row group's metadata until the end, which grows with the log.
    """
    names = columns or schema.names
    target = pa.schema([schema.field(c) for c in names])
    files: list[list[Path]] = [[] for _ in range(n)]
    buffers: dict[int, list[pa.Table]] = {}
    buffered = 0

    def flush() -> None:
        for b, parts in buffers.items():
            path = out / f"part-{b:05d}-{len(files[b]):05d}.parquet"
            pq.write_table(pa.concat_tables(parts), path, write_statistics=False)
            files[b].append(path)
        buffers.clear()

    for path in paths:
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=65_536, columns=names):
                bucket = _bucket(batch.column("decision_id"), n)
                order = np.argsort(bucket, kind="stable")
                table = pa.Table.from_batches([batch]).cast(target).take(order)
                cuts = np.searchsorted(bucket[order], np.arange(n + 1))
                for b in np.flatnonzero(np.diff(cuts)):
                    buffers.setdefault(b, []).append(table.slice(cuts[b], cuts[b + 1] - cuts[b]))
                buffered += len(table)
                if buffered >= _SPILL_BUFFER_ROWS:
                    flush()
                    buffered = 0
    flush()
    return files


@contextmanager
def partitions(directory: Path, rows_per_partition: int = 250_000) -> Iterator[list[Partition]]:
    """The log folder as partitions of at most ~rows_per_partition decisions (temporary files)."""
    if rows_per_partition < 1:
        raise ValueError("rows_per_partition must be >= 1")
    dec = list(iter_segments(directory, DECISIONS))
    out = list(iter_segments(directory, OUTCOMES))
    n = math.ceil(_row_count(dec) / rows_per_partition)
    if n <= 1:
        yield [Partition(tuple(dec), tuple(out))]
        return
    with tempfile.TemporaryDirectory(prefix="ope-") as tmp:
        (Path(tmp) / DECISIONS).mkdir()
        (Path(tmp) / OUTCOMES).mkdir()
        d_files = _spill(dec, DECISION_SCHEMA, None, n, Path(tmp) / DECISIONS)
        o_files = _spill(out, OUTCOME_SCHEMA, OUTCOME_COLUMNS, n, Path(tmp) / OUTCOMES)
        yield [Partition(tuple(d), tuple(o)) for d, o in zip(d_files, o_files, strict=True)]


def latest_event(directory: Path) -> datetime | None:
    """The latest `at` in the log (decisions or outcomes), from the segments' statistics."""
    latest = None
    for stream in (DECISIONS, OUTCOMES):
        for path in iter_segments(directory, stream):
            with pq.ParquetFile(path) as f:
                idx = f.schema_arrow.get_field_index("at")
                for g in range(f.metadata.num_row_groups):
                    stats = f.metadata.row_group(g).column(idx).statistics
                    top = stats.max if stats is not None and stats.has_min_max else None
                    if top is None:
                        top = pc.max(f.read_row_group(g, columns=["at"])["at"]).as_py()
                    if top is not None:
                        top = top if top.tzinfo else top.replace(tzinfo=UTC)
                        latest = top if latest is None else max(latest, top)
    return latest


# ---- settled decisions with rewards ---------------------------------------------------------


@dataclass(frozen=True)
class LogReader:
    """How to turn a partition into settled decisions with their rewards."""

    classes: Mapping[str, MessageClass]
    conversion_tenants: Collection[str]
    as_of: datetime
    chunk_rows: int = 65_536

    def chunks(self, part: Partition) -> Iterator[LoggedChunk]:
        """The partition's settled decisions, joined with outcomes, in chunks."""
        decisions, outcomes = part.load()
        decisions = _first_of_each(decisions)
        if decisions.num_rows == 0:
            return
        view = finalized_view(decisions, outcomes, self.classes, self.conversion_tenants)
        keep = self._settled(view)
        table = decisions.filter(pa.array(keep))
        reward = view["reward"].to_numpy(dtype=float)[keep]
        for start in range(0, table.num_rows, self.chunk_rows):
            stop = start + self.chunk_rows
            yield LoggedChunk.from_table(table.slice(start, self.chunk_rows), reward[start:stop])

    def _settled(self, view: pd.DataFrame) -> np.ndarray:
        """Decisions whose SLA plus grace (and conversion window, if any) has passed at as_of."""
        settle = {n: c.learner_deadline_seconds for n, c in self.classes.items()}
        window = {
            n: max(c.learner_deadline_seconds, c.conversion_window_seconds)
            for n, c in self.classes.items()
        }
        converts = view["tenant"].isin(list(self.conversion_tenants)).to_numpy()
        seconds = np.where(
            converts,
            view["message_class"].map(window).to_numpy(dtype=float),
            view["message_class"].map(settle).to_numpy(dtype=float),
        )
        at = pd.to_datetime(view["at"], utc=True)
        deadline = at + pd.to_timedelta(seconds, unit="s")
        return (deadline <= pd.Timestamp(self.as_of)).to_numpy()


def _first_of_each(table: pa.Table) -> pa.Table:
    """The table with only the first row of each decision_id (as finalized_view keeps)."""
    ids = table["decision_id"]
    if pc.count_distinct(ids).as_py() == len(ids):
        return table
    first = pc.index_in(pc.unique(ids), value_set=ids.combine_chunks())
    return table.take(pc.sort_indices(first))


# ---- evaluation -----------------------------------------------------------------------------


@dataclass
class CandidateResult:
    """A candidate's accumulators and, when finished, its estimates."""

    accumulator: Accumulator
    bootstrap: Bootstrap | None
    weights: WeightHistogram = field(default_factory=WeightHistogram)

    def estimates(self, alpha: float = 0.05) -> dict[str, Estimate]:
        """Every estimator's analytic result."""
        return self.accumulator.results(alpha)

    def bootstrap_intervals(self, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
        """Every estimator's bootstrap interval (empty without a bootstrap)."""
        if self.bootstrap is None:
            return {}
        return {e: self.bootstrap.interval(e, alpha) for e in self.accumulator.estimators()}


def candidate_inputs(chunk: LoggedChunk, pi: np.ndarray, q_pairs: np.ndarray | None) -> np.ndarray:
    """The estimators' z matrix of a chunk for a candidate's flattened π."""
    if pi.shape != chunk.rows.shape:
        raise ValueError("a candidate must give one probability per eligible carrier")
    if not np.allclose(chunk.row_sum(pi), 1.0):
        raise ValueError("a candidate's probabilities must sum to 1 over each eligible set")
    p0 = chunk.probabilities[chunk.chosen]  # the logged propensity (checked on load)
    pe = pi[chunk.chosen]
    if q_pairs is None:
        return z_matrix(chunk.reward, p0, pe)
    return z_matrix(chunk.reward, p0, pe, q_pairs[chunk.chosen], chunk.row_sum(pi * q_pairs))


def evaluate(
    directory: Path,
    candidates: Mapping[str, Candidate],
    catalog: Catalog,
    classes: Mapping[str, MessageClass],
    as_of: datetime | None = None,
    reward_model: RewardModel | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    rows_per_partition: int = 250_000,
    chunk_rows: int = 65_536,
    on_chunk: Callable[[LoggedChunk, Mapping[str, np.ndarray], np.ndarray | None], None]
    | None = None,
) -> dict[str, CandidateResult]:
    """Estimate every candidate's value per decision on a log folder (DM/DR with a model).

    `on_chunk(chunk, π per candidate, q̂)` sees each chunk of pass 2 (per-pair arrays), e.g. to
    export the same inputs for another library.
    """
    as_of = as_of or latest_event(directory)
    if as_of is None:
        raise ValueError(f"no decisions in {directory}")
    reader = LogReader(classes, catalog.conversion_tenants(), as_of, chunk_rows)
    model = reward_model
    results = {
        name: CandidateResult(
            Accumulator(with_model=model is not None),
            Bootstrap(n_bootstrap, seed) if n_bootstrap else None,
        )
        for name in candidates
    }
    with partitions(Path(directory), rows_per_partition) as parts:
        if model is not None:
            for part in parts:
                for chunk in reader.chunks(part):
                    model.update(chunk)
            model.fit()
        for part in parts:
            for chunk in reader.chunks(part):
                q = None if model is None else model.predict(chunk)
                pis = {name: candidate(chunk, catalog) for name, candidate in candidates.items()}
                if on_chunk is not None:
                    on_chunk(chunk, pis, q)
                for name, pi in pis.items():
                    z = candidate_inputs(chunk, pi, q)
                    results[name].accumulator.update_z(z)
                    results[name].weights.update(z[:, W])
                    if results[name].bootstrap is not None:
                        results[name].bootstrap.update_z(z)
    return results


def results_frame(results: Mapping[str, CandidateResult], alpha: float = 0.05) -> pd.DataFrame:
    """One row per (candidate, estimator): value, intervals, ESS and the largest weight."""
    rows = []
    for name, res in results.items():
        boot = res.bootstrap_intervals(alpha)
        for est, e in res.estimates(alpha).items():
            low, high = boot.get(est, (np.nan, np.nan))
            rows.append(
                {
                    "candidate": name,
                    "estimator": est,
                    "value": e.value,
                    "ci_low": e.ci_low,
                    "ci_high": e.ci_high,
                    "boot_low": low,
                    "boot_high": high,
                    "n": e.n,
                    "ess": e.ess,
                    "mean_weight": e.mean_weight,
                    "max_weight": e.max_weights[0] if e.max_weights else np.nan,
                }
            )
    return pd.DataFrame(rows)


def _numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow column as NumPy (copying when needed)."""
    return column.to_numpy(zero_copy_only=False)
