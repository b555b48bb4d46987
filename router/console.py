"""The rich console the command-line reports print to."""

from __future__ import annotations

import os

from rich.console import Console

LOG_WIDTH = 200  # columns when the output is a file or a pipe, not a terminal


def report_console() -> Console:
    """A console for tables and progress: the terminal's width on a terminal; when the output
    goes to a log file or a pipe (CI, nohup), wide enough that tables are not cut to rich's
    default 80 columns. COLUMNS, when set, wins either way."""
    if os.environ.get("COLUMNS"):
        return Console()
    console = Console()
    return console if console.is_terminal else Console(width=LOG_WIDTH)
