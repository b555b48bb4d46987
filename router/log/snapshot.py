"""Atomic snapshot files of the engine's state (learned model and decisions in flight)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson


def write_snapshot(path: Path, state: dict[str, Any]) -> None:
    """Write `state` as JSON so that a crash leaves either the old file or the new one. Each
    write has its own temporary file, so two threads snapshotting at once cannot take each
    other's (one rename then failed, and the ticker that hit it stopped the server's
    shutdown from closing the decision log)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
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
