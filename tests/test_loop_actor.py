"""LoopActor on a real asyncio loop in a thread: order, fairness between ready actors, tells
racing in from other threads, stop and teardown, and what a failure does.

Tests synchronise on futures and events (with timeouts as a safety net), never on sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import pytest
from pykka import ActorDeadError, ActorRef

from tether.broker.loop_actor import DRAIN_BATCH, RUN_BUDGET, LoopActor, tell

WAIT = 10.0  # seconds: a safety net, never a way to synchronise
T = TypeVar("T")


class Probe:
    """What one actor did, for the test thread to look at once a future or event says so."""

    def __init__(self, expect: int | None = None) -> None:
        self.got: list[Any] = []
        self.expect = expect
        self.all_in = threading.Event()  # set once `expect` messages were recorded
        self.stops = 0
        self.stopped = threading.Event()
        self.failures: list[type[BaseException] | None] = []
        self.failed = threading.Event()


class Recorder(LoopActor):
    """Records what it handles (in its probe, and as (name, message) in a shared log)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        *,
        probe: Probe,
        name: str = "actor",
        log: list[Any] | None = None,
    ) -> None:
        super().__init__(loop, loop_thread)
        self.probe = probe
        self.name = name
        self.log = log if log is not None else []

    def on_receive(self, message: Any) -> Any:
        match message:
            case ("raise", BaseException() as exc):
                raise exc
            case ("tell", ActorRef() as ref, inner):
                self._record(message)
                ref.tell(inner)
            case "got":
                return list(self.probe.got)
            case _:
                self._record(message)
                return ("handled", message)
        return None

    def _record(self, message: Any) -> None:
        self.probe.got.append(message)
        self.log.append((self.name, message))
        if len(self.probe.got) == self.probe.expect:
            self.probe.all_in.set()

    def on_stop(self) -> None:
        self.probe.stops += 1
        self.probe.stopped.set()

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.probe.failures.append(exception_type)
        self.probe.failed.set()


class Resilient(Recorder):
    resume_after_failure = True


class Loop:
    """A running loop on its own thread, and the actors started on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()
        assert self.thread.ident is not None
        self.ident = self.thread.ident
        self.refs: list[ActorRef[Any]] = []

    def start(
        self, cls: type[Recorder], expect: int | None = None, **kwargs: Any
    ) -> tuple[ActorRef[Recorder], Probe]:
        """Start through pykka's `start()`, so in its registry."""
        probe = Probe(expect)
        ref = cls.start(self.loop, self.ident, probe=probe, **kwargs)
        self.refs.append(ref)
        return ref, probe

    def start_unregistered(
        self, cls: type[Recorder], **kwargs: Any
    ) -> tuple[ActorRef[Recorder], Probe]:
        probe = Probe()
        ref = cls(self.loop, self.ident, probe=probe, **kwargs).start_unregistered()
        self.refs.append(ref)
        return ref, probe

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop thread, as one callback, and return what it returned."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=WAIT)

    def close(self) -> None:
        for ref in self.refs:
            ref.stop(block=False)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=WAIT)
        assert not self.thread.is_alive()
        self.loop.close()


def got(ref: ActorRef[Recorder]) -> list[Any]:
    """What the actor has recorded, asked after everything told to it before."""
    recorded: list[Any] = ref.ask("got", block=True, timeout=WAIT)
    return recorded


@pytest.fixture
def on_loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


# --- order and fairness ---------------------------------------------------------------------


def test_one_actors_messages_are_handled_in_order(on_loop: Loop) -> None:
    ref, _ = on_loop.start(Recorder)
    count = 3 * DRAIN_BATCH + 7  # several batches
    for i in range(count):
        ref.tell(i)

    # Told from the loop thread too, in one callback: still in order, after the others.
    def tell_from_the_loop() -> None:
        for i in range(count):
            ref.tell(("loop", i))

    on_loop.call(tell_from_the_loop)
    assert got(ref) == [*range(count), *(("loop", i) for i in range(count))]


