"""The optional state file: what a restarted process needs to resume its session (session id,
newest resume token, last seq *handled* per topic), replaced atomically. See docs/client.md.

One client at a time: a client holds `lock_state(path)` from its start to its close. The lock
is an exclusive `flock` on `PATH.lock` (the state file itself is replaced by a rename at every
save, so a lock on it would not last), holding the owner's pid for the message of whoever
else tries. The OS drops it when its process dies, whatever the way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.files import write_atomic

from .errors import StateFileError, StateFileLocked

__all__ = ["SavedState", "StateLock", "load_state", "lock_state", "save_state"]

_VERSION = 1


@dataclass(frozen=True, slots=True)
class SavedState:
    client_id: str
    session_id: str | None = None
    resume_token: str | None = None
    last_seq: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "client_id": self.client_id,
            "session_id": self.session_id,
            "resume_token": self.resume_token,
            "last_seq": dict(sorted(self.last_seq.items())),
        }


def load_state(path: str | os.PathLike[str], client_id: str) -> SavedState | None:
    """The state saved at `path`, or None when there is no file yet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(
            f"cannot read the state file {path}: {exc.strerror or exc}: fix its permissions"
        ) from None
    try:
        state = _parse(json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise StateFileError(
            f"the state file {path} is damaged ({exc}): delete it to start a new session "
            "(messages queued for the old one will not be received)"
        ) from None
    if state.client_id != client_id:
        raise StateFileError(
            f"the state file {path} belongs to client_id {state.client_id!r}, not "
            f"{client_id!r}: give each client_id its own state file"
        )
    return state


def _parse(data: object) -> SavedState:
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        raise ValueError(f"not a version {_VERSION} Tether client state")
    session_id, token = data.get("session_id"), data.get("resume_token")
    if (session_id is None) != (token is None):
        raise ValueError("session_id and resume_token go together")
    for value in (session_id, token):
        if value is not None and not isinstance(value, str):
            raise TypeError("session_id and resume_token must be strings")
    client_id = data["client_id"]
    if not isinstance(client_id, str):
        raise TypeError("client_id must be a string")
    raw = data.get("last_seq", {})
    if not isinstance(raw, dict):
        raise TypeError("last_seq must be an object")
    last_seq: dict[str, int] = {}
    for topic, seq in raw.items():
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise TypeError(f"last_seq[{topic!r}] must be an int >= 0")
        last_seq[topic] = seq
    return SavedState(client_id, session_id, token, last_seq)


def save_state(path: str | os.PathLike[str], state: SavedState) -> None:
    """Replace the file at `path` atomically and durably. Mode 0600: it holds a credential."""
    write_atomic(path, json.dumps(state.to_json(), separators=(",", ":")).encode(), 0o600)


class StateLock:
    """The lock of one state file, held until `release()` (or until the process ends)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path  # the lock file, PATH.lock
        self._fd: int | None = fd
        # Closing the descriptor releases the lock: done at the latest when this object goes.
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and unlock. Idempotent."""
        if self._fd is None:
            return
        self._fd = None
        # Removed while still locked: whoever opened it meanwhile sees, once they hold it,
        # that it is no longer the file at the path, and starts over (see lock_state).
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._closer()


def lock_state(path: str | os.PathLike[str]) -> StateLock:
    """Lock the state file at `path` for this client; raises `StateFileLocked` (with the
    holder's pid) when another client holds it, `StateFileError` when the lock file cannot
    be made."""
    lock_path = Path(f"{os.fspath(path)}.lock")
    for _ in range(100):  # only a lock file removed under us again and again goes round
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateFileError(
                f"cannot create {lock_path}, the lock of the state file {path}: "
                f"{exc.strerror or exc}: check that the directory exists and is writable"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateFileLocked(os.fspath(path), pid) from None
        except OSError as exc:
            os.close(fd)
            raise StateFileError(
                f"cannot lock {lock_path}: {exc.strerror or exc}: put the state file on a "
                "local file system"
            ) from None
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return StateLock(lock_path, fd)
        os.close(fd)  # its holder removed it between our open and our lock: again
    raise StateFileError(f"cannot lock {lock_path}: it keeps being removed: try again")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
