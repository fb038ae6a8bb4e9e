"""Pykka actors that share one asyncio event loop instead of owning a thread each.

See docs/architecture.md section 3 (and section 10 for what a failure does).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections import deque
from typing import Any, ClassVar, Self

import pykka
import structlog
from pykka import ActorDeadError, ActorRef, ActorRegistry

# pykka's private names stay in this module: it is the one place that implements an actor type.
from pykka._envelope import Envelope

__all__ = ["DRAIN_BATCH", "RUN_BUDGET", "LoopActor", "LoopInbox", "tell"]

_log = structlog.get_logger("tether.actor")

# Envelopes one actor handles before the next ready actor gets its turn, and envelopes one
# run handles (across actors) before giving the loop back to sockets and timers.
DRAIN_BATCH = 256
RUN_BUDGET = 1024


class _Runner:
    """Runs the ready actors of one loop, in turn, until none is ready (or the budget is
    spent). A tell made while it runs joins the line instead of waiting for the loop's next
    turn, so a message crossing three actors costs one loop iteration, not three."""

    __slots__ = ("_loop", "_pending", "_ready", "_running")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak, so that the registry below never keeps a loop alive.
        self._loop = weakref.ref(loop)
        self._ready: deque[LoopInbox] = deque()
        self._running = False
        self._pending = False

    def enqueue(self, inbox: LoopInbox) -> None:
        """Called on the loop's thread only."""
        self._ready.append(inbox)
        if not self._running and not self._pending:
            self._schedule()

    def _schedule(self) -> None:
        loop = self._loop()
        if loop is not None:
            self._pending = True
            loop.call_soon(self._run)

    def _run(self) -> None:
        self._pending = False
        self._running = True
        ready = self._ready
        budget = RUN_BUDGET
        try:
            while ready and budget > 0:
                inbox = ready.popleft()
                budget -= inbox._drain(min(DRAIN_BATCH, budget))
        finally:
            self._running = False
        if ready and not self._pending:
            self._schedule()


_runners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Runner] = (
    weakref.WeakKeyDictionary()
)


def _runner_for(loop: asyncio.AbstractEventLoop) -> _Runner:
    runner = _runners.get(loop)
    if runner is None:
        runner = _runners[loop] = _Runner(loop)
    return runner


class LoopInbox:
    """The inbox of one `LoopActor`: thread-safe to `put` into, drained on the loop."""

    __slots__ = ("_actor", "_loop", "_loop_thread", "_queue", "_runner", "_scheduled")

    def __init__(self, actor: LoopActor, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        self._actor = actor
        self._loop = loop
        self._loop_thread = loop_thread
        self._runner = _runner_for(loop)
        self._queue: deque[Envelope[Any]] = deque()
        self._scheduled = False

    def put(self, envelope: Envelope[Any], /) -> None:
        self._queue.append(envelope)
        if self._scheduled:
            return
        self._scheduled = True
        if threading.get_ident() == self._loop_thread:
            self._runner.enqueue(self)
        else:
            try:
                self._loop.call_soon_threadsafe(self._runner.enqueue, self)
            except RuntimeError:
                # The loop is closed: the broker is shutting down, nobody will read this.
                self._scheduled = False

    def get(self) -> Envelope[Any]:
        return self._queue.popleft()

    def empty(self) -> bool:
        return not self._queue

    def _drain(self, limit: int) -> int:
        """Handle up to `limit` envelopes; returns how many. Called by the runner only."""
        queue = self._queue
        actor = self._actor
        handled = 0
        while handled < limit and queue and not actor.actor_stopped.is_set():
            actor._handle_envelope(queue.popleft())
            handled += 1
        if actor.actor_stopped.is_set():
            self._scheduled = False
            actor._actor_loop_teardown()
            return handled
        if queue:
            self._runner.enqueue(self)  # still scheduled: back of the line
            return handled
        # Clear the flag before the last look, so a put racing from another thread either sees
        # the flag down and schedules, or lands before the look and is drained now.
        self._scheduled = False
        if queue and not self._scheduled:
            self._scheduled = True
            self._runner.enqueue(self)
        return handled


class LoopActor(pykka.Actor):
    """A pykka actor whose messages are handled on a shared asyncio loop."""

    resume_after_failure: ClassVar[bool] = False

    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        self.loop = loop
        self._loop_thread = loop_thread
        super().__init__()

    def start_unregistered(self) -> ActorRef[Self]:
        """Start this (already built) actor without putting it in pykka's registry.

        For an actor whose owner keeps its ref and stops it (pykka's registry removal is a list
        scan), and whose object is needed as well as its ref. `ActorRegistry.stop_all` does not
        reach it.
        """
        self._start_actor_loop()
        return self.actor_ref

    # --- pykka's hooks for an actor type ------------------------------------------------

    def _create_actor_inbox(self) -> LoopInbox:  # type: ignore[override]
        return LoopInbox(self, self.loop, self._loop_thread)

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        if threading.get_ident() == self._loop_thread:
            # At once: a message told right after this may be handled in the current run.
            self._actor_loop_setup()
        else:
            self.loop.call_soon_threadsafe(self._actor_loop_setup)

    def _handle_envelope(self, envelope: Envelope[Any]) -> None:
        """pykka's `_actor_loop_running`, one envelope at a time, plus `resume_after_failure`."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            elif self.resume_after_failure:
                _log.exception(
                    "actor_message_failed",
                    actor=type(self).__name__,
                    message=type(envelope.message).__name__,
                )
            else:
                exc_info = sys.exc_info()
                self._handle_failure(*exc_info)
                try:
                    self.on_failure(*exc_info)
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException as exc:
            # KeyboardInterrupt, SystemExit: as pykka does, stop this actor (on_stop runs) and
            # every registered one, and swallow it. Two differences the shared loop needs: the
            # stops are not waited for (they are handled by this very thread), and an `ask`
            # that caused it fails with ActorDeadError rather than going unanswered.
            _log.warning(
                "actor_interrupted_stopping_all",
                actor=type(self).__name__,
                message=type(envelope.message).__name__,
                error=repr(exc),
            )
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception(
                    exc_info=(
                        ActorDeadError,
                        ActorDeadError(f"{self.actor_ref} stopped by {exc!r}"),
                        None,
                    )
                )
            if not self.actor_stopped.is_set():  # else it came from on_stop: run that once
                self._stop()
            ActorRegistry.stop_all(block=False)


def tell(ref: ActorRef[Any] | None, message: Any) -> bool:
    """Tell `ref`, if it is still alive. Returns whether the message was posted.

    A dead recipient is a normal event here (a connection closed while a reply was in flight);
    the caller decides whether that matters.
    """
    if ref is None:
        return False
    try:
        ref.tell(message)
    except ActorDeadError:
        return False
    return True
