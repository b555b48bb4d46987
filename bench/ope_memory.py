"""Peak memory of offline evaluation against log size, ours (streaming) and obp's (in memory). Run:
`.venv/bin/python bench/ope_memory.py [--sizes 1000000,3000000,12000000] [--obp-sizes ...]`.

1. Synthetic decision logs (decisions and outcomes as Parquet segments, the engine's schemas; the
   example catalog's carriers and eligible sets; a random logging policy with exact
   propensities) are written segment by segment, never held whole.
2. Ours: `router.offline.evaluation.evaluate` (cross-fitted reward model, IPS/SNIPS/DM/DR/SNDR,
Poisson
   bootstrap B=200, weight histograms; three candidates) runs in a child process per log size,
   its peak RSS read from `wait4`. With `--cap-gb`, ours on the largest log and obp on its
   largest also run under that address-space cap (RLIMIT_AS).
3. obp 0.5.7 (in its own venv, built by scripts/obp_check.sh) gets the same inputs: our pass 2
   exports reward, action, pscore, π_e and q̂ per decision; obp's child loads them whole (as obp
   needs) with the raw log itself (as a user building obp's arrays must), then runs IPS, SNIPS
   and DR with 200-sample bootstrap intervals. Its peak RSS per size, and the line through them
   extrapolated to the largest log (which would not fit in memory ten times over: the default
   sizes make the largest log's Arrow size about ten times our peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBP_PYTHON = Path(os.environ.get("OBP_VENV", Path.home() / ".cache/sms-router/obp-venv")) / Path(
    "bin/python"
)
CANDIDATES = ("static", "cheapest", "epsilon_greedy,epsilon=0.2")
SEGMENT_ROWS = 200_000
START = datetime(2026, 11, 2, tzinfo=UTC)


# ---- 1. synthetic logs, segment by segment ---------------------------------------------------


def _segment(seg: int, rows: int, seed: int, catalog: object) -> tuple[pa.Table, pa.Table]:
    """One segment of decisions and their outcomes (submit, DLR, conversion)."""
    from router.log.decision_log import DECISION_SCHEMA, OUTCOME_SCHEMA

    rng = np.random.default_rng([seed, seg])
    carriers = list(catalog.carriers)  # type: ignore[attr-defined]
    countries = catalog.countries()  # type: ignore[attr-defined]
    eligible = [[c for c in carriers if k in catalog.carriers[c].coverage] for k in countries]  # type: ignore[attr-defined]
    lengths_by_country = np.array([len(e) for e in eligible])
    starts = np.concatenate([[0], np.cumsum(lengths_by_country)])
    template = np.array([carriers.index(c) for e in eligible for c in e])
    country = rng.integers(0, len(countries), rows)
    lengths = lengths_by_country[country]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    row = np.repeat(np.arange(rows), lengths)
    pos = np.arange(offsets[-1]) - offsets[row]
    carrier = template[starts[country][row] + pos]
    weight = rng.gamma(1.0, size=len(row)) + 0.1
    prob = weight / np.bincount(row, weight)[row]
    cum = np.cumsum(prob) - np.concatenate([[0], np.cumsum(np.bincount(row, prob))])[row]
    below = np.bincount(row, cum <= rng.random(rows)[row], minlength=rows).astype(np.int64)
    first = offsets[:-1] + np.minimum(below, lengths - 1)  # the pair drawn from π, per row
    chosen = carrier[first]
    base = seg * SEGMENT_ROWS
    ids = np.char.add(f"{seed:04d}-", np.arange(base, base + rows).astype("U12")).astype(object)
    at = START + timedelta(days=2) * (base / 10_000_000)
    at_us = np.int64(at.timestamp() * 1e6) + np.sort(rng.integers(0, 600_000_000, rows))
    names = np.array(carriers, dtype=object)
    tenants = np.array(["acme", "globex", "default", "initech"], dtype=object)
    tenant = tenants[rng.integers(0, len(tenants), rows)]
    classes = np.array(["otp", "transactional"], dtype=object)[(rng.random(rows) < 0.2).astype(int)]
    country_names = np.array(countries, dtype=object)[country]
    decisions = pa.table(
        {
            "decision_id": ids,
            "at": pa.array(at_us, pa.timestamp("us", tz="UTC")),
            "tenant": tenant,
            "message_class": classes,
            "country": country_names,
            "operator": np.char.add("op", rng.integers(0, 4, rows).astype("U1")).astype(object),
            "mccmnc": pa.nulls(rows, pa.string()),
            "local_hour": rng.integers(0, 24, rows).astype(np.int8),
            "weekday": rng.integers(0, 7, rows).astype(np.int8),
            "segments": np.ones(rows, np.int16),
            "sender_type": np.full(rows, "alphanumeric", dtype=object),
            "attempt": np.ones(rows, np.int16),
            "parent_decision_id": pa.nulls(rows, pa.string()),
            "eligible": pa.ListArray.from_arrays(offsets, pa.array(names[carrier])),
            "probabilities": pa.ListArray.from_arrays(offsets, pa.array(prob)),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(rng.random(len(row)))),
            "carrier": names[chosen],
            "propensity": prob[first],
            "fallbacks": pa.ListArray.from_arrays(
                np.zeros(rows + 1, np.int32), pa.array([], pa.string())
            ),
            "policy": np.full(rows, "uniform", dtype=object),
            "policy_version": np.full(rows, "bench", dtype=object),
            "price": rng.uniform(0.01, 0.08, rows),
            "msisdn_hmac": np.char.add("h", rng.integers(0, 2**62, rows).astype("U20")).astype(
                object
            ),
        }
    ).cast(DECISION_SCHEMA)
    quality = np.random.default_rng(seed).uniform(0.5, 0.98, (len(carriers), len(countries)))
    delivered = rng.random(rows) < quality[chosen, country]
    latency_ms = rng.lognormal(np.log(5000), 0.8, rows).astype(np.int64)
    converted = delivered & np.isin(tenant, ["acme", "initech"]) & (rng.random(rows) < 0.85)
    event_rows = np.concatenate([np.arange(rows), np.arange(rows), np.flatnonzero(converted)])
    n_sub, n_conv = rows, int(converted.sum())
    event = np.array(["submit"] * n_sub + ["dlr"] * rows + ["conversion"] * n_conv, dtype=object)
    offset_us = np.concatenate(
        [np.full(rows, 300_000), latency_ms * 1000, latency_ms[converted] * 1000 + 15_000_000]
    )
    status = np.concatenate(
        [np.full(rows, None), np.where(delivered, "DELIVRD", "UNDELIV"), np.full(n_conv, None)]
    )
    outcomes = pa.table(
        {
            "decision_id": ids[event_rows],
            "at": pa.array(at_us[event_rows] + offset_us, pa.timestamp("us", tz="UTC")),
            "event": event,
            "status": pa.array(status, pa.string()),
            "error_code": pa.nulls(len(event), pa.string()),
            "cost": np.concatenate([decisions["price"].to_numpy(), np.zeros(rows + n_conv)]),
            "currency": np.full(len(event), "EUR", dtype=object),
            "latency_ms": np.concatenate(
                [np.zeros(rows, np.int64), latency_ms, latency_ms[converted]]
            ),
            "carrier": names[chosen][event_rows],
            "tenant": tenant[event_rows],
        }
    ).cast(OUTCOME_SCHEMA)
    return decisions, outcomes


def generate(directory: Path, n: int, seed: int = 1) -> int:
    """Write a log of n decisions segment by segment; returns its Arrow size loaded whole."""
    from carriers.catalog import load_catalog

    marker = directory / "size.json"
    if marker.exists() and json.loads(marker.read_text())["decisions"] == n:
        return int(json.loads(marker.read_text())["arrow_bytes"])
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "decisions").mkdir(parents=True)
    (directory / "outcomes").mkdir()
    catalog = load_catalog()
    arrow_bytes = 0
    for seg, start in enumerate(range(0, n, SEGMENT_ROWS)):
        decisions, outcomes = _segment(seg, min(SEGMENT_ROWS, n - start), seed, catalog)
        arrow_bytes += decisions.nbytes + outcomes.nbytes
        pq.write_table(decisions, directory / "decisions" / f"part-{seg:05d}.parquet")
        pq.write_table(outcomes, directory / "outcomes" / f"part-{seg:05d}.parquet")
    marker.write_text(json.dumps({"decisions": n, "arrow_bytes": arrow_bytes}))
    return arrow_bytes


# ---- 2. ours, in a child ---------------------------------------------------------------------


def ours(logs: Path, rows_per_partition: int, export: Path | None) -> None:
    """Evaluate the candidates on the log (child process); print the estimates as JSON."""
    from carriers.catalog import load_catalog
    from router.core.config import load_config
    from router.offline.evaluation import RewardModel, evaluate, make_candidate

    catalog = load_catalog()
    carriers = {c: i for i, c in enumerate(catalog.carriers)}
    hook = None
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        count = iter(range(10**9))

        def hook(chunk, pis, q) -> None:  # type: ignore[no-untyped-def]
            col = np.array([carriers[c] for c in chunk.carrier])
            dense = {}
            for name, values in {**pis, "q": q}.items():
                table = np.zeros((chunk.n, len(carriers)))
                table[chunk.rows, col] = values
                dense[name] = table
            np.savez(
                export / f"chunk-{next(count):06d}.npz",
                reward=chunk.reward,
                action=col[chunk.chosen],
                pscore=chunk.probabilities[chunk.chosen],
                **dense,
            )

    results = evaluate(
        logs,
        {spec: _candidate(make_candidate, spec) for spec in CANDIDATES},
        catalog,
        load_config().message_classes,
        reward_model=RewardModel(),
        n_bootstrap=200,
        rows_per_partition=rows_per_partition,
        on_chunk=hook,
    )
    print(
        json.dumps(
            {
                name: {e: est.value for e, est in res.estimates().items()}
                | {"n": res.accumulator.n}
                for name, res in results.items()
            }
        )
    )


def _candidate(make, spec: str):  # type: ignore[no-untyped-def]
    head, *pairs = spec.split(",")
    return make(head, **{k: float(v) for k, v in (p.split("=") for p in pairs)})


# ---- 3. obp, in a child of its own venv ------------------------------------------------------


def obp(arrays: Path, logs: Path | None) -> None:
    """obp's IPS, SNIPS and DR with bootstrap intervals on the whole arrays (child process)."""
    from obp.ope import (
        DoublyRobust,
        InverseProbabilityWeighting,
        SelfNormalizedInverseProbabilityWeighting,
    )

    held = []
    if logs is not None:  # the raw log, loaded whole to build obp's arrays
        held = [pq.read_table(logs / "decisions"), pq.read_table(logs / "outcomes")]
    parts = [dict(np.load(p)) for p in sorted(arrays.glob("chunk-*.npz"))]
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    del parts
    common = {"reward": data["reward"], "action": data["action"], "pscore": data["pscore"]}
    q = data["q"][:, :, None]
    out: dict[str, dict[str, float]] = {"log_rows": {"n": held[0].num_rows if held else 0}}
    for name in CANDIDATES:
        dist = data[name][:, :, None]
        estimators = {
            "ips": (InverseProbabilityWeighting(), {}),
            "snips": (SelfNormalizedInverseProbabilityWeighting(), {}),
            "dr": (DoublyRobust(), {"estimated_rewards_by_reg_model": q}),
        }
        out[name] = {}
        for est, (model, extra) in estimators.items():
            out[name][est] = float(model.estimate_policy_value(**common, action_dist=dist, **extra))
            model.estimate_interval(
                **common, action_dist=dist, n_bootstrap_samples=200, random_state=0, **extra
            )
    print(json.dumps(out))