def test_a_busy_actor_does_not_starve_another(on_loop: Loop) -> None:
    log: list[Any] = []
    busy, _ = on_loop.start(Recorder, name="busy", log=log)
    other, _ = on_loop.start(Recorder, name="other", log=log)

    def tell_both() -> None:
        for i in range(3 * DRAIN_BATCH):
            busy.tell(i)
        other.tell("mine")

    on_loop.call(tell_both)
    assert got(other) == ["mine"]
    assert got(busy) == list(range(3 * DRAIN_BATCH))
    # The busy actor handled one batch, then the other had its turn, then the busy one again.
    assert log.index(("other", "mine")) == DRAIN_BATCH
    assert [m for name, m in log if name == "busy"] == list(range(3 * DRAIN_BATCH))


def test_a_run_gives_the_loop_back_after_its_budget(on_loop: Loop) -> None:
    log: list[Any] = []
    ref, _ = on_loop.start(Recorder, log=log)

    def tell_then_schedule() -> None:
        for i in range(2 * RUN_BUDGET + 1):
            ref.tell(i)
        # Scheduled after the run: it runs once the run has spent its budget, before the rest.
        on_loop.loop.call_soon(log.append, "loop turn")

    on_loop.call(tell_then_schedule)
    assert len(got(ref)) == 2 * RUN_BUDGET + 1
    assert log.index("loop turn") == RUN_BUDGET


def test_a_tell_made_during_a_run_is_handled_in_that_run(on_loop: Loop) -> None:
    log: list[Any] = []
    first, _ = on_loop.start(Recorder, name="first", log=log)
    second, _ = on_loop.start(Recorder, name="second", log=log)

    def tell_then_schedule() -> None:
        first.tell(("tell", second, "relayed"))
        on_loop.loop.call_soon(log.append, "loop turn")

    on_loop.call(tell_then_schedule)
    # The relay runs on the loop after `call` returns; a callback queued now lands behind both
    # the run and the loop turn, so once it has run, asking `second` sees the relayed message.
    on_loop.call(lambda: None)
    assert got(second) == ["relayed"]
    assert log == [("first", ("tell", second, "relayed")), ("second", "relayed"), "loop turn"]


def test_tells_racing_in_from_many_threads_are_all_handled_in_each_senders_order(
    on_loop: Loop,
) -> None:
    senders, per_sender = 8, 5000
    ref, probe = on_loop.start(Recorder, expect=senders * per_sender)
    gate = threading.Barrier(senders)

    def send(sender: int) -> None:
        gate.wait(timeout=WAIT)
        for i in range(per_sender):
            ref.tell((sender, i))

    # Switch threads often, so puts land while the loop clears and re-checks the flag.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT)
            assert not thread.is_alive()
    finally:
        sys.setswitchinterval(interval)
    # Nothing more is told until all have been handled: a put stranded behind a lowered flag
    # would wait for the next put, and this would time out.
    assert probe.all_in.wait(WAIT)
    handled = got(ref)  # asked after every sender's last tell
    assert len(handled) == senders * per_sender
    for sender in range(senders):
        assert [i for s, i in handled if s == sender] == list(range(per_sender))


# --- starting and stopping ------------------------------------------------------------------


def test_start_unregistered_starts_an_actor_outside_pykkas_registry(on_loop: Loop) -> None:
    from pykka import ActorRegistry

    ref, _ = on_loop.start_unregistered(Recorder)
    assert ref.ask("hello", timeout=WAIT) == ("handled", "hello")
    assert ref not in ActorRegistry.get_all()
    # Started on the loop thread, it is ready at once: a tell right after is handled.
    ref2, _ = on_loop.call(lambda: on_loop.start_unregistered(Recorder))
    assert ref2.ask("hi", timeout=WAIT) == ("handled", "hi")


