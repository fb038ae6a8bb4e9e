"""The durable store's interface: what the managers save, load and stream back, as data.
Implementations: `store_sqlite.SqliteStore` (the default) and `store_memory.MemoryStore`
(`--in-memory`). See docs/architecture.md, "The store".

Theory of operation: a caller never waits on the disk. It `submit`s a batch (a tuple of the
write operations below, applied in order and atomically) with a callback; the callback is
called once the batch is durable, or has failed, and only then may the caller make a promise
that rests on it (an `ok`, a `deliver` with a new seq). Batches are applied in the order they
were submitted, and a `read_queue` sees every batch submitted before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Ack",
    "Append",
    "Batch",
    "BatchRejected",
    "DeleteSession",
    "Discard",
    "DiscardOldest",
    "Entries",
    "MarkSent",
    "OnDone",
    "OnRead",
    "PutSession",
    "SessionRecord",
    "SetDropped",
    "SetHealth",
    "SetTokens",
    "Snapshot",
    "Store",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "StoreOp",
    "StoreUnavailable",
    "StoreVersionError",
    "Subscribe",
    "SubscriptionRecord",
    "Touch",
    "Unsubscribe",
    "token_hash",
]


def token_hash(token: str) -> bytes:
    """What is stored of a resume token: its SHA-256 (the token itself never reaches disk)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


# --- errors -------------------------------------------------------------------------------


class StoreError(Exception):
    """The root of every error the store raises or reports."""


class StoreVersionError(StoreError):
    """The store was written by a newer Tether: no downgrade."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"store schema version {found} is newer than this Tether supports ({supported}); "
            "run a newer Tether on this data directory"
        )
        self.found = found
        self.supported = supported


class StoreCorrupt(StoreError):
    """The store's file cannot be read as a Tether store; it has been left as it was."""

    def __init__(self, path: str, reason: str) -> None:
        reason = " ".join(reason.split())  # one line, whatever SQLite said
        super().__init__(f"store {path} is corrupt or unreadable: {reason}")
        self.path = path
        self.reason = reason


class StoreLocked(StoreError):
    """Another process has the data directory open."""

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"store {path} is in use by {holder}")
        self.path = path
        self.pid = pid


