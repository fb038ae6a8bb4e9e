"""`Client`: the blocking front end of the connection state machine, on three threads (reader,
writer and keepalive, dispatcher: docs/client.md). The machine is touched only under
`self._lock`, and no application code ever runs under that lock."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from . import events as ev
from .errors import ClientClosed, ConnectionFailed, Rejected, Timeout, TlsError
from .frontend import (
    END,
    STOP,
    Cancel,
    Claim,
    FrontEnd,
    Item,
    Notice,
    Stop,
    SubItem,
    SubscriptionBase,
    callback_name,
)
from .machine import Phase
from .options import ClientOptions, read_health
from .router import Router
from .state import save_state
from .tls import TlsStream

__all__ = ["Client", "Subscription"]

Handler = Callable[[ev.Message], object]

_READ_SIZE = 256 * 1024


class _Stream(Protocol):
    """A connection as the reader and the writer use it: a socket, or a `TlsStream`."""

    def recv(self, size: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> None: ...

    def shutdown(self, how: int, /) -> None: ...

    def close(self) -> None: ...


class Subscription(SubscriptionBase):
    """One topic of a `Client`. Without a handler, iterate over it to get the messages: each
    one is acked when the loop asks for the next (so the loop body is the handler)."""

    def __init__(self, client: Client, topic: str, handler: Handler | None) -> None:
        super().__init__(topic, handler)
        self.client = client
        self._queue: queue.SimpleQueue[SubItem] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[ev.Message]:
        return self

    def __next__(self) -> ev.Message:
        message = self.get()
        if message is None:
            raise StopIteration
        return message

    def get(self, timeout: float | None = None) -> ev.Message | None:
        """The next message (acking the previous one), or None once unsubscribed or closed.
        Raises `Timeout` when none came within `timeout` seconds."""
        self._check_iterable()
        self._settle()
        if self._ended:
            return None
        try:
            return self._take(self._queue.get(timeout=timeout))
        except queue.Empty:
            raise self._no_message(timeout) from None

    def unsubscribe(self, *, wait: bool = True) -> None:
        self.client.unsubscribe(self.topic, wait=wait)

    def _settle(self) -> None:
        if self._current is not None:
            message, self._current = self._current, None
            self.client._handled([message])

    def _push(self, item: SubItem) -> None:
        self._queue.put(item)


class _Waiter:
    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: ev.RequestDone | ev.RequestFailed | None = None


class Client(FrontEnd):
    """A blocking Tether client. `Client(options)` or `Client(client_id=..., ...)`; use it as
    a context manager, or call `connect()` and `close()`."""

    _registered: threading.Event
    _ended: threading.Event

    def __init__(self, options: ClientOptions | None = None, /, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._router: Router[Subscription] = Router()
        self._inbox: queue.SimpleQueue[Item[Subscription] | Stop] = queue.SimpleQueue()
        self._sock: _Stream | None = None
        self._registered = threading.Event()
        self._ended = threading.Event()  # the machine is closed: no more connections
        self._next_ping = 0.0
        self._stopping = False
        self._close_done = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout: float | None = None) -> Client:
        """Start the client and wait until it holds a session (retrying meanwhile).

        Raises `AuthFailed`, `Rejected` (e.g. `conflict`), or `ConnectionFailed`: at once when
        the connection is refused or the host unknown, else when no session came within
        `timeout` (default `options.connect_timeout`). Once a session was had, the client
        retries for as long as it runs.
        """
        if self._close_started:
            raise ClientClosed()
        if not self._threads:
            for target, name in (
                (self._read_loop, "tether-reader"),
                (self._write_loop, "tether-keepalive"),
                (self._dispatch_loop, "tether-dispatch"),
            ):
                thread = threading.Thread(target=target, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()
        limit = timeout if timeout is not None else self.options.connect_timeout
        deadline = time.monotonic() + limit
        while not self._registered.is_set():
            if self._ended.is_set():
                error = self._end_error or ClientClosed()
                self.close()
                raise error
            if time.monotonic() >= deadline:
                error = self._connect_timed_out(limit)
                self.close()
                raise error
            self._registered.wait(0.05)
        return self

    def close(self) -> None:
        """Stop: acks what was handled, saves the state file, closes the connection. The
        session lingers on the broker for its expiry (use `unregister()` to end it).
        Idempotent: a second call waits for the first to finish. From a handler, the
        message being handled counts as handled, and no later one is."""
        me = threading.current_thread()
        with self._cond:
            if self._close_started:
                wait = me not in self._threads  # a handler must not wait for itself
            else:
                wait = None
                self._close_started = True
                current = self._in_handler
                if current is not None and me is self._thread("tether-dispatch"):
                    self._machine.handled(current)
                self._machine.flush_acks()
                self._on_events(self._machine.close())
                self._stopping = True
                self._cond.notify_all()
        if wait is not None:
            if wait:
                self._close_done.wait()
            return
        try:
            writer = self._thread("tether-keepalive")
            if writer is not None and writer is not me:
                writer.join(5.0)  # it sends the last acks first
            self._shutdown_socket()
            self._inbox.put(STOP)
            for thread in self._threads:
                if thread is not me:
                    thread.join(5.0)
            self._save_state()
            self._end_subscriptions()
        finally:
            self._release_state_file()
            self._close_done.set()

    def unregister(self) -> None:
        """End the session for good (queues discarded), then close."""
        with self._cond:
            req = self._machine.unregister()
            waiter = self._waiter(req)
            self._cond.notify_all()
        try:
            self._wait(waiter, req, "unregister")
        finally:
            self.close()

    # --- requests ------------------------------------------------------------------------

    def subscribe(
        self, topic: str, handler: Handler | None = None, *, wait: bool = True
    ) -> Subscription:
        """Subscribe; `handler(message)` runs for each message (in the dispatcher thread),
        or iterate over the returned `Subscription`. With `wait`, returns once the broker
        confirmed (raises `Timeout` after the request timeout: the client keeps trying)."""
        sub = Subscription(self, topic, handler)
        with self._cond:
            self._check_usable()
            req = self._machine.subscribe(topic)
            waiter = self._waiter(req) if wait else None
            # Routed by the dispatcher, in turn with the messages, so that messages held
            # for this topic are handed over before any newer one.
            self._inbox.put(Claim(topic, sub))
            self._cond.notify_all()
        if waiter is not None:
            try:
                self._wait(waiter, req, f"subscribe to {topic!r}")
            except Rejected:
                # Refused (`not_authorized`...): nothing will come, so the iteration ends.
                self._inbox.put(Cancel(topic))
                raise
        return sub

    def unsubscribe(self, topic: str, *, wait: bool = True) -> None:
        with self._cond:
            self._check_usable()
            req = self._machine.unsubscribe(topic)
            waiter = self._waiter(req) if wait else None
            self._inbox.put(Cancel(topic))
            self._cond.notify_all()
        if waiter is not None:
            self._wait(waiter, req, f"unsubscribe from {topic!r}")

    def publish(self, topic: str, payload: bytes | str, *, confirm: bool = False) -> None:
        """Publish (a str is sent as UTF-8). With `confirm`, return once the broker accepted
        it for every current subscriber. Blocks while `max_buffer` bytes wait to be sent."""
        data = payload.encode() if isinstance(payload, str) else payload
        limit = self.options.request_timeout
        deadline = time.monotonic() + limit
        with self._cond:
            self._check_usable()
            while self._machine.buffered > self.options.max_buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(
                        f"{self._machine.buffered} bytes still wait to be sent after "
                        f"{limit:g} s: the broker is unreachable or slower than the publisher"
                    )
                self._cond.wait(remaining)
                self._check_usable()
            req = self._machine.publish(topic, data, confirm=confirm)
            waiter = self._waiter(req) if req is not None else None
            self._cond.notify_all()
        if waiter is not None and req is not None:
            self._wait(waiter, req, f"publish to {topic!r}")

    def stats(self) -> dict[str, Any]:
        """The broker's counters (counter name -> int: docs/protocol.md, section 10)."""
        with self._cond:
            self._check_usable()
            req = self._machine.stats()
            waiter = self._waiter(req)
            self._cond.notify_all()
        return self._wait(waiter, req, "stats") or {}

    # --- internals: requests -------------------------------------------------------------

    def _waiter(self, req: int) -> _Waiter:
        waiter = _Waiter()
        self._waiters[req] = waiter
        return waiter

    def _wait(self, waiter: _Waiter, req: int, what: str) -> dict[str, Any] | None:
        """The request's result (for `stats`; else None), or its error raised."""
        timeout = self.options.request_timeout
        if not waiter.done.wait(timeout):
            with self._lock:
                self._waiters.pop(req, None)
            raise Timeout(
                f"no answer from the broker to {what} within {timeout:g} s (the client keeps "
                "trying): check the connection, or raise request_timeout"
            )
        answer = waiter.answer
        if isinstance(answer, ev.RequestFailed):
            raise answer.error
        return answer.result if answer is not None else None

    def _thread(self, name: str) -> threading.Thread | None:
        return next((t for t in self._threads if t.name == name), None)

    # --- internals: events (called with the lock held; no application code here) --------

    def _to_dispatcher(self, item: ev.Event) -> None:
        self._inbox.put(item)

    def _settle(self, answer: ev.RequestDone | ev.RequestFailed) -> None:
        waiter = self._waiters.pop(answer.req, None)
        if waiter is not None:
            waiter.answer = answer
            waiter.done.set()

    def _wake(self) -> None:
        self._cond.notify_all()

    def _retry_later(self, req: int, delay: float) -> None:
        timer = threading.Timer(delay, self._retry, args=(req,))
        timer.daemon = True
        timer.start()

    def _retry(self, req: int) -> None:
        with self._cond:
            if not self._machine.closed:
                self._machine.retry(req)
            self._cond.notify_all()  # the writer sends it

    def _on_registered(self) -> None:
        self._next_ping = time.monotonic() + self._machine.keepalive

    # --- internals: the reader -----------------------------------------------------------

    def _read_loop(self) -> None:
        attempt = 0
        o = self.options
        while not self._ended.is_set() and not self._stopping:
            try:
                sock = self._dial()
            except OSError as exc:
                self._last_error = exc
                self._log.info("connect_failed", host=o.host, port=o.port, error=str(exc))
                refused = self._tls_failure(exc) or self._refused_at_once(exc)
                if refused is not None:
                    with self._cond:
                        self._on_events(self._machine.close(refused))
                        self._cond.notify_all()
                    break
            else:
                with self._cond:
                    if self._stopping or self._machine.closed:
                        sock.close()
                        break
                    self._sock = sock
                    self._drop_connection = False
                    self._ending = None
                    self._machine.connection_made()
                    self._cond.notify_all()
                if self._read_connection(sock):
                    attempt = 0
            if self._ended.is_set() or self._stopping:
                break
            delay = self._reconnect_delay(attempt)
            attempt += 1
            self._log.debug("reconnect_wait", delay=round(delay, 3), attempt=attempt)
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._machine.closed, delay)

    def _dial(self) -> _Stream:
        """A connection to the broker, its TLS handshake done when TLS is on."""
        o = self.options
        timeout = min(10.0, o.connect_timeout)
        sock = socket.create_connection((o.host, o.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is None:
                sock.settimeout(None)
                return sock
            stream = TlsStream(sock, self._ssl, o.tls_hostname)
            stream.handshake()  # within the connect timeout
            sock.settimeout(None)
            return stream
        except BaseException:
            sock.close()
            raise

    def _tls_failure(self, exc: BaseException) -> TlsError | None:
        if self._ssl is None:
            return None
        return self._tls_peer.failure(exc, had_session=self._registered.is_set())

    def _read_connection(self, sock: _Stream) -> bool:
        """Read until the connection ends; True if it registered."""
        registered = False
        received = False
        error: BaseException | None = None
        transition = False
        tls: TlsError | None = None
        try:
            while True:
                try:
                    data = sock.recv(_READ_SIZE)
                except OSError as exc:
                    error = exc
                    break
                if not data:
                    error = ConnectionFailed("the broker closed the connection")
                    break
                received = True
                with self._cond:
                    self._on_events(self._machine.receive_data(data))
                    # Duplicates make no event for the dispatcher but still need their ack.
                    self._machine.flush_acks()
                    registered = registered or self._machine.phase is Phase.READY
                    self._cond.notify_all()
                    drop = self._drop_connection or self._machine.closed
                if drop:
                    break
        finally:
            if not received and self._ssl is not None and not self._stopping:
                tls = self._tls_peer.ended_unanswered(error, had_session=self._registered.is_set())
            with self._cond:
                if self._sock is sock:
                    self._sock = None
                if tls is not None:
                    self._ending = tls
                events = self._machine.connection_lost(self._connection_ended(error))
                transition = any(isinstance(e, ev.Disconnected) for e in events)
                self._on_events(events)
                if tls is not None:
                    self._on_events(self._machine.close(tls))
                self._cond.notify_all()
            with contextlib.suppress(OSError):
                sock.close()
        if not transition and not self._stopping and not self._machine.closed:
            # (A connection that held the session is told as `disconnected`.)
            self._log.info("connection_lost", error=str(self._last_error))
        return registered

    def _shutdown_socket(self) -> None:
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # --- internals: the writer and keepalive ---------------------------------------------

    def _write_loop(self) -> None:
        while True:
            ping_due = False
            with self._cond:
                while True:
                    sock = self._sock
                    if sock is not None:
                        data = self._machine.data_to_send()
                        if data:
                            break
                    if self._stopping or self._machine.closed:
                        return
                    now = time.monotonic()
                    if sock is not None and self._machine.phase is Phase.READY:
                        if now >= self._next_ping:
                            ping_due = True
                            break
                        self._cond.wait(self._next_ping - now)
                    else:
                        self._cond.wait()
            if ping_due:
                self._keepalive(sock)
                continue
            try:
                sock.sendall(data)
            except OSError as exc:
                self._last_error = exc
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._cond:
                self._cond.notify_all()  # publishers waiting for buffer room

    def _keepalive(self, sock: _Stream) -> None:
        try:
            health = read_health(self.options.health)
        except Exception:
            self._log.exception("health_callable_failed")
            health = None
        with self._cond:
            if self._sock is not sock or self._machine.phase is not Phase.READY:
                return
            now = time.monotonic()
            interval = self._machine.keepalive
            self._next_ping = now + interval
            if self._ping is not None and now - self._ping[1] >= interval:
                # A whole keepalive without a pong: the broker or the path to it is dead.
                self._log.warning("pong_timeout", waited=round(now - self._ping[1], 1))
                self._ending = ConnectionFailed("no pong from the broker")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                return
            req = self._ping_with(health)
            if req is not None and self._ping is None:
                self._ping = (req, now)

    # --- internals: the dispatcher -------------------------------------------------------

    def _dispatch_loop(self) -> None:
        inbox = self._inbox
        while True:
            item = inbox.get()
            batch = [item]
            while len(batch) < 1000:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            done: list[ev.Message] = []
            for item in batch:
                if item is STOP:
                    self._handled(done)
                    return
                self._dispatch(item, done)
            self._handled(done)

    def _dispatch(self, item: Item[Subscription], done: list[ev.Message]) -> None:
        if isinstance(item, ev.Message):
            sub, drop = self._router.route(item)
            if sub is not None:
                self._deliver(sub, item, done)
            elif drop:
                done.append(item)
        elif isinstance(item, ev.Registered):
            self._save_state()
        elif isinstance(item, ev.SubscriptionRevoked):
            # The broker ended it (permissions changed): its iterator ends, then the notice.
            with self._lock:
                old = self._router.remove(item.topic)
            if old is not None:
                old._push(END)
            if (notice := self._notice(item)) is not None:
                self._callback(notice)
        elif (notice := self._notice(item)) is not None:
            self._callback(notice)
        elif isinstance(item, Claim):
            with self._lock:
                old = self._router.get(item.topic)
                held = self._router.add(item.topic, item.sub)
            if old is not None and old is not item.sub:
                old._push(END)
            for message in held:
                self._deliver(item.sub, message, done)
        elif isinstance(item, Cancel):
            with self._lock:
                old = self._router.remove(item.topic)
            if old is not None:
                old._push(END)
        elif isinstance(item, ev.Closed):
            self._end_subscriptions()

    def _end_subscriptions(self) -> None:
        with self._lock:
            subs = self._router.subscriptions()
        for sub in subs:
            sub._push(END)

    def _deliver(self, sub: Subscription, message: ev.Message, done: list[ev.Message]) -> None:
        if self._close_started:
            return  # close() (maybe from a handler) ends handling: the rest stays unacked
        if sub.handler is None:
            sub._push(message)  # acked when the iterating code asks for the next one
            return
        self._in_handler = message
        try:
            sub.handler(message)
        except Exception:
            # A handler that fails does not stop the others; the message counts as handled
            # (redelivering it to the same code would most likely fail the same way).
            self._log.exception("handler_failed", topic=message.topic, seq=message.seq)
        finally:
            self._in_handler = None
        done.append(message)

    def _callback(self, notice: Notice) -> None:
        try:
            notice()
        except Exception:
            self._log.exception("callback_failed", callback=callback_name(notice))

    def _handled(self, messages: list[ev.Message]) -> None:
        """Mark messages handled and ack them (one ack per topic), then save the state."""
        with self._cond:
            for message in messages:
                self._machine.handled(message)
            self._machine.flush_acks()
            self._cond.notify_all()
        self._save_state()

    def _save_state(self) -> None:
        path = self.options.state_file
        if path is None or (self._file_lock is not None and not self._file_lock.held):
            return  # (a handler that outlived close(): the file is no longer ours)
        with self._state_lock:
            with self._lock:
                state = self._machine.take_state()
            if state is not None:
                try:
                    save_state(path, state)
                except OSError as exc:
                    self._log.error("state_file_not_saved", path=str(path), error=str(exc))
