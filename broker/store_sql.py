"""The SQLite store's statements: one batch applied to a connection (consecutive operations of
one kind as one `executemany`), the start-up snapshot, and a page of a queue.
See docs/architecture.md, "The store"."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from itertools import groupby
from typing import Any

import msgpack

from tether.broker.store import (
    Ack,
    Append,
    Batch,
    BatchRejected,
    DeleteSession,
    Discard,
    DiscardOldest,
    Entries,
    MarkSent,
    PutSession,
    SessionRecord,
    SetDropped,
    SetHealth,
    SetTokens,
    Snapshot,
    StoreOp,
    Subscribe,
    SubscriptionRecord,
    Touch,
    Unsubscribe,
)

__all__ = ["apply_batch", "read_entries", "read_snapshot"]

_SUB = "(SELECT sub_id FROM subscriptions WHERE session_id = ? AND topic = ?)"


def _pack(value: Mapping[str, Any] | None) -> bytes | None:
    return None if value is None else msgpack.packb(dict(value), use_bin_type=True)


def _unpack(value: bytes | None) -> dict[str, Any] | None:
    return None if value is None else msgpack.unpackb(value, raw=False)


def _put_session(conn: sqlite3.Connection, ops: Sequence[PutSession]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO sessions (session_id, client_id, username, keepalive,"
        " metadata, token_hash, previous_hash, created, last_seen, expires_at, health,"
        " health_details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                s.session_id,
                s.client_id,
                s.username,
                s.keepalive,
                _pack(s.metadata),
                s.token_hash,
                s.previous_hash,
                s.created,
                s.last_seen,
                s.expires_at,
                s.health,
                _pack(s.health_details),
            )
            for s in (op.session for op in ops)
        ],
    )


def _delete_session(conn: sqlite3.Connection, ops: Sequence[DeleteSession]) -> None:
    ids = [(op.session_id,) for op in ops]
    conn.executemany(
        "DELETE FROM messages WHERE sub_id IN"
        " (SELECT sub_id FROM subscriptions WHERE session_id = ?)",
        ids,
    )
    conn.executemany("DELETE FROM subscriptions WHERE session_id = ?", ids)
    conn.executemany("DELETE FROM sessions WHERE session_id = ?", ids)


def _set_health(conn: sqlite3.Connection, ops: Sequence[SetHealth]) -> None:
    conn.executemany(
        "UPDATE sessions SET health = ?, health_details = ? WHERE session_id = ?",
        [(op.health, _pack(op.details), op.session_id) for op in ops],
    )


def _set_tokens(conn: sqlite3.Connection, ops: Sequence[SetTokens]) -> None:
    conn.executemany(
        "UPDATE sessions SET token_hash = ?, previous_hash = ? WHERE session_id = ?",
        [(op.token_hash, op.previous_hash, op.session_id) for op in ops],
    )


def _touch(conn: sqlite3.Connection, ops: Sequence[Touch]) -> None:
    conn.executemany(
        "UPDATE sessions SET last_seen = ?, expires_at = ? WHERE session_id = ?",
        [(op.last_seen, op.expires_at, op.session_id) for op in ops],
    )


def _subscribe(conn: sqlite3.Connection, ops: Sequence[Subscribe]) -> None:
    for op in ops:
        cur = conn.execute(
            "INSERT INTO subscriptions (session_id, topic, active, next_seq)"
            " SELECT ?1, ?2, 1, ?3 WHERE EXISTS (SELECT 1 FROM sessions WHERE session_id = ?1)"
            " ON CONFLICT (session_id, topic) DO UPDATE"
            " SET active = 1, next_seq = max(next_seq, excluded.next_seq)",
            (op.session_id, op.topic, op.next_seq),
        )
        if cur.rowcount != 1:
            raise BatchRejected(op, f"no session {op.session_id!r}")


def _unsubscribe(conn: sqlite3.Connection, ops: Sequence[Unsubscribe]) -> None:
    keys = [(op.session_id, op.topic) for op in ops]
    conn.executemany(f"DELETE FROM messages WHERE sub_id = {_SUB}", keys)
    conn.executemany(
        "UPDATE subscriptions SET active = 0, sent_upto = 0, dropped_live = 0,"
        " dropped_away = 0 WHERE session_id = ? AND topic = ?",
        keys,
    )


def _append(conn: sqlite3.Connection, ops: Sequence[Append]) -> None:
    rows: list[tuple[int, int, bytes]] = []
    for op in ops:
        # One statement checks the rules, moves next_seq on and names the queue.
        found = conn.execute(
            "UPDATE subscriptions SET next_seq = ?1 + ?2"
            " WHERE session_id = ?3 AND topic = ?4 AND active AND next_seq <= ?1"
            " RETURNING sub_id",
            (op.first_seq, len(op.payloads), op.session_id, op.topic),
        ).fetchone()
        if found is None:
            raise BatchRejected(
                op,
                f"no active subscription {op.session_id!r}/{op.topic!r}"
                f" whose next seq is at most {op.first_seq}",
            )
        sub_id = found[0]
        rows.extend((sub_id, op.first_seq + i, p) for i, p in enumerate(op.payloads))
    conn.executemany("INSERT INTO messages (sub_id, seq, payload) VALUES (?, ?, ?)", rows)


def _ack(conn: sqlite3.Connection, ops: Sequence[Ack]) -> None:
    conn.executemany(
        f"DELETE FROM messages WHERE sub_id = {_SUB} AND seq <= ?",
        [(op.session_id, op.topic, op.upto) for op in ops],
    )


def _mark_sent(conn: sqlite3.Connection, ops: Sequence[MarkSent]) -> None:
    conn.executemany(
        "UPDATE subscriptions SET sent_upto = max(sent_upto, ?)"
        " WHERE session_id = ? AND topic = ? AND active",
        [(op.upto, op.session_id, op.topic) for op in ops],
    )


def _discard(conn: sqlite3.Connection, ops: Sequence[Discard]) -> None:
    conn.executemany(
        f"DELETE FROM messages WHERE sub_id = {_SUB} AND seq = ?",
        [(op.session_id, op.topic, seq) for op in ops for seq in op.seqs],
    )


def _discard_oldest(conn: sqlite3.Connection, ops: Sequence[DiscardOldest]) -> None:
    conn.executemany(
        f"DELETE FROM messages WHERE sub_id = {_SUB} AND seq IN"
        f" (SELECT seq FROM messages WHERE sub_id = {_SUB} ORDER BY seq LIMIT ?)",
        [(op.session_id, op.topic, op.session_id, op.topic, op.count) for op in ops],
    )


def _set_dropped(conn: sqlite3.Connection, ops: Sequence[SetDropped]) -> None:
    conn.executemany(
        "UPDATE subscriptions SET dropped_live = ?, dropped_away = ?"
        " WHERE session_id = ? AND topic = ? AND active",
        [(op.live, op.away, op.session_id, op.topic) for op in ops],
    )


_Apply = Callable[[sqlite3.Connection, Sequence[Any]], None]
_APPLY: dict[type, _Apply] = {
    PutSession: _put_session,
    DeleteSession: _delete_session,
    SetHealth: _set_health,
    SetTokens: _set_tokens,
    Touch: _touch,
    Subscribe: _subscribe,
    Unsubscribe: _unsubscribe,
    Append: _append,
    Ack: _ack,
    MarkSent: _mark_sent,
    Discard: _discard,
    DiscardOldest: _discard_oldest,
    SetDropped: _set_dropped,
}


def apply_batch(conn: sqlite3.Connection, batch: Batch) -> None:
    """Apply `batch` in order, inside the caller's transaction. Raises `BatchRejected` when
    it breaks the store's rules (the caller rolls the batch back)."""
    for kind, run in groupby(batch, type):
        ops: list[StoreOp] = list(run)
        apply = _APPLY.get(kind)
        if apply is None:
            raise BatchRejected(ops[0], "not a store operation")
        # Operations of one kind in a row touch their rows in order either way.
        apply(conn, ops)


