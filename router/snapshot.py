"""Atomic snapshot files of the engine's state (learned model and decisions in flight)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson


def write_snapshot(path: Path, state: dict[str, Any]) -> None:
    """Write `state` as JSON so that a crash leaves either the old file or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none yet."""
    if not path.exists():
        return None
    return orjson.loads(path.read_bytes())
