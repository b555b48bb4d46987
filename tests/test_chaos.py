"""A bounded chaos soak (`bench/chaos.py`, the same code): 2 replicas, 2 workers, the simulated
SMSCs and a private Redis for one minute of traffic, with a Redis SIGKILL + restart and a worker
SIGKILL + replacement, then the exactly-once reconciliation, every line of which must agree.

About 90 s; needs `redis-server` (it kills and restarts its own, so REDIS_URL is not used).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT / "bench" / "chaos.py"

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (it restarts its own)"
)


def _chaos_module():
    """bench/chaos.py as a module (bench/ is not a package)."""
    if "bench_chaos" in sys.modules:
        return sys.modules["bench_chaos"]
    spec = importlib.util.spec_from_file_location("bench_chaos", CHAOS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_chaos"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_schedule_spreads_every_fault_kind() -> None:
    chaos = _chaos_module()
    kinds = [k for _, k in chaos.Config(minutes=5).schedule()]
    assert set(kinds) == set(chaos.FAULT_KINDS)
    assert all(kinds.count(k) >= 1 for k in chaos.FAULT_KINDS)
    short = chaos.Config(minutes=1, faults=("redis", "worker"), fault_every=20, first_fault=15)
    assert short.schedule() == [(15, "redis"), (35, "worker")]


def test_chaos_soak_reconciles_exactly_once(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    cmd = [
        sys.executable,
        str(CHAOS),
        "--minutes",
        "1",
        "--rate",
        "10",
        "--seed",
        "7",
        "--faults",
        "redis,worker",
        "--first-fault",
        "15",
        "--fault-every",
        "20",
        "--drain-timeout",
        "90",
        "--data-dir",
        str(tmp_path / "run"),
        "--report",
        str(report_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    output = done.stdout + done.stderr
    assert report_path.exists(), output[-4000:]
    report = json.loads(report_path.read_text())
    kinds = [f["kind"] for f in report["run"]["faults"]]
    assert "redis" in kinds and "worker" in kinds, kinds  # the faults really happened
    assert report["counts"]["jobs_in"] >= 400  # ~10/s for a minute, minus the Redis outage

    # Numbers from the example ranges never reach the output.
    for prefix in _chaos_module().PREFIXES:
        assert prefix not in output and prefix[1:] not in output

    # Every line of the reconciliation, the drain, dead letters and the workers' sending threads:
    # all differences at once, each named with its counts.
    diffs = _chaos_module().differences(report)
    assert not diffs, "reconciliation differs:\n" + "\n".join(diffs)
    assert report["run"]["drained"], report["run"]["drain_state"]
    assert report["dead_letters"] == 0
    assert done.returncode == 0, output[-4000:]
