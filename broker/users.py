"""The users file: who may log in, and their password hashes.

Format (JSON)::

    {"version": 3, "users": {"NAME": {"hash": "bcrypt-sha256$...", "created": "ISO-8601 UTC",
                                      "sessions_valid_after": "ISO-8601 UTC", "admin": true,
                                      "client_id_prefixes": ["sensor-"],
                                      "publish": ["devices/{client_id}/telemetry"],
                                      "subscribe": ["devices/{client_id}/cmd/#"]}}}

`sessions_valid_after` (version 2, optional) is written by `tether user add NAME --replace
--end-sessions`: the user's sessions created before that moment are void, and a broker ends
them. `admin` (version 3, optional, written by `tether user add NAME --admin`) lets the user
subscribe to the broker's `$sys/...` topics. `client_id_prefixes` (version 3, optional, written
by `tether user add NAME --client-id-prefix P`, repeatable) limits the client ids the user may
register to those starting with one of the prefixes (absent: any), so another user cannot
squat a fleet's ids. `publish` and `subscribe` (version 4, optional, written by `tether user
add|set NAME --pub P --sub P`) are the topic patterns the user may publish and subscribe to
(`permissions.py`; absent: every topic, unless the broker runs with `--default-deny`; an
empty list: none). A file is written at the lowest version that holds
it (1 while no user has the newer fields), so a file an older broker can read stays readable by
it; a broker refuses a file whose version is newer than `FILE_VERSION` instead of ignoring
fields it does not know (a rolled-back broker never drops an `admin` mark silently).

A `UserStore` is immutable: the broker loads one at start and a new one at every reload
(`userwatch.py`); `add_user`, `set_user` and `remove_user` are for the command line and
rewrite the whole file atomically, so a broker reading it at the same moment sees the old file
or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import stat
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tether.broker.passwords import DEFAULT_COST, hash_password, is_valid_hash
from tether.broker.permissions import PatternError, validate_pattern
from tether.files import write_atomic

__all__ = [
    "FILE_VERSION",
    "KEEP",
    "MAX_NAME_LENGTH",
    "Keep",
    "PatternError",
    "UserExistsError",
    "UserFileError",
    "UserNameError",
    "UserNotFoundError",
    "UserRecord",
    "UserStore",
    "add_user",
    "insecure_mode",
    "remove_user",
    "set_user",
    "validate_client_id_prefix",
    "validate_name",
]

# The newest users file format this code reads and writes (1: hash and created; 2: adds
# sessions_valid_after; 3: adds admin and client_id_prefixes; 4: adds publish and subscribe).
FILE_VERSION = 4
MAX_NAME_LENGTH = 128
MAX_PREFIX_LENGTH = 128  # a client id is at most 128 characters (protocol MAX_CLIENT_ID_CHARS)
FILE_MODE = 0o600  # the file holds password hashes


class UserFileError(Exception):
    """The users file exists but cannot be read or is not a valid users file."""


class UserExistsError(Exception):
    """`add_user` was asked to add a name that is already there, without replace=True."""


class UserNotFoundError(Exception):
    """`remove_user` or `set_user` was asked about a name that is not in the file."""


class UserNameError(ValueError):
    """A user name is empty, too long, or holds control characters."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    hash: str
    created: str  # ISO-8601, UTC
    # Sessions of this user created before this moment are void (ISO-8601 UTC; version 2).
    sessions_valid_after: str | None = None
    # May subscribe to `$sys/...` (version 3).
    admin: bool = False
    # The client ids this user may register start with one of these; None: any (version 3).
    client_id_prefixes: tuple[str, ...] | None = None
    # Topic patterns the user may publish / subscribe to; None: no restriction (version 4).
    publish: tuple[str, ...] | None = None
    subscribe: tuple[str, ...] | None = None

    def client_id_allowed(self, client_id: str) -> bool:
        prefixes = self.client_id_prefixes
        return prefixes is None or client_id.startswith(prefixes)

    def valid_after(self) -> float | None:
        """`sessions_valid_after` as seconds since the epoch (as `Session.created` is)."""
        if self.sessions_valid_after is None:
            return None
        return _parse_time(self.sessions_valid_after).timestamp()


