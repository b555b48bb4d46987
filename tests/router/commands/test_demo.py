"""`router demo`, bounded: the router process, simulated SMSCs over SMPP and sender workers."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from router.commands.demo import DemoOptions, run_demo
from router.log.decision_log import DECISION_SCHEMA, OUTCOME_SCHEMA, read_stream


def test_demo_runs_the_whole_loop_over_smpp(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    data = tmp_path / "demo"
    figures = run_demo(
        DemoOptions(data_dir=data, minutes=5, speed=30, mlflow=False, workers=2, concurrency=4),
        console,
    )
    workers = figures["workers"]
    jobs = sum(w["jobs"] for w in workers)
    submits = sum(w["submitted"] + w["submit_failed"] for w in workers)
    retries = sum(w["retries"] for w in workers)
    unroutable = sum(w["unroutable"] for w in workers)  # e.g. a retry with no carrier left
    assert jobs > 500
    assert submits == jobs + retries - unroutable  # every job sent, retries on top, none twice
    decisions = read_stream(data / "decision_log", "decisions", DECISION_SCHEMA)
    outcomes = read_stream(data / "decision_log", "outcomes", OUTCOME_SCHEMA).to_pandas()
    assert decisions.num_rows == figures["decisions"] == submits
    assert (outcomes["event"] == "submit").sum() == submits  # every submit result reported
    receipts = sum(s["receipts_acked"] for s in figures["smscs"].values())
    assert (outcomes["event"] == "dlr").sum() == receipts == sum(w["receipts"] for w in workers)
    assert (outcomes["event"] == "conversion").sum() > 0
    assert 0.5 < figures["true_success_rate"] <= 1.0  # event time includes a loaded machine
    text = console.export_text()
    for words in ("Per carrier and destination", "decision log (Parquet)", "sender workers:"):
        assert words in text
