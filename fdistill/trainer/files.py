"""Atomic file writes: a temporary file in the target's directory, fsync, ``os.replace``, then an fsync
of the directory, so an interruption (even ``kill -9`` or a power cut) leaves the old file or the new
one, never a half-written one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) in one step."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(path.name + ".tmp")  # same directory: os.replace cannot cross file systems
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
