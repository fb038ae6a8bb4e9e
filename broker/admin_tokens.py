"""Admin tokens for the HTTP API (`/api/*`): `tether token new` makes one, and only its SHA-256
is kept, one hex hash per line, in the file `tether serve --admin-token-file` names.

The broker re-reads that file when its identity (inode, size, mtime) changes, so a token added
or removed is seen by the next request without a restart. A token is known by a short id (the
first 12 hex digits of its hash) in logs, never by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import structlog

__all__ = ["TOKEN_ID_CHARS", "TokenFile", "append_token", "hash_token", "new_token", "token_id"]

TOKEN_ID_CHARS = 12
_HASH_CHARS = 64

_log = structlog.get_logger("tether.admin_tokens")


def new_token() -> str:
    """A fresh random token: 32 bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What is stored of a token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_id(hashed: str) -> str:
    """The short id of a token (from its hash) that audit and log lines carry."""
    return hashed[:TOKEN_ID_CHARS]


def append_token(path: Path, token: str) -> str:
    """Append `token`'s hash to `path` (created with mode 0600; its directory must exist:
    a typo in the path would otherwise make a file no broker reads). Returns the hash."""
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"directory {path.parent} does not exist: create it first (mkdir -p {path.parent})"
        )
    hashed = hash_token(token)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{hashed}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashed


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenFile:
    """The hashes listed in an admin token file, read again whenever the file changes.

    Not thread-safe: used from the HTTP server's loop only. Each `check` costs one `stat`.
    Lines that are blank or start with `#` are skipped; any other line that is not a SHA-256
    hex hash is logged (once per change of the file) and ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int, int, int] | bool | None = False  # False: never read
        self._hashes: tuple[str, ...] = ()

    def hashes(self) -> tuple[str, ...]:
        """The hashes as the file holds them now (re-read if it changed)."""
        identity = _identity(self.path)
        if identity != self._identity:
            self._identity = identity
            self._hashes = self._read() if identity is not None else ()
            _log.info(
                "admin_tokens_loaded",
                path=str(self.path),
                tokens=len(self._hashes),
                exists=identity is not None,
            )
        return self._hashes

    def check(self, token: str) -> str | None:
        """The id of `token` if its hash is listed, else None. Every listed hash is compared
        (in constant time each), so the answer's timing does not say which line matched."""
        candidate = hash_token(token)
        found = False
        for hashed in self.hashes():
            found |= hmac.compare_digest(candidate, hashed)
        return token_id(candidate) if found else None

    def _read(self) -> tuple[str, ...]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            _log.error("admin_tokens_unreadable", path=str(self.path), error=str(exc))
            return ()
        hashes: list[str] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            lowered = line.lower()
            if len(lowered) != _HASH_CHARS or any(c not in "0123456789abcdef" for c in lowered):
                # Never log the line itself: it may be a clear token pasted by mistake.
                _log.warning("admin_tokens_bad_line", path=str(self.path), line=number)
                continue
            hashes.append(lowered)
        return tuple(hashes)
