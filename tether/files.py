"""Replacing a file atomically and durably, for the broker's users file and the client's state
file: after a crash at any moment the path holds the old bytes or the new ones, never a mix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` (file mode `mode`); the directory must exist.

    A temporary file beside `path` (so the rename stays within one filesystem) is written and
    fsynced, renamed over `path`, and then the directory is fsynced: only that makes the
    rename itself survive a crash. On failure the temporary file is removed and the error
    raised; `path` is untouched unless the rename happened.
    """
    path = Path(path)
    directory = path.parent
    # mkstemp creates the file 0600, so nobody else can read it even before the fchmod.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