def validate_name(name: str) -> None:
    """Raise `UserNameError` unless `name` is 1..128 characters with no control characters."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise UserNameError(f"user name must be 1 to {MAX_NAME_LENGTH} characters, got {len(name)}")
    for ch in name:
        # Cc: control characters; Cs: lone surrogates, which cannot be sent as UTF-8 on the wire.
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise UserNameError(f"user name must not contain control characters: {name!r}")


def validate_client_id_prefix(prefix: str) -> None:
    """Raise `ValueError` unless `prefix` is 1..128 characters with no control characters."""
    if not isinstance(prefix, str) or not 1 <= len(prefix) <= MAX_PREFIX_LENGTH:
        raise ValueError(
            f"a client id prefix must be a string of 1 to {MAX_PREFIX_LENGTH} characters, "
            f"got {prefix!r}"
        )
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in prefix):
        raise ValueError(f"a client id prefix must not contain control characters: {prefix!r}")


def insecure_mode(path: str | os.PathLike[str]) -> int | None:
    """The permission bits of the file at `path` if group or others may use it (it holds
    password hashes: `chmod 600` it), else None (also when there is no file to look at)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None


class UserStore:
    """An immutable name -> hash table, as read from the users file."""

    __slots__ = ("_claimed", "_users")

    def __init__(self, users: Mapping[str, UserRecord] | None = None) -> None:
        # A private copy behind a read-only view: nobody can change a loaded store.
        self._users: Mapping[str, UserRecord] = MappingProxyType(dict(users or {}))
        # Every prefix some user is limited to: reserved to those users.
        self._claimed: tuple[str, ...] = tuple(
            sorted({p for r in self._users.values() for p in r.client_id_prefixes or ()})
        )

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

    def is_admin(self, name: str) -> bool:
        record = self._users.get(name)
        return record is not None and record.admin

    def client_id_allowed(self, name: str, client_id: str) -> bool:
        """May user `name` register `client_id`? A user with prefixes may use only ids that
        start with one of them; a user without may use any id that no other user's prefixes
        claim (so a fleet's ids cannot be squatted: bob cannot take `alice-sensor` once alice
        is limited to `alice-`). False for no user."""
        record = self._users.get(name)
        if record is None:
            return False
        if record.client_id_prefixes is not None:
            return record.client_id_allowed(client_id)
        return not (self._claimed and client_id.startswith(self._claimed))

    def valid_after(self) -> dict[str, float | None]:
        """Every user -> the time before which their sessions are void (None: all valid)."""
        return {name: record.valid_after() for name, record in self._users.items()}

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
    version = doc.get("version")
    if type(version) is int and version > FILE_VERSION:
        # Refused, not read as far as understood: a newer field may restrict someone.
        raise UserFileError(
            f"users file {path} has format version {version}, newer than this broker reads "
            f"(up to {FILE_VERSION}): upgrade Tether, or write the file with this version's "
            "`tether user add`"
        )
    if type(version) is not int or version < 1:
        raise bad(f'expected "version": 1 to {FILE_VERSION}, got {version!r}')
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
        valid_after = entry.get("sessions_valid_after")
        if valid_after is not None:
            if version < 2:
                raise bad(f'user {name!r}: "sessions_valid_after" needs "version": 2')
            if not isinstance(valid_after, str) or not _is_time(valid_after):
                raise bad(f'user {name!r}: "sessions_valid_after" must be an ISO-8601 time')
        admin = entry.get("admin", False)
        if "admin" in entry:
            if version < 3:
                raise bad(f'user {name!r}: "admin" needs "version": 3')
            if type(admin) is not bool:
                raise bad(f'user {name!r}: "admin" must be true or false')
        prefixes = _parse_prefixes(entry, version, name, bad)
        publish = _parse_patterns(entry, "publish", version, name, bad)
        subscribe = _parse_patterns(entry, "subscribe", version, name, bad)
        if not is_valid_hash(hash_):
            # Caught here, not at every login: such a user could never log in.
            raise bad(
                f'user {name!r}: "hash" is not a bcrypt-sha256 hash as `tether user add` '
                "writes (set the password again with: tether user add NAME --replace)"
            )
        records[name] = UserRecord(
            hash=hash_,
            created=created,
            sessions_valid_after=valid_after,
            admin=admin,
            client_id_prefixes=prefixes,
            publish=publish,
            subscribe=subscribe,
        )
    return records