def test_stop_runs_on_stop_once_and_refuses_what_comes_after(on_loop: Loop) -> None:
    log: list[Any] = []
    ref, probe = on_loop.start(Recorder, log=log)

    def queue_behind_a_stop() -> tuple[Any, ...]:
        # All in the inbox before the actor handles any of them.
        before = ref.ask("before", block=False)
        stop = ref.stop(block=False)
        second_stop = ref.stop(block=False)
        after = ref.ask("after", block=False)
        ref.tell("told after")
        return before, stop, second_stop, after

    before, stop, second_stop, after = on_loop.call(queue_behind_a_stop)
    assert before.get(timeout=WAIT) == ("handled", "before")
    assert stop.get(timeout=WAIT) is True
    assert second_stop.get(timeout=WAIT) is True  # "was being stopped", as pykka answers
    with pytest.raises(ActorDeadError):
        after.get(timeout=WAIT)
    assert log == [("actor", "before")]
    assert probe.stops == 1
    assert not ref.is_alive()
    with pytest.raises(ActorDeadError):
        ref.tell("late")
    with pytest.raises(ActorDeadError):
        ref.ask("late", timeout=WAIT)
    assert tell(ref, "late") is False
    assert ref.stop(timeout=WAIT) is False
    assert probe.stops == 1
    assert probe.failures == []


# --- failures -------------------------------------------------------------------------------


def test_an_exception_in_an_ask_goes_to_the_caller_and_the_actor_lives_on(on_loop: Loop) -> None:
    ref, probe = on_loop.start(Recorder)
    with pytest.raises(ValueError, match="bad request"):
        ref.ask(("raise", ValueError("bad request")), timeout=WAIT)
    assert ref.ask("next", timeout=WAIT) == ("handled", "next")
    assert ref.is_alive()
    assert probe.failures == []


def test_resume_after_failure_logs_and_handles_the_next_message(
    on_loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    ref, probe = on_loop.start(Resilient)
    ref.tell(("raise", ValueError("bad tell")))
    assert ref.ask("next", timeout=WAIT) == ("handled", "next")
    assert ref.is_alive()
    assert probe.failures == []
    failed = [r.getMessage() for r in caplog.records if "actor_message_failed" in r.getMessage()]
    assert len(failed) == 1
    assert "Resilient" in failed[0]


def test_without_resume_a_failed_tell_stops_the_actor_and_calls_on_failure(
    on_loop: Loop,
) -> None:
    ref, probe = on_loop.start(Recorder)
    ref.tell(("raise", ValueError("bad tell")))
    behind = ref.ask("behind", block=False)
    assert probe.failed.wait(WAIT)
    assert probe.failures == [ValueError]
    with pytest.raises(ActorDeadError):
        behind.get(timeout=WAIT)  # queued behind the failure, or refused after it
    assert not ref.is_alive()
    assert probe.stops == 0  # pykka calls on_failure instead of on_stop


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_or_system_exit_stops_every_registered_actor(
    on_loop: Loop, exc_type: type[BaseException]
) -> None:
    ref, probe = on_loop.start(Recorder, name="interrupted")
    other_ref, other_probe = on_loop.start(Recorder, name="other")
    unregistered_ref, _ = on_loop.start_unregistered(Recorder, name="unregistered")
    ref.tell(("raise", exc_type()))
    assert probe.stopped.wait(WAIT)
    assert other_probe.stopped.wait(WAIT)
    assert not ref.is_alive()
    assert not other_ref.is_alive()
    assert probe.stops == 1
    assert probe.failures == []  # on_stop, not on_failure, as pykka does
    # Swallowed, not raised into the loop: the loop and the actors outside the registry go on.
    assert on_loop.call(lambda: "loop alive") == "loop alive"
    assert unregistered_ref.ask("ping", timeout=WAIT) == ("handled", "ping")


def test_an_ask_that_raises_keyboard_interrupt_is_answered_with_actor_dead(
    on_loop: Loop,
) -> None:
    ref, probe = on_loop.start(Recorder)
    with pytest.raises(ActorDeadError):
        ref.ask(("raise", KeyboardInterrupt()), timeout=WAIT)
    assert probe.stopped.wait(WAIT)
    assert probe.stops == 1
