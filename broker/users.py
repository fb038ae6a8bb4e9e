"""The users file: who may log in, and their password hashes.

Format (JSON)::

    {"version": 1, "users": {"NAME": {"hash": "bcrypt-sha256$...", "created": "ISO-8601 UTC"}}}

The broker loads a `UserStore` once at start and never changes it; `add_user` is for the
command line and rewrites the whole file atomically, so a broker starting at the same moment
reads either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tether.broker.passwords import DEFAULT_COST, hash_password, is_valid_hash
from tether.files import write_atomic

__all__ = [
    "FILE_VERSION",
    "MAX_NAME_LENGTH",
    "UserExistsError",
    "UserFileError",
    "UserNameError",
    "UserRecord",
    "UserStore",
    "add_user",
    "validate_name",
]

FILE_VERSION = 1
MAX_NAME_LENGTH = 128
FILE_MODE = 0o600  # the file holds password hashes


class UserFileError(Exception):
    """The users file exists but cannot be read or is not a valid users file."""


class UserExistsError(Exception):
    """`add_user` was asked to add a name that is already there, without replace=True."""


class UserNameError(ValueError):
    """A user name is empty, too long, or holds control characters."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    hash: str
    created: str  # ISO-8601, UTC


def validate_name(name: str) -> None:
    """Raise `UserNameError` unless `name` is 1..128 characters with no control characters."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise UserNameError(f"user name must be 1 to {MAX_NAME_LENGTH} characters, got {len(name)}")
    for ch in name:
        # Cc: control characters; Cs: lone surrogates, which cannot be sent as UTF-8 on the wire.
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise UserNameError(f"user name must not contain control characters: {name!r}")


class UserStore:
    """An immutable name -> hash table, as read from the users file."""

    __slots__ = ("_users",)

    def __init__(self, users: Mapping[str, UserRecord] | None = None) -> None:
        # A private copy behind a read-only view: nobody can change a loaded store.
        self._users: Mapping[str, UserRecord] = MappingProxyType(dict(users or {}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UserStore:
        """Read the users file; a missing file is an empty store."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise UserFileError(f"cannot read users file {path}: {exc.strerror or exc}") from exc
        return cls(_parse(raw, path))

    def lookup(self, name: str) -> str | None:
        """The stored hash for `name`, or None when there is no such user."""
        record = self._users.get(name)
        return record.hash if record is not None else None

    def get(self, name: str) -> UserRecord | None:
        return self._users.get(name)

    def names(self) -> list[str]:
        return sorted(self._users)

    def records(self) -> Mapping[str, UserRecord]:
        return self._users

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"UserStore({len(self._users)} users)"


def _parse(raw: bytes, path: Path) -> dict[str, UserRecord]:
    def bad(why: str) -> UserFileError:
        return UserFileError(f"users file {path} is malformed: {why}")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad("not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise bad(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(doc, dict):
        raise bad("expected a JSON object at the top level")
    if doc.get("version") != FILE_VERSION:
        raise bad(f'expected "version": {FILE_VERSION}, got {doc.get("version")!r}')
    users = doc.get("users")
    if not isinstance(users, dict):
        raise bad('expected "users" to be an object')
    records: dict[str, UserRecord] = {}
    for name, entry in users.items():
        try:
            validate_name(name)
        except UserNameError as exc:
            raise bad(str(exc)) from exc
        if not isinstance(entry, dict):
            raise bad(f"user {name!r}: expected an object")
        hash_, created = entry.get("hash"), entry.get("created")
        if not isinstance(hash_, str) or not hash_:
            raise bad(f'user {name!r}: "hash" must be a non-empty string')
        if not isinstance(created, str):
            raise bad(f'user {name!r}: "created" must be a string')
        if not is_valid_hash(hash_):
            # Caught here, not at every login: such a user could never log in.
            raise bad(
                f'user {name!r}: "hash" is not a bcrypt-sha256 hash as `tether user add` '
                "writes (set the password again with: tether user add NAME --replace)"
            )
        records[name] = UserRecord(hash=hash_, created=created)
    return records


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def add_user(
    path: str | os.PathLike[str],
    name: str,
    password: str,
    *,
    cost: int = DEFAULT_COST,
    replace: bool = False,
) -> None:
    """Add `name` to the users file (creating it), or change their password with replace=True."""
    path = Path(path)
    validate_name(name)
    if not password:
        raise ValueError("password must not be empty")
    # Load first: a malformed file is an error, never silently overwritten.
    store = UserStore.load(path)
    existing = store.get(name)
    if existing is not None and not replace:
        raise UserExistsError(f"user {name!r} already exists in {path}")
    hashed = hash_password(password, cost=cost)
    # A password change keeps the date the user was created.
    created = existing.created if existing is not None else _now_iso()
    users = dict(store.records())
    users[name] = UserRecord(hash=hashed, created=created)
    doc: dict[str, Any] = {
        "version": FILE_VERSION,
        "users": {n: {"hash": r.hash, "created": r.created} for n, r in sorted(users.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode(), FILE_MODE)
