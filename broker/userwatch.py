"""UserWatcher: reloads the users file when it changes, off the loop.

A small thread looks at the file's (inode, size, mtime, mode) once a second; `tether user add`
and `remove` replace the file by a rename, so every write changes the inode; a `chmod` changes
the mode. A change (or `reload()`, which SIGHUP calls) reads the file on that thread (JSON, no
bcrypt) and hands the new `UserStore` to `on_loaded`, which `tell`s the supervisor: the loop
never reads a file. A file that does not load (malformed, a newer format version,
unreadable) is logged as `users_reload_failed` once per change, and the users loaded before
stay in force; so is a file that disappears (removing every user is `tether user remove`,
which rewrites it). A file that group or others may access is still loaded (refusing it would
keep stale users in force), but each such load logs `users_file_insecure` with the `chmod` to
run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from tether.broker.users import UserFileError, UserStore, insecure_mode

__all__ = ["UserWatcher"]

_log = structlog.get_logger("tether.userwatch")

# What identifies one version of the file; None: there is no file.
_Key = tuple[int, int, int, int] | None


def _key(path: Path) -> _Key:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Unreadable metadata counts as "changed": the load below reports why.
        return (-1, -1, hash(exc.errno), -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


class UserWatcher:
    def __init__(
        self,
        path: str | os.PathLike[str],
        on_loaded: Callable[[UserStore], None],
        *,
        interval: float = 1.0,
    ) -> None:
        self._path = Path(path)
        self._on_loaded = on_loaded
        self._interval = interval
        # Taken now, before the broker's own load returns to its caller: a change after this
        # is seen.
        self._seen: _Key = _key(self._path)
        self._wake = threading.Event()
        self._forced = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tether-userwatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reload(self) -> None:
        """Reload now, changed or not (SIGHUP). Safe from a signal handler: sets a flag."""
        self._forced = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopping:
                return
            forced, self._forced = self._forced, False
            key = _key(self._path)
            if key == self._seen and not forced:
                continue
            self._seen = key
            if key is None:
                # Deleting the file is not removing everyone: `tether user remove` rewrites it.
                _log.error(
                    "users_reload_failed",
                    path=str(self._path),
                    reason="the users file is gone",
                    kept="the users loaded before",
                )
                continue
            try:
                users = UserStore.load(self._path)
            except UserFileError as exc:
                _log.error(
                    "users_reload_failed",
                    path=str(self._path),
                    reason=str(exc),
                    kept="the users loaded before",
                )
                continue
            _log.info("users_file_loaded", path=str(self._path), users=len(users))
            mode = insecure_mode(self._path)
            if mode is not None:
                _log.warning(
                    "users_file_insecure",
                    path=str(self._path),
                    mode=f"{mode:04o}",
                    hint=f"chmod 600 {self._path}",
                )
            self._on_loaded(users)
