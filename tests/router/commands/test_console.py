"""Reports printed to a log file or a pipe keep their tables whole."""

from __future__ import annotations

import pytest
from rich.table import Table

from router.console import LOG_WIDTH, report_console


def _table() -> Table:
    table = Table()
    names = ["policy", "utility", "regret", "regret %", "success in SLA", "DLR delivered"]
    names += ["cost/delivered", "conversion", "luck-free regret %"]
    for name in names:
        table.add_column(name)
    table.add_row(
        "pybandits_cc", "3,332", "3.724", "0.1116", "0.9853", "0.9334", "0.023", "0.8085", "0.2251"
    )
    return table


def test_a_piped_report_is_not_cut_to_80_columns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then calls any output a terminal
    console = report_console()
    assert console.width == LOG_WIDTH
    console.print(_table())
    out = capsys.readouterr().out
    assert "pybandits_cc" in out and "luck-free regret %" in out and "…" not in out


def test_columns_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    assert report_console().width == 60
    monkeypatch.setenv("COLUMNS", "wide")  # not a number: ignored
    assert report_console().width == LOG_WIDTH
