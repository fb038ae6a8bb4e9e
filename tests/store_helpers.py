"""Helpers for the store's tests: wait for a batch or a read, and a few ready-made records."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from tether.broker.store import (
    Entries,
    SessionRecord,
    Store,
    StoreError,
    StoreOp,
    token_hash,
)

WAIT = 10.0


def submit(store: Store, *ops: StoreOp) -> StoreError | None:
    """Submit one batch and wait for its outcome."""
    done = threading.Event()
    outcome: list[StoreError | None] = []

    def on_done(error: StoreError | None) -> None:
        outcome.append(error)
        done.set()

    store.submit(tuple(ops), on_done)
    assert done.wait(WAIT), "on_done was never called"
    return outcome[0]


def ok(store: Store, *ops: StoreOp) -> None:
    error = submit(store, *ops)
    assert error is None, error


def read(store: Store, session_id: str, topic: str, after: int = 0, limit: int = 1000) -> Entries:
    done = threading.Event()
    result: list[tuple[Entries, StoreError | None]] = []

    def on_read(entries: Entries, error: StoreError | None) -> None:
        result.append((entries, error))
        done.set()

    store.read_queue(session_id, topic, after, limit, on_read)
    assert done.wait(WAIT), "read_queue never answered"
    entries, error = result[0]
    assert error is None, error
    return entries


def read_all(store: Store, session_id: str, topic: str, page: int = 7) -> Entries:
    """The whole queue, a page at a time (as a resume streams it back)."""
    out: list[tuple[int, bytes]] = []
    after = 0
    while True:
        entries = read(store, session_id, topic, after, page)
        out.extend(entries)
        if len(entries) < page:
            return tuple(out)
        after = entries[-1][0]


def session(session_id: str = "s1", client_id: str = "c1", **changes: Any) -> SessionRecord:
    record = SessionRecord(
        session_id=session_id,
        client_id=client_id,
        username="alice",
        keepalive=30,
        metadata={"site": "north", "n": 3, "raw": b"\x00\xff"},
        token_hash=token_hash(f"token-{session_id}"),
        previous_hash=None,
        created=1_700_000_000.25,
        last_seen=1_700_000_100.5,
    )
    return replace(record, **changes)