def read_snapshot(conn: sqlite3.Connection) -> Snapshot:
    sessions = tuple(
        SessionRecord(
            session_id=row[0],
            client_id=row[1],
            username=row[2],
            keepalive=row[3],
            metadata=_unpack(row[4]) or {},
            token_hash=row[5],
            previous_hash=row[6],
            created=row[7],
            last_seen=row[8],
            expires_at=row[9],
            health=row[10],
            health_details=_unpack(row[11]),
        )
        for row in conn.execute(
            "SELECT session_id, client_id, username, keepalive, metadata, token_hash,"
            " previous_hash, created, last_seen, expires_at, health, health_details"
            " FROM sessions ORDER BY session_id"
        )
    )
    subscriptions = tuple(
        SubscriptionRecord(
            session_id=row[0],
            topic=row[1],
            active=bool(row[2]),
            next_seq=row[3],
            sent_upto=row[4],
            dropped_live=row[5],
            dropped_away=row[6],
            queued=row[7],
            queued_bytes=row[8],
        )
        for row in conn.execute(
            "SELECT s.session_id, s.topic, s.active, s.next_seq, s.sent_upto, s.dropped_live,"
            " s.dropped_away, count(m.seq), coalesce(sum(length(m.payload)), 0)"
            " FROM subscriptions AS s LEFT JOIN messages AS m ON m.sub_id = s.sub_id"
            " GROUP BY s.sub_id ORDER BY s.session_id, s.topic"
        )
    )
    return Snapshot(sessions, subscriptions)


def read_entries(
    conn: sqlite3.Connection, session_id: str, topic: str, after_seq: int, limit: int
) -> Entries:
    return tuple(
        conn.execute(
            f"SELECT seq, payload FROM messages WHERE sub_id = {_SUB} AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (session_id, topic, after_seq, limit),
        )
    )