# ---- orchestration ---------------------------------------------------------------------------


def run_child(
    args: list[str], python: Path, cap_bytes: int | None, timeout_s: float = 3600.0
) -> tuple[int, float, str]:
    """Run this script as a child; returns (exit code, its peak RSS in MiB, last stdout line).

    A child still running after `timeout_s` is killed (seen: obp under an address-space cap
    hangs instead of failing); its exit code is then −9.
    """

    def limit() -> None:
        if cap_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [str(python), __file__, *args], stdout=out, stderr=err, preexec_fn=limit, env=env
        )
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (peak RSS in KiB)
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if proc.returncode:
            sys.stderr.write(err.read()[-1500:])
    return proc.returncode, usage.ru_maxrss / 1024, lines[-1] if lines else ""


def main() -> None:
    """Generate the logs, run ours and obp on each size, print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    child_ours = sub.add_parser("ours")
    child_ours.add_argument("--logs", type=Path, required=True)
    child_ours.add_argument("--rows-per-partition", type=int, default=250_000)
    child_ours.add_argument("--export", type=Path)
    child_obp = sub.add_parser("obp")
    child_obp.add_argument("--arrays", type=Path, required=True)
    child_obp.add_argument("--logs", type=Path)
    parser.add_argument("--sizes", default="1000000,2000000,10500000")
    parser.add_argument("--obp-sizes", default="500000,1000000,2000000")
    parser.add_argument("--rows-per-partition", type=int, default=50_000)
    parser.add_argument("--capped-only", action="store_true", help="only the capped runs")
    parser.add_argument(
        "--cap-gb",
        type=float,
        default=0.0,
        help="also run ours and obp at their largest sizes under this RLIMIT_AS (0: no)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/ope-memory"))
    args = parser.parse_args()
    if args.cmd == "ours":
        ours(args.logs, args.rows_per_partition, args.export)
        return
    if args.cmd == "obp":
        obp(args.arrays, args.logs)
        return
    orchestrate(args)


def orchestrate(args: argparse.Namespace) -> None:
    """The whole benchmark (parent process)."""
    sizes = [int(s) for s in args.sizes.split(",")]
    obp_sizes = [int(s) for s in args.obp_sizes.split(",")]
    rows = []
    for n in sorted(set(sizes) | set(obp_sizes)) if not args.capped_only else []:
        logs = args.work / f"log-{n}"
        arrow = generate(logs, n)
        print(f"log of {n:,} decisions: {arrow / 2**30:.2f} GiB in memory (Arrow)", flush=True)
        if n in sizes:
            code, rss, _ = _ours(logs, args.rows_per_partition, None)
            rows.append(("ours", n, arrow, rss, code))
            print(f"  ours: peak RSS {rss:,.0f} MiB (exit {code})", flush=True)
        if n in obp_sizes and OBP_PYTHON.exists():
            code, rss, worst = _obp(logs, args.work / f"obp-{n}", None)
            rows.append(("obp", n, arrow, rss, code))
            print(f"  obp (log + arrays): peak RSS {rss:,.0f} MiB (exit {code})", flush=True)
            print(f"  ours vs obp, same inputs: largest relative difference {worst:.1e}")
    if rows:
        _summary(rows, max(sizes))
    if args.cap_gb:
        cap = int(args.cap_gb * 2**30)
        n, m = max(sizes), max(obp_sizes)
        arrow = generate(args.work / f"log-{n}", n)
        code, rss, _ = _ours(args.work / f"log-{n}", args.rows_per_partition, cap)
        print(
            f"under RLIMIT_AS {args.cap_gb} GiB: ours on {n:,} decisions "
            f"({arrow / 2**30:.2f} GiB in memory): exit {code}, peak RSS {rss:,.0f} MiB"
        )
        code, rss, _ = _obp(args.work / f"log-{m}", args.work / f"obp-{m}", cap)
        print(f"under RLIMIT_AS {args.cap_gb} GiB: obp on {m:,}: exit {code}, {rss:,.0f} MiB")


def _ours(logs: Path, rows_per_partition: int, cap: int | None) -> tuple[int, float, str]:
    """Our evaluation of a log in a child: (exit code, peak RSS MiB, its JSON line)."""
    args = ["ours", "--logs", str(logs), "--rows-per-partition", str(rows_per_partition)]
    return run_child(args, Path(sys.executable), cap)


def _obp(logs: Path, arrays: Path, cap: int | None) -> tuple[int, float, float]:
    """Export our inputs, run obp on them in its venv: (exit, peak RSS MiB, worst rel. diff)."""
    shutil.rmtree(arrays, ignore_errors=True)
    _, _, ours_out = run_child(
        ["ours", "--logs", str(logs), "--export", str(arrays)], Path(sys.executable), None
    )
    obp_args = ["obp", "--arrays", str(arrays), "--logs", str(logs)]
    code, rss, obp_out = run_child(obp_args, OBP_PYTHON, cap, 600.0 if cap else 3600.0)
    shutil.rmtree(arrays, ignore_errors=True)
    worst = _agreement(json.loads(ours_out), json.loads(obp_out)) if code == 0 else float("nan")
    return code, rss, worst


def _agreement(ours_out: dict, obp_out: dict) -> float:
    """Largest relative difference between our and obp's IPS, SNIPS and DR."""
    return max(
        abs(ours_out[c][e] - obp_out[c][e]) / abs(obp_out[c][e])
        for c in CANDIDATES
        for e in ("ips", "snips", "dr")
    )


def _summary(rows: list, largest: int) -> None:
    print("\nwho   decisions   log in memory (GiB)   peak RSS (MiB)")
    for who, n, arrow, rss, code in rows:
        print(
            f"{who:<5} {n:>11,} {arrow / 2**30:>21.2f} {rss:>16,.0f}{'' if code == 0 else ' FAIL'}"
        )
    obp_rows = [(n, rss) for who, n, _, rss, code in rows if who == "obp" and code == 0]
    if len(obp_rows) >= 2:
        n, rss = np.array(obp_rows, dtype=float).T
        slope, intercept = np.polyfit(n, rss, 1)
        print(
            f"obp: {slope * 1e6:,.0f} MiB per million decisions + {intercept:,.0f} MiB; "
            f"at {largest:,}: ~{(slope * largest + intercept) / 1024:,.1f} GiB (extrapolated)"
        )


if __name__ == "__main__":
    main()
