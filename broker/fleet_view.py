"""The fleet view of sessions (issue 11): presence, health staleness and paging, as pure
functions over the SessionManager's sessions, read in its turn (docs/operations.md).

Presence. A session is "online" while it holds a connection and a frame was read from it
within 1.5 x keepalive (`last_seen`, to about a second: a Listener reports its reads at most
once a second, `Seen`); otherwise it is "away": since its last disconnect, or, on a connection
gone silent, since `last_seen + 1.5 x keepalive`. The broker closes a connection silent that
long itself (the keepalive timeout), so the second case lasts about a second. A session loaded
from the store is away since its record's `last_seen`.

Health. `health.status` is what the client last said. An online session's health is stale when
no report (a `ping` with status or details) came for 2 x keepalive, counted from the later of
its last report and the start of its current connection: a report from an earlier connection
does not make a fresh one stale at once, and a client that never reports turns stale 2 x
keepalive after it connected. An away session's health is never stale: nothing is expected of
it.

Paging. `page` walks the client ids in sorted order (the manager keeps them sorted), from just
after `after`, or from the first id with the prefix (ids with one prefix are contiguous), and
stops after `limit` matches plus one more: `next` is set only when a further match exists.
Cost: the ids skipped by the filters plus `limit` views, never a sort.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence

from tether.broker.messages import HealthView, ListSessions, SessionPage, SessionView
from tether.broker.session_state import Session

__all__ = [
    "ONLINE_SILENCE",
    "STALE_SILENCE",
    "STATUSES",
    "check_query",
    "count_online",
    "page",
    "presence",
    "session_view",
]

ONLINE_SILENCE = 1.5  # x keepalive of silence after which a connected session is away
STALE_SILENCE = 2.0  # x keepalive without a health report after which it is stale
STATUSES = ("online", "away")


def presence(session: Session, now: float) -> tuple[bool, float | None]:
    """(online, away_since) of `session` at `now`."""
    if session.conn is None:
        return False, session.away_since
    silent_from = session.last_seen + ONLINE_SILENCE * session.keepalive
    if now <= silent_from:
        return True, None
    return False, silent_from


def count_online(sessions: Iterable[Session], now: float) -> int:
    return sum(1 for s in sessions if s.conn is not None and presence(s, now)[0])


def session_view(session: Session, now: float, expiry: float) -> SessionView:
    online, away_since = presence(session, now)
    stale = False
    if online:
        since = session.connected_since or session.last_seen
        if session.health_at is not None and session.health_at > since:
            since = session.health_at
        stale = now - since > STALE_SILENCE * session.keepalive
    if online:
        expires_at = None
    elif session.conn is None:
        expires_at = session.expires_at
    else:
        # Silent but not yet closed: its timer is armed when the keepalive timeout closes it.
        expires_at = (away_since or now) + expiry
    conn = session.conn
    return SessionView(
        client_id=session.client_id,
        username=session.username,
        session_id=session.session_id,
        status="online" if online else "away",
        connected_since=session.connected_since if online else None,
        away_since=away_since,
        last_seen=session.last_seen,
        expires_at=expires_at,
        peer=conn.peer if online and conn is not None else None,
        keepalive=session.keepalive,
        metadata=session.metadata,
        health=HealthView(
            status=session.health,
            details=session.health_details,
            at=session.health_at,
            stale=stale,
        ),
    )


def check_query(query: ListSessions) -> None:
    """Raise ValueError for a query no page can answer (the HTTP layer answers 400 first)."""
    if query.limit < 1:
        raise ValueError(f"limit must be at least 1, got {query.limit}")
    if query.status is not None and query.status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {query.status!r}")


def page(
    client_ids: Sequence[str],
    get: Callable[[str], Session],
    query: ListSessions,
    now: float,
    expiry: float,
) -> SessionPage:
    """One page of `query` over `client_ids` (sorted), each looked up with `get`."""
    check_query(query)
    start = 0 if query.after is None else bisect_right(client_ids, query.after)
    prefix = query.client_id_prefix or ""
    if prefix:
        start = max(start, bisect_left(client_ids, prefix))
    want_online = None if query.status is None else query.status == "online"
    found: list[SessionView] = []
    for index in range(start, len(client_ids)):
        client_id = client_ids[index]
        if prefix and not client_id.startswith(prefix):
            break  # past the contiguous run of ids with the prefix
        session = get(client_id)
        if query.username is not None and session.username != query.username:
            continue
        if want_online is not None and presence(session, now)[0] != want_online:
            continue
        if len(found) == query.limit:
            return SessionPage(tuple(found), found[-1].client_id)
        found.append(session_view(session, now, expiry))
    return SessionPage(tuple(found), None)