class StoreUnavailable(StoreError):
    """A commit failed (disk full, I/O error, file deleted): the batch was not stored. The
    store keeps accepting batches and succeeds again once the cause is gone."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"store unavailable: {cause}")
        self.cause = cause


class StoreClosed(StoreError):
    """The store was used after `close()` (the caller's mistake)."""

    def __init__(self) -> None:
        super().__init__("the store is closed")


class BatchRejected(StoreError):
    """A batch broke the store's rules (the caller's bug): none of it was applied, and the
    batches committed with it were not affected."""

    def __init__(self, op: object | None, reason: str) -> None:
        where = "" if op is None else f" at {type(op).__name__}"
        super().__init__(f"batch rejected{where}: {reason}")
        self.op = op
        self.reason = reason


# --- records: what `load` returns ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session as stored. Times are wall-clock seconds (`time.time()`): they outlive the
    process. `expires_at` is None while connected. `metadata` and `health_details` are
    msgpack-able maps, not to be mutated once handed to the store."""

    session_id: str
    client_id: str
    username: str
    keepalive: int
    metadata: Mapping[str, Any]
    token_hash: bytes
    previous_hash: bytes | None
    created: float
    last_seen: float
    expires_at: float | None = None
    health: str | None = None
    health_details: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionRecord:
    """One (session, topic) as stored. An unsubscribed topic stays with `active` False and
    only its `next_seq`. `sent_upto`: every queued message up to it was sent at least once
    (a resume's `redeliver_upto`). `queued`/`queued_bytes`: what its queue holds."""

    session_id: str
    topic: str
    active: bool
    next_seq: int
    sent_upto: int
    dropped_live: int
    dropped_away: int
    queued: int
    queued_bytes: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything but the queued messages themselves (those stream back with `read_queue`).
    Sorted by session id, then topic."""

    sessions: tuple[SessionRecord, ...]
    subscriptions: tuple[SubscriptionRecord, ...]


# --- write operations: a batch is a tuple of these ----------------------------------------
# Operations on a session or subscription the store does not hold are no-ops, except the two
# that would leave data nowhere: `Subscribe` needs its session and `Append` an active
# subscription whose numbering it continues (`first_seq >= next_seq`). Breaking those rejects
# the whole batch (`BatchRejected`).


@dataclass(frozen=True, slots=True)
class PutSession:
    """Create or replace the session's record (its subscriptions are kept)."""

    session: SessionRecord


@dataclass(frozen=True, slots=True)
class DeleteSession:
    """The session, its subscriptions (next_seq included) and every message queued for it."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SetHealth:
    session_id: str
    health: str | None
    details: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class SetTokens:
    """The hashes (`token_hash`) of the current resume token and of the previous one."""

    session_id: str
    token_hash: bytes
    previous_hash: bytes | None


@dataclass(frozen=True, slots=True)
class Touch:
    """Connected (`expires_at` None) or away until `expires_at`; `last_seen` as of now."""

    session_id: str
    last_seen: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Start (or restart) a subscription; its `next_seq` never goes below what it was."""

    session_id: str
    topic: str
    next_seq: int = 1


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """End a subscription: its queue and dropped counters go, its `next_seq` stays."""

    session_id: str
    topic: str


@dataclass(frozen=True, slots=True)
class Append:
    """Queue `payloads` with the seqs `first_seq`, `first_seq + 1`, ...; `next_seq` moves
    past them. The payload objects are not copied: they must not change."""

    session_id: str
    topic: str
    first_seq: int
    payloads: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Remove every queued message with seq <= `upto`. The caller passes the last seq its
    in-memory ack removed: all sent messages are older than all unsent ones, so that is one
    range, and an ack never removes an unsent message."""

    session_id: str
    topic: str
    upto: int


@dataclass(frozen=True, slots=True)
class MarkSent:
    """Every queued message with seq <= `upto` has been sent (raises `sent_upto`). It need
    not be durable before the deliveries go out: lost, they are redelivered unflagged."""

    session_id: str
    topic: str
    upto: int


@dataclass(frozen=True, slots=True)
class Discard:
    """Remove these queued messages (overflow drops: the oldest unsent ones)."""

    session_id: str
    topic: str
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DiscardOldest:
    """Remove the `count` oldest queued messages (overflow of a queue held only here)."""

    session_id: str
    topic: str
    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


@dataclass(frozen=True, slots=True)
class SetDropped:
    """The subscription's dropped counters, as absolute values."""

    session_id: str
    topic: str
    live: int
    away: int


StoreOp = (
    PutSession
    | DeleteSession
    | SetHealth
    | SetTokens
    | Touch
    | Subscribe
    | Unsubscribe
    | Append
    | Ack
    | MarkSent
    | Discard
    | DiscardOldest
    | SetDropped
)
Batch = tuple[StoreOp, ...]
Entries = tuple[tuple[int, bytes], ...]
# Called once per batch, after its commit (None) or its failure; from the store's writer
# thread, so it must not block (the managers turn it into a `tell`).
OnDone = Callable[[StoreError | None], None]
# Called once per `read_queue`, with the entries in seq order (empty on error).
OnRead = Callable[[Entries, StoreError | None], None]


class Store(Protocol):
    """What the managers need of a store, SQLite's or another behind the same calls."""

    def load(self) -> Snapshot:
        """Everything stored, at start-up (blocks: never call it on the loop)."""
        ...

    def submit(self, batch: Batch, on_done: OnDone) -> None:
        """Apply `batch` atomically, after every batch submitted before it, and then call
        `on_done` (from any thread, possibly before `submit` returns). Never blocks. Raises
        `StoreClosed` after `close`."""
        ...

    def read_queue(
        self, session_id: str, topic: str, after_seq: int, limit: int, on_done: OnRead
    ) -> None:
        """Up to `limit` queued messages of (session, topic) with seq > `after_seq`, in seq
        order, as of every batch submitted before this call; off the caller's thread."""
        ...

    def close(self) -> None:
        """Commit what was submitted, call its callbacks, and release the store."""
        ...

    @property
    def failing(self) -> str | None:
        """Why the last commit failed, until one succeeds again (None: it succeeded). Read
        from any thread (/health answers 503 while it is set)."""
        ...
