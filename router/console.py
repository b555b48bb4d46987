"""The rich console the command-line reports print to."""

from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 200  # columns when the output is a file or a pipe, not a terminal


def report_console() -> Console:
    """A console for tables and progress: the terminal's width on a terminal; when standard
    output is a log file or a pipe (CI, nohup), wide enough that tables are not cut to rich's
    default 80 columns, even where FORCE_COLOR makes rich treat it as a terminal. A numeric
    COLUMNS wins either way."""
    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return Console()
    return Console(width=LOG_WIDTH)
