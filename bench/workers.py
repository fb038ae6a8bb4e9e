"""Load generator processes: how the bench starts them, talks to them and waits for them.

Every generator runs in its own forked process, so it shares no GIL with the bench or with
other generators. The bench drives each one with commands over a pipe; a generator answers on
one shared queue and counts its progress in a shared array the progress bar reads. Every wait
has a deadline, so a broker that hangs makes the bench fail with a message, never hang.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.harness import BenchError, Server

# fork: a generator starts in milliseconds and needs nothing re-imported.
_CTX = mp.get_context("fork")
MAX_SLOTS = 64


class ProgressSink(Protocol):
    def update(self, done: int) -> None: ...


@dataclass
class Link:
    """A generator's end: commands in, replies and progress out."""

    name: str
    slot: int
    results: Any  # multiprocessing Queue
    progress: Any  # multiprocessing RawArray of int64
    commands: multiprocessing.connection.Connection

    def reply(self, step: str, **data: Any) -> None:
        self.results.put({"who": self.name, "kind": "reply", "step": step, **data})

    def tick(self, done: int) -> None:
        self.progress[self.slot] = done

    def command(self, timeout: float = 600.0) -> tuple[str, dict[str, Any]]:
        if not self.commands.poll(timeout):
            raise BenchError(f"{self.name}: no command from the bench within {timeout:.0f} s")
        step, args = self.commands.recv()
        return str(step), dict(args)


def _child_main(
    fn: Callable[..., None], link: Link, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    try:
        fn(link, *args, **kwargs)
    except BaseException as exc:  # report anything, then let the process end
        if isinstance(exc, BenchError):
            detail = str(exc)
        elif isinstance(exc, OSError):  # a socket error says enough without a traceback
            detail = f"{type(exc).__name__}: {exc}"
        else:
            detail = traceback.format_exc(limit=6)
        link.results.put({"who": link.name, "kind": "error", "error": detail})


@dataclass
class Fleet:
    """The bench's end: starts generators, sends them commands, collects their replies."""

    server: Server | None = None
    results: Any = field(default_factory=_CTX.Queue)
    progress: Any = field(default_factory=lambda: _CTX.RawArray("q", MAX_SLOTS))
    procs: dict[str, Any] = field(default_factory=dict)
    pipes: dict[str, multiprocessing.connection.Connection] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    _backlog: list[dict[str, Any]] = field(default_factory=list)

    def start(self, name: str, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Fork a generator running `fn(link, *args, **kwargs)` (fork: nothing is pickled,
        so arguments may be anything; a `ClientTls` makes its context in the child)."""
        slot = len(self.procs)
        if slot >= MAX_SLOTS:
            raise BenchError("too many generator processes")
        parent_end, child_end = _CTX.Pipe()
        link = Link(name, slot, self.results, self.progress, child_end)
        proc = _CTX.Process(
            target=_child_main, args=(fn, link, args, kwargs), name=name, daemon=True
        )
        proc.start()
        self.procs[name] = proc
        self.slots[name] = slot
        self.pipes[name] = parent_end

    def send(self, step: str, names: list[str] | None = None, **args: Any) -> None:
        for name in names if names is not None else list(self.pipes):
            self.pipes[name].send((step, args))

    def reset_progress(self) -> None:
        for i in range(MAX_SLOTS):
            self.progress[i] = 0

    def done(self, names: list[str] | None = None) -> int:
        """Progress summed over the named generators (all by default)."""
        slots = [self.slots[n] for n in (names if names is not None else self.slots)]
        return int(sum(self.progress[i] for i in slots))

    def wait(
        self,
        step: str,
        names: list[str] | None = None,
        *,
        timeout: float,
        bar: ProgressSink | None = None,
        progress_of: list[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Wait until every named generator has replied to `step`; its replies by name.

        The bar shows the progress of `progress_of` (default: the generators waited for).
        """
        watched = progress_of if progress_of is not None else names
        want = set(names if names is not None else self.procs)
        got: dict[str, dict[str, Any]] = {}
        for msg in list(self._backlog):
            if msg["step"] == step and msg["who"] in want:
                got[msg["who"]] = msg
                self._backlog.remove(msg)
        deadline = time.monotonic() + timeout
        while len(got) < len(want):
            if bar is not None:
                bar.update(self.done(watched))
            try:
                msg = self.results.get(timeout=0.1)
            except queue.Empty:
                self._check(want - set(got), step, deadline, timeout)
                continue
            if msg["kind"] == "error":
                if self.server is not None:
                    time.sleep(0.2)  # a dead server is the cause to report, not its clients
                    self.server.check_alive()
                raise BenchError(f"generator {msg['who']} failed: {msg['error']}")
            if msg["step"] == step and msg["who"] in want:
                got[msg["who"]] = msg
            else:
                self._backlog.append(msg)
        if bar is not None:
            bar.update(self.done(watched))
        return got

    def _check(self, missing: set[str], step: str, deadline: float, timeout: float) -> None:
        if self.server is not None:
            self.server.check_alive()
        for name in missing:
            proc = self.procs[name]
            if not proc.is_alive() and self.results.empty():
                raise BenchError(f"generator {name} died (exit {proc.exitcode}) during {step!r}")
        if time.monotonic() > deadline:
            names = ", ".join(sorted(missing))
            raise BenchError(
                f"timed out after {timeout:.0f} s waiting for {step!r} from {names}"
                " (is the server stuck or too slow?)"
            )

    def close(self) -> None:
        for pipe in self.pipes.values():
            with contextlib.suppress(OSError):  # the generator may be gone already
                pipe.send(("exit", {}))
        for proc in self.procs.values():
            proc.join(timeout=3)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3)
        self.results.close()
        self.results.join_thread()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