def _parse_prefixes(
    entry: dict[str, Any], version: int, name: str, bad: Callable[[str], UserFileError]
) -> tuple[str, ...] | None:
    if "client_id_prefixes" not in entry:
        return None
    raw = entry["client_id_prefixes"]
    if version < 3:
        raise bad(f'user {name!r}: "client_id_prefixes" needs "version": 3')
    # An empty list would lock the user out for good: absent is how "any" is said.
    if not isinstance(raw, list) or not raw:
        raise bad(f'user {name!r}: "client_id_prefixes" must be a non-empty list of strings')
    for prefix in raw:
        try:
            validate_client_id_prefix(prefix)
        except ValueError as exc:
            raise bad(f"user {name!r}: {exc}") from exc
    return tuple(raw)


def _parse_patterns(
    entry: dict[str, Any], key: str, version: int, name: str, bad: Callable[[str], UserFileError]
) -> tuple[str, ...] | None:
    if key not in entry:
        return None
    raw = entry[key]
    if version < 4:
        raise bad(f'user {name!r}: "{key}" needs "version": 4')
    # An empty list is meaningful here (nothing allowed), unlike client_id_prefixes.
    if not isinstance(raw, list):
        raise bad(f'user {name!r}: "{key}" must be a list of topic patterns')
    for pattern in raw:
        try:
            validate_pattern(pattern)
        except PatternError as exc:
            raise bad(f"user {name!r}: {key}: {exc}") from exc
    return tuple(raw)


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _is_time(text: str) -> bool:
    try:
        _parse_time(text)
    except ValueError:
        return False
    return True


def _now_iso(timespec: str = "seconds") -> str:
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def _write(path: Path, users: Mapping[str, UserRecord]) -> None:
    """Write the whole file, at the lowest version that holds what it says."""
    entries: dict[str, dict[str, str | bool | list[str]]] = {}
    for name, record in sorted(users.items()):
        entry: dict[str, str | bool | list[str]] = {"hash": record.hash, "created": record.created}
        if record.sessions_valid_after is not None:
            entry["sessions_valid_after"] = record.sessions_valid_after
        if record.admin:
            entry["admin"] = True
        if record.client_id_prefixes is not None:
            entry["client_id_prefixes"] = list(record.client_id_prefixes)
        if record.publish is not None:
            entry["publish"] = list(record.publish)
        if record.subscribe is not None:
            entry["subscribe"] = list(record.subscribe)
        entries[name] = entry
    if any(r.publish is not None or r.subscribe is not None for r in users.values()):
        version = 4
    elif any(r.admin or r.client_id_prefixes is not None for r in users.values()):
        version = 3
    elif any(r.sessions_valid_after is not None for r in users.values()):
        version = 2
    else:
        version = 1
    doc: dict[str, Any] = {"version": version, "users": entries}
    write_atomic(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode(), FILE_MODE)


def _check_directory(path: Path) -> None:
    # Never created silently: a typo in --users would otherwise make a file nobody reads.
    if not path.parent.is_dir():
        raise UserFileError(
            f"directory {path.parent} does not exist: create it first "
            f"(mkdir -p {path.parent}) or check --users"
        )


