"""Publishers held back by a full queue: each connection's waiting batches, in order, its wait,
and the round robin of retries. Pure: the timer and the `Throttle` are injected callables.

Theory of operation: a held connection's batches wait here oldest first, and every later batch
of it queues behind them, so one connection's answers keep their order. A wait is named by a
token, renewed whenever the connection makes progress (or its topic's subscribers free room):
the wait counts time without progress, so only a timer whose token is still current may force
it. See docs/architecture.md section 7 ("Publishers held back by a full queue").
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, KeysView
from dataclasses import dataclass

from tether.broker.messages import ConnHandle, SessionOps
from tether.protocol import Publish

__all__ = ["HeldPublishers", "Retry"]

# Handles a held batch again (forced or not); returns its ops not taken, or None: all were.
Retry = Callable[[SessionOps, bool], SessionOps | None]


@dataclass(slots=True)
class _Held:
    conn: ConnHandle
    batches: deque[SessionOps]
    token: int  # tells this wait's timer from an earlier wait's


class HeldPublishers:
    """`arm(conn_id, token)` starts a wait's timer (whose end the caller hands to
    `is_current`, then `release(..., only=conn_id, force=True)`); `throttle(conn, paused)`
    tells a connection to stop or start reading."""

    __slots__ = ("_arm", "_held", "_throttle", "_tokens", "conn_ids")

    def __init__(
        self,
        *,
        arm: Callable[[int, int], None],
        throttle: Callable[[ConnHandle, bool], None],
    ) -> None:
        self._arm = arm
        self._throttle = throttle
        self._held: dict[int, _Held] = {}  # conn_id -> its batches, in the line's order
        self._tokens = itertools.count(1)
        # The held connections' ids, next to be retried first: a live, read-only view, so
        # that "is anyone held?" costs the caller no call per batch.
        self.conn_ids: KeysView[int] = self._held.keys()

    def token_of(self, conn_id: int) -> int | None:
        held = self._held.get(conn_id)
        return held.token if held is not None else None

    def is_current(self, conn_id: int, token: int) -> bool:
        """Is `token` that of the connection's wait now (not of an earlier, ended one)?"""
        held = self._held.get(conn_id)
        return held is not None and held.token == token

    def queue_behind(self, batch: SessionOps) -> bool:
        """If the batch's connection is held, the batch waits behind its others (True)."""
        held = self._held.get(batch.conn.conn_id)
        if held is None:
            return False
        held.batches.append(batch)
        return True

    def hold(self, conn: ConnHandle, rest: SessionOps) -> None:
        """Start holding `conn` (not held yet) with `rest`, the ops of its batch not taken."""
        held = _Held(conn, deque([rest]), 0)
        self._held[conn.conn_id] = held
        self._throttle(conn, True)
        self._renew(held)

    def _renew(self, held: _Held) -> None:
        held.token = next(self._tokens)
        self._arm(held.conn.conn_id, held.token)

    def release(
        self,
        retry: Retry,
        *,
        only: int | None = None,
        force: bool = False,
        freed: set[str] | None = None,
    ) -> None:
        """Retry the held batches (of `only`, or of every held connection in turn).
        `freed`: the topics whose subscribers just made room: publishers waiting on them count
        that as progress even when others took the room first (the wait is for a stuck
        subscriber, not for a turn). `retry` may call `release` again (an unregister in a
        batch frees room): each connection is looked up afresh."""
        for conn_id in [only] if only is not None else list(self._held):
            held = self._held.get(conn_id)
            if held is None:
                continue
            progressed = False
            while held.batches:
                batch = held.batches.popleft()
                rest = retry(batch, force)
                if rest is not None:
                    held.batches.appendleft(rest)
                    progressed = progressed or len(rest.ops) < len(batch.ops)
                    break
                progressed = True
            if self._held.get(conn_id) is not held:
                continue  # a nested release settled it meanwhile
            if not held.batches:
                del self._held[conn_id]
                self._throttle(held.conn, False)
            elif progressed:
                # Round robin: whoever got room goes to the back of the line.
                del self._held[conn_id]
                self._held[conn_id] = held
                self._renew(held)
            elif freed and _blocked_topic(held) in freed:
                self._renew(held)


def _blocked_topic(held: _Held) -> str | None:
    """The topic of the publish a held connection waits with (its first op not taken)."""
    first = held.batches[0].ops[0] if held.batches and held.batches[0].ops else None
    return first.topic if type(first) is Publish else None
