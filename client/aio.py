"""`AsyncClient`: the asyncio front end of the connection state machine, with the blocking
`Client`'s semantics on three tasks instead of threads (docs/client.md). Handlers and
callbacks may be plain functions or coroutine functions."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ParamSpec

from . import events as ev
from .errors import ClientClosed, ConnectionFailed, Rejected, TetherError, Timeout, TlsError
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
from .options import ClientOptions, Health
from .router import Router
from .state import save_state

__all__ = ["AsyncClient", "AsyncSubscription"]

AsyncHandler = Callable[[ev.Message], object]  # may return an awaitable

_READ_SIZE = 256 * 1024

P = ParamSpec("P")


async def _call(func: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs) -> object:
    """Call application code, awaiting what it returns when that is awaitable."""
    result = func(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


class AsyncSubscription(SubscriptionBase):
    """One topic of an `AsyncClient`. Without a handler, `async for` over it: each message
    is acked when the loop asks for the next one."""

    def __init__(self, client: AsyncClient, topic: str, handler: AsyncHandler | None) -> None:
        super().__init__(topic, handler)
        self.client = client
        self._queue: asyncio.Queue[SubItem] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[ev.Message]:
        return self

    async def __anext__(self) -> ev.Message:
        message = await self.get()
        if message is None:
            raise StopAsyncIteration
        return message

    async def get(self, timeout: float | None = None) -> ev.Message | None:
        """The next message (acking the previous one), or None once unsubscribed or closed."""
        self._check_iterable()
        if self._current is not None:
            previous, self._current = self._current, None
            await self.client._handled([previous])
        if self._ended:
            return None
        try:
            return self._take(await asyncio.wait_for(self._queue.get(), timeout))
        except TimeoutError:
            raise self._no_message(timeout) from None

    async def unsubscribe(self, *, wait: bool = True) -> None:
        await self.client.unsubscribe(self.topic, wait=wait)


class AsyncClient(FrontEnd):
    """An asyncio Tether client: `async with AsyncClient(client_id=..., ...) as c: ...`."""

    _registered: asyncio.Event
    _ended: asyncio.Event

    def __init__(self, options: ClientOptions | None = None, /, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._waiters: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._router: Router[AsyncSubscription] = Router()
        self._inbox: asyncio.Queue[Item[AsyncSubscription] | Stop] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._flush_scheduled = False
        self._registered = asyncio.Event()
        self._ended = asyncio.Event()
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()  # set whenever buffered bytes may have gone down
        self._state_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._close_done = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float | None = None) -> AsyncClient:
        """Start and wait for a session; raises like `Client.connect` (at once when the
        connection is refused or the host unknown)."""
        if self._close_started:
            raise ClientClosed()
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name="tether-connection"),
                asyncio.create_task(self._keepalive_loop(), name="tether-keepalive"),
                asyncio.create_task(self._dispatch_loop(), name="tether-dispatch"),
            ]
        limit = timeout if timeout is not None else self.options.connect_timeout
        registered = asyncio.ensure_future(self._registered.wait())
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({registered, ended}, timeout=limit, return_when="FIRST_COMPLETED")
        finally:
            registered.cancel()
            ended.cancel()
        if self._registered.is_set():
            return self
        error: TetherError
        if self._ended.is_set():
            error = self._end_error or ClientClosed()
        else:
            error = self._connect_timed_out(limit)
        await self.close()
        raise error

    async def close(self) -> None:
        """Like `Client.close`: acks, saves the state, closes. Idempotent: a second call
        waits for the first to finish. From a handler, the message being handled counts as
        handled, and no later one is."""
        me = asyncio.current_task()
        if self._close_started:
            if me not in self._tasks:  # a handler must not wait for itself
                await self._close_done.wait()
            return
        self._close_started = True
        try:
            await self._close(me)
        finally:
            self._release_state_file()
            self._close_done.set()

    async def _close(self, me: asyncio.Task[object] | None) -> None:
        current = self._in_handler
        if current is not None and me in self._tasks and me.get_name() == "tether-dispatch":
            self._machine.handled(current)
        self._machine.flush_acks()
        self._on_events(self._machine.close())
        self._do_flush()
        self._stop.set()
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 5.0)
            writer.close()
        self._inbox.put_nowait(STOP)
        others = [t for t in self._tasks if t is not me]
        for task in others:
            if task.get_name() != "tether-dispatch":
                task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._save_state()
        self._end_subscriptions()

    async def unregister(self) -> None:
        """End the session for good (queues discarded), then close."""
        req = self._machine.unregister()
        future = self._future(req)
        self._schedule_flush()
        try:
            await self._wait(future, req, "unregister")
        finally:
            await self.close()

    # --- requests ------------------------------------------------------------------------

    async def subscribe(
        self, topic: str, handler: AsyncHandler | None = None, *, wait: bool = True
    ) -> AsyncSubscription:
        self._check_usable()
        sub = AsyncSubscription(self, topic, handler)
        req = self._machine.subscribe(topic)
        future = self._future(req) if wait else None
        self._inbox.put_nowait(Claim(topic, sub))
        self._schedule_flush()
        if future is not None:
            try:
                await self._wait(future, req, f"subscribe to {topic!r}")
            except Rejected:
                # Refused (`not_authorized`...): nothing will come, so the iteration ends.
                self._inbox.put_nowait(Cancel(topic))
                raise
        return sub

    async def unsubscribe(self, topic: str, *, wait: bool = True) -> None:
        self._check_usable()
        req = self._machine.unsubscribe(topic)
        future = self._future(req) if wait else None
        self._inbox.put_nowait(Cancel(topic))
        self._schedule_flush()
        if future is not None:
            await self._wait(future, req, f"unsubscribe from {topic!r}")

    async def publish(self, topic: str, payload: bytes | str, *, confirm: bool = False) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        limit = self.options.request_timeout
        deadline = time.monotonic() + limit
        self._check_usable()
        while self._buffered() > self.options.max_buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(
                    f"{self._buffered()} bytes still wait to be sent after {limit:g} s: the "
                    "broker is unreachable or slower than the publisher"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            self._check_usable()
        req = self._machine.publish(topic, data, confirm=confirm)
        self._schedule_flush()
        if req is not None:
            await self._wait(self._future(req), req, f"publish to {topic!r}")

    async def stats(self) -> dict[str, Any]:
        """The broker's counters (counter name -> int: docs/protocol.md, section 10)."""
        self._check_usable()
        req = self._machine.stats()
        future = self._future(req)
        self._schedule_flush()
        return await self._wait(future, req, "stats") or {}

    # --- internals: requests and writing -------------------------------------------------

    def _buffered(self) -> int:
        writer = self._writer
        pending = writer.transport.get_write_buffer_size() if writer is not None else 0
        return self._machine.buffered + pending

    def _future(self, req: int) -> asyncio.Future[dict[str, Any] | None]:
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiters[req] = future
        return future

    async def _wait(
        self, future: asyncio.Future[dict[str, Any] | None], req: int, what: str
    ) -> dict[str, Any] | None:
        """The request's result (for `stats`; else None), or its error raised."""
        timeout = self.options.request_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self._waiters.pop(req, None)
            raise Timeout(
                f"no answer from the broker to {what} within {timeout:g} s (the client keeps "
                "trying): check the connection, or raise request_timeout"
            ) from None

    def _schedule_flush(self) -> None:
        # Everything queued during this turn of the loop goes out as one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._do_flush)

    def _do_flush(self) -> None:
        self._flush_scheduled = False
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        data = self._machine.data_to_send()
        if data:
            writer.write(data)
        self._changed.set()

    # --- internals: events ---------------------------------------------------------------

    def _to_dispatcher(self, item: ev.Event) -> None:
        self._inbox.put_nowait(item)

    def _settle(self, answer: ev.RequestDone | ev.RequestFailed) -> None:
        future = self._waiters.pop(answer.req, None)
        if future is not None and not future.done():
            if isinstance(answer, ev.RequestFailed):
                future.set_exception(answer.error)
            else:
                future.set_result(answer.result)

    def _wake(self) -> None:
        self._changed.set()

    def _retry_later(self, req: int, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self._retry, req)

    def _retry(self, req: int) -> None:
        if not self._machine.closed:
            self._machine.retry(req)
            self._schedule_flush()

    # --- internals: the connection task --------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        o = self.options
        while not self._ended.is_set() and not self._stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(self._dial(), min(10.0, o.connect_timeout))
            except (OSError, TimeoutError) as exc:
                self._last_error = exc
                if not str(exc) and self._ssl is not None:  # (asyncio's EOF says nothing)
                    what = f"{type(exc).__name__}: the connection ended during the TLS handshake"
                    self._last_error = ConnectionFailed(what)
                error = str(self._last_error)
                self._log.info("connect_failed", host=o.host, port=o.port, error=error)
                refused = self._tls_failure(exc) or self._refused_at_once(exc)
                if refused is not None:
                    self._on_events(self._machine.close(refused))
                    break
            else:
                if self._stop.is_set() or self._machine.closed:
                    writer.close()
                    break
                self._writer = writer
                self._drop_connection = False
                self._ending = None
                self._machine.connection_made()
                self._do_flush()
                if await self._read_connection(reader, writer):
                    attempt = 0
            if self._ended.is_set() or self._stop.is_set():
                break
            delay = self._reconnect_delay(attempt)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        o = self.options
        if self._ssl is None:
            return await asyncio.open_connection(o.host, o.port, limit=_READ_SIZE)
        return await asyncio.open_connection(
            o.host, o.port, limit=_READ_SIZE, ssl=self._ssl, server_hostname=o.tls_hostname
        )

    def _tls_failure(self, exc: BaseException) -> TlsError | None:
        if self._ssl is None:
            return None
        return self._tls_peer.failure(exc, had_session=self._registered.is_set())

    async def _read_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        registered = False
        received = False
        error: BaseException | None = None
        transition = False
        tls: TlsError | None = None
        try:
            while True:
                try:
                    data = await reader.read(_READ_SIZE)
                except OSError as exc:
                    error = exc
                    break
                if not data:
                    error = ConnectionFailed("the broker closed the connection")
                    break
                received = True
                self._on_events(self._machine.receive_data(data))
                # Duplicates make no event for the dispatcher but still need their ack.
                self._machine.flush_acks()
                registered = registered or self._machine.phase is Phase.READY
                self._do_flush()
                if self._drop_connection or self._machine.closed:
                    break
        finally:
            if self._writer is writer:
                self._writer = None
            if not received and self._ssl is not None and not self._stop.is_set():
                tls = self._tls_peer.ended_unanswered(error, had_session=self._registered.is_set())
                if tls is not None:
                    self._ending = tls
            events = self._machine.connection_lost(self._connection_ended(error))
            transition = any(isinstance(e, ev.Disconnected) for e in events)
            self._on_events(events)
            if tls is not None:
                self._on_events(self._machine.close(tls))
            writer.transport.abort()
        if not transition and not self._stop.is_set() and not self._machine.closed:
            # (A connection that held the session is told as `disconnected`.)
            self._log.info("connection_lost", error=str(self._last_error))
        return registered

    # --- internals: keepalive ------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        while not self._ended.is_set():
            await asyncio.sleep(self._machine.keepalive)
            writer = self._writer
            if writer is None or self._machine.phase is not Phase.READY:
                continue
            now = time.monotonic()
            if self._ping is not None and now - self._ping[1] >= self._machine.keepalive:
                self._log.warning("pong_timeout", waited=round(now - self._ping[1], 1))
                self._ending = ConnectionFailed("no pong from the broker")
                writer.transport.abort()
                continue
            health = await self._read_health()
            if self._writer is not writer or self._machine.phase is not Phase.READY:
                continue
            req = self._ping_with(health)
            if req is not None and self._ping is None:
                self._ping = (req, now)
            self._schedule_flush()

    async def _read_health(self) -> Health | None:
        source = self.options.health
        if source is None:
            return None
        try:
            value = await _call(source)
            if isinstance(value, Health):
                return value
            if not isinstance(value, str):
                raise TypeError(f"a health callable returns a Health or a str, not {value!r}")
            return Health(value)
        except Exception:
            self._log.exception("health_callable_failed")
            return None

    # --- internals: the dispatcher -------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        inbox = self._inbox
        while True:
            batch = [await inbox.get()]
            while len(batch) < 1000 and not inbox.empty():
                batch.append(inbox.get_nowait())
            done: list[ev.Message] = []
            for item in batch:
                if item is STOP:
                    await self._handled(done)
                    return
                await self._dispatch(item, done)
            await self._handled(done)

    async def _dispatch(self, item: Item[AsyncSubscription], done: list[ev.Message]) -> None:
        if isinstance(item, ev.Message):
            sub, drop = self._router.route(item)
            if sub is not None:
                await self._deliver(sub, item, done)
            elif drop:
                done.append(item)
        elif isinstance(item, Claim):
            old = self._router.get(item.topic)
            held = self._router.add(item.topic, item.sub)
            if old is not None and old is not item.sub:
                old._queue.put_nowait(END)
            for message in held:
                await self._deliver(item.sub, message, done)
        elif isinstance(item, Cancel):
            old = self._router.remove(item.topic)
            if old is not None:
                old._queue.put_nowait(END)
        elif isinstance(item, ev.Registered):
            await self._save_state()
        elif isinstance(item, ev.SubscriptionRevoked):
            # The broker ended it (permissions changed): its iterator ends, then the notice.
            old = self._router.remove(item.topic)
            if old is not None:
                old._queue.put_nowait(END)
            if (notice := self._notice(item)) is not None:
                await self._callback(notice)
        elif (notice := self._notice(item)) is not None:
            await self._callback(notice)
        elif isinstance(item, ev.Closed):
            self._end_subscriptions()

    async def _deliver(
        self, sub: AsyncSubscription, message: ev.Message, done: list[ev.Message]
    ) -> None:
        if self._close_started:
            return  # close() (maybe from a handler) ends handling: the rest stays unacked
        if sub.handler is None:
            sub._queue.put_nowait(message)
            return
        self._in_handler = message
        try:
            await _call(sub.handler, message)
        except Exception:
            self._log.exception("handler_failed", topic=message.topic, seq=message.seq)
        finally:
            self._in_handler = None
        done.append(message)

    async def _callback(self, notice: Notice) -> None:
        try:
            await _call(notice)
        except Exception:
            self._log.exception("callback_failed", callback=callback_name(notice))

    def _end_subscriptions(self) -> None:
        for sub in self._router.subscriptions():
            sub._queue.put_nowait(END)

    async def _handled(self, messages: list[ev.Message]) -> None:
        for message in messages:
            self._machine.handled(message)
        self._machine.flush_acks()
        self._schedule_flush()
        await self._save_state()

    async def _save_state(self) -> None:
        path = self.options.state_file
        if path is None or (self._file_lock is not None and not self._file_lock.held):
            return  # (a handler that outlived close(): the file is no longer ours)
        async with self._state_lock:
            state = self._machine.take_state()
            if state is not None:
                try:
                    # fsync blocks: off the event loop.
                    await asyncio.to_thread(save_state, path, state)
                except OSError as exc:
                    self._log.error("state_file_not_saved", path=str(path), error=str(exc))