class Keep:
    """`set_user`'s default for a list: leave it as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


def _validate_patterns(patterns: Sequence[str] | Keep | None) -> None:
    if isinstance(patterns, str):
        raise TypeError("expected a sequence of topic patterns, not one string")
    if patterns is None or isinstance(patterns, Keep):
        return
    for pattern in patterns:
        validate_pattern(pattern)


def _kept(
    given: Sequence[str] | Keep | None, before: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    return before if isinstance(given, Keep) else _tuple(given)


def add_user(
    path: str | os.PathLike[str],
    name: str,
    password: str,
    *,
    cost: int = DEFAULT_COST,
    replace: bool = False,
    end_sessions: bool = False,
    admin: bool | None = None,
    client_id_prefixes: Sequence[str] | None = None,
    publish: Sequence[str] | Keep | None = KEEP,
    subscribe: Sequence[str] | Keep | None = KEEP,
) -> None:
    """Add `name` to the users file (creating the file, never its directory), or change their
    password with replace=True; end_sessions=True also voids the sessions they have now.
    `admin`: mark the user admin (True) or not (False); None keeps what a replaced user had.
    `client_id_prefixes`: the prefixes the user's client ids must start with; an empty
    sequence allows any client id; None keeps what a replaced user had (a new user: any).
    `publish`, `subscribe`: the user's topic patterns (an empty sequence: none allowed); None:
    no restriction; KEEP (the default) keeps what a replaced user had (a new user: none
    restricted)."""
    path = Path(path)
    validate_name(name)
    if not password:
        raise ValueError("password must not be empty")
    if client_id_prefixes is not None:
        for prefix in client_id_prefixes:
            validate_client_id_prefix(prefix)
    _validate_patterns(publish)
    _validate_patterns(subscribe)
    _check_directory(path)
    # Load first: a malformed file is an error, never silently overwritten.
    store = UserStore.load(path)
    existing = store.get(name)
    if existing is not None and not replace:
        raise UserExistsError(f"user {name!r} already exists in {path}")
    hashed = hash_password(password, cost=cost)
    # A password change keeps the date the user was created.
    created = existing.created if existing is not None else _now_iso()
    if end_sessions:
        # Microseconds: a session opened with the new password a moment later stays valid.
        valid_after: str | None = _now_iso("microseconds")
    else:
        valid_after = existing.sessions_valid_after if existing is not None else None
    users = dict(store.records())
    if admin is None:
        admin = existing.admin if existing is not None else False
    prefixes: tuple[str, ...] | None
    if client_id_prefixes is None:
        prefixes = existing.client_id_prefixes if existing is not None else None
    else:
        # Order kept, repeats dropped; none given: any client id.
        prefixes = tuple(dict.fromkeys(client_id_prefixes)) or None
    users[name] = UserRecord(
        hash=hashed,
        created=created,
        sessions_valid_after=valid_after,
        admin=admin,
        client_id_prefixes=prefixes,
        publish=_kept(publish, existing.publish if existing is not None else None),
        subscribe=_kept(subscribe, existing.subscribe if existing is not None else None),
    )
    _write(path, users)


def set_user(
    path: str | os.PathLike[str],
    name: str,
    *,
    publish: Sequence[str] | Keep | None = KEEP,
    subscribe: Sequence[str] | Keep | None = KEEP,
) -> UserRecord:
    """Change `name`'s topic permissions, leaving the password (and all else) as it is; returns
    the new record. Each list: KEEP (the default) leaves it; None lifts it (every topic,
    unless the broker runs with --default-deny); a sequence replaces it (empty: nothing).
    Raises `PatternError` for an invalid pattern, `UserNotFoundError` for no such user."""
    path = Path(path)
    _validate_patterns(publish)
    _validate_patterns(subscribe)
    store = UserStore.load(path)
    existing = store.get(name)
    if existing is None:
        raise UserNotFoundError(f"no user {name!r} in {path}")
    record = replace(
        existing,
        publish=_kept(publish, existing.publish),
        subscribe=_kept(subscribe, existing.subscribe),
    )
    users = dict(store.records())
    users[name] = record
    _write(path, users)
    return record


def _tuple(patterns: Sequence[str] | None) -> tuple[str, ...] | None:
    # Order kept, repeats dropped.
    return None if patterns is None else tuple(dict.fromkeys(patterns))


def remove_user(path: str | os.PathLike[str], name: str) -> None:
    """Remove `name` from the users file; a running broker ends their sessions on reload."""
    path = Path(path)
    store = UserStore.load(path)
    if name not in store:
        raise UserNotFoundError(f"no user {name!r} in {path}")
    users = dict(store.records())
    del users[name]
    _write(path, users)
