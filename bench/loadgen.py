"""The load generators: each function here is the body of one generator process.

Written for speed, so they are never what limits a run: publishers send pre-encoded batches
with one `sendall` each; subscribers read big chunks, parse them incrementally and ack once
per read; thousands of sessions share one asyncio loop per process. They all check what they
receive (see bench/checks.py) and report their own CPU time for the measured phase.

The publishers and subscribers take `tls` (a `ClientTls`) to speak TLS to a server that
serves it (`scripts/bench --tls`); a TLS subscriber reads every record that has arrived
before it parses, so it parses and acks in batches as large as a plaintext one.
"""

from __future__ import annotations

import array
import asyncio
import math
import select
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.checks import MARK, MARK_SIZE, Stream, Tally, note
from bench.fastwire import DeliverDecoder
from bench.harness import (
    BENCH_PASSWORD,
    BENCH_USER,
    KEEPALIVE,
    BenchError,
    ClientTls,
    RawClient,
    raise_nofile,
)
from bench.workers import Link
from tether.protocol import (
    Ack,
    Dropped,
    Error,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Registered,
    Subscribe,
    encode,
)

READ_SIZE = 1 << 20  # big reads: fewer syscalls, more frames parsed per call
CONFIRM_REQ = 1  # the req of each publisher's last, confirmed, message


class PublishEncoder:
    """Publish frames for one topic whose payload carries a mark, built without msgpack.

    A publish map is encoded with the payload last, so every frame of a topic shares the
    bytes before the payload; only the mark differs.
    """

    def __init__(self, topic: str, size: int = 64) -> None:
        if size < MARK_SIZE:
            raise ValueError(f"payloads must hold the {MARK_SIZE}-byte mark")
        self.topic = topic
        self.size = size
        self.prefix = encode(Publish(topic=topic, payload=bytes(size)))[:-size]
        self.pad = bytes(size - MARK_SIZE)

    def frame(self, pub: int, counter: int, sent_ns: int = 0) -> bytes:
        return self.prefix + MARK.pack(pub, counter, sent_ns) + self.pad

    def frames(self, pub: int, first: int, count: int, sent_ns: int = 0) -> list[bytes]:
        prefix, pad, pack = self.prefix, self.pad, MARK.pack
        return [prefix + pack(pub, c, sent_ns) + pad for c in range(first, first + count)]

    def confirmed(self, pub: int, counter: int, req: int, sent_ns: int = 0) -> bytes:
        """The same message, asking the broker for an `ok` once it is accepted."""
        payload = MARK.pack(pub, counter, sent_ns) + self.pad
        return encode(Publish(topic=self.topic, payload=payload, req=req))


def _expect_ok(client: RawClient, req: int) -> None:
    for _ in range(10_000):  # a publisher is sent nothing else, bar errors
        frame = client.recv()
        if isinstance(frame, Ok) and frame.req == req:
            return
        if isinstance(frame, Error):
            raise BenchError(f"publish refused: {frame.code}: {frame.message}")
    raise BenchError("no publisher confirm")


# --- publishers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PubPlan:
    """What one publisher connection sends: `count` messages on each topic, in this order."""

    client_id: str
    pub_id: int
    topics: Sequence[tuple[str, int]]


def publisher(
    link: Link,
    address: tuple[str, int],
    plans: Sequence[PubPlan],
    batch: int,
    size: int,
    tls: ClientTls | None = None,
) -> None:
    """Several publisher connections, one process: pre-encoded batches, one sendall each.

    Connections take turns batch by batch (fan-in). The last message of each connection asks
    for a confirm, so the reply means the broker accepted everything.
    """
    raise_nofile()
    clients = []
    for plan in plans:
        client = RawClient(address, tls=tls)
        client.register(plan.client_id)
        clients.append(client)
    # Encoding happens before the clock starts: the run measures the broker, not this.
    batches = [_encode_plan(plan, batch, size) for plan in plans]
    total = sum(count for plan in plans for _, count in plan.topics)
    link.reply("ready")
    step, _ = link.command()
    if step != "go":
        return
    cpu0 = time.process_time()
    t_start = time.monotonic()
    sent = 0
    for r in range(max(len(b) for b in batches)):
        for client, conn_batches in zip(clients, batches, strict=True):
            if r < len(conn_batches):
                data, n = conn_batches[r]
                client.sock.sendall(data)
                sent += n
        link.tick(sent)
    t_sent = time.monotonic()
    for client in clients:
        _expect_ok(client, CONFIRM_REQ)
    t_confirmed = time.monotonic()
    link.tick(total)
    link.reply(
        "done",
        sent=total,
        t_start=t_start,
        t_sent=t_sent,
        t_confirmed=t_confirmed,
        cpu=time.process_time() - cpu0,
    )
    for client in clients:
        client.close()


def _encode_plan(plan: PubPlan, batch: int, size: int) -> list[tuple[bytes, int]]:
    """The connection's whole stream in batches; only its very last message is confirmed."""
    frames: list[bytes] = []
    for topic, count in plan.topics:
        enc = PublishEncoder(topic, size)
        frames += enc.frames(plan.pub_id, 1, count)
    last_topic, last_count = plan.topics[-1]
    frames[-1] = PublishEncoder(last_topic, size).confirmed(plan.pub_id, last_count, CONFIRM_REQ)
    return [
        (b"".join(frames[i : i + batch]), len(frames[i : i + batch]))
        for i in range(0, len(frames), batch)
    ]


def paced_publisher(
    link: Link,
    address: tuple[str, int],
    client_id: str,
    topic: str,
    rate: float,
    duration: float,
    interval: float,
    size: int,
    tls: ClientTls | None = None,
) -> None:
    """Publish at `rate` msg/s for `duration` s: a small batch every `interval` s.

    Each message carries the time.monotonic_ns() of its sendall (CLOCK_MONOTONIC is one
    clock for every process on Linux), so the subscriber can tell its latency.
    """
    client = RawClient(address, tls=tls)
    client.register(client_id)
    enc = PublishEncoder(topic, size)
    total = max(1, round(rate * duration))
    per_batch = max(1, round(rate * interval))
    n_batches = math.ceil(total / per_batch)
    step_ns = round(per_batch / rate * 1e9)
    link.reply("ready")
    step, _ = link.command()
    if step != "go":
        return
    cpu0 = time.process_time()
    t0 = time.monotonic_ns()
    sent = late = 0
    for k in range(n_batches):
        delay = t0 + k * step_ns - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        elif delay < -step_ns:
            late += 1  # the schedule slipped by more than a batch: said in the results
        count = min(per_batch, total - sent)
        now = time.monotonic_ns()
        frames = enc.frames(0, sent + 1, count, now)
        if sent + count == total:
            frames[-1] = enc.confirmed(0, total, CONFIRM_REQ, now)
        client.sock.sendall(b"".join(frames))
        sent += count
        link.tick(sent)
    t_sent = time.monotonic_ns()
    _expect_ok(client, CONFIRM_REQ)
    link.reply(
        "done",
        sent=total,
        t_start=t0 / 1e9,
        t_sent=t_sent / 1e9,
        late_batches=late,
        cpu=time.process_time() - cpu0,
    )
    client.close()


# --- subscribers ----------------------------------------------------------------------------


class _SubConn:
    __slots__ = ("acked", "client", "decoder", "done_at", "expected", "stream", "tally")

    def __init__(self, client: RawClient, expected: int) -> None:
        self.client = client
        # What the register and subscribe answers left in the client's decoder is empty:
        # the broker sends nothing before it is asked.
        self.decoder = DeliverDecoder()
        self.tally = Tally(expected=expected)
        self.stream = Stream(self.tally)
        self.expected = expected
        self.acked = 0
        self.done_at = 0.0


def subscriber(
    link: Link,
    address: tuple[str, int],
    client_ids: Sequence[str],
    topic: str,
    expected: int,
    latency: bool = False,
    idle_timeout: float = 20.0,
    max_seconds: float = 900.0,
    tls: ClientTls | None = None,
) -> None:
    """Subscribers of `topic` (one connection each) that check `expected` messages apiece.

    Reads whatever is there (up to 1 MiB), parses it incrementally and acks once per read
    and subscription. Once nothing has come for `idle_timeout` (2 s after the bench says
    every publisher was confirmed), what is missing is lost; the bench then says so.
    """
    raise_nofile()
    conns: list[_SubConn] = []
    for cid in client_ids:
        client = RawClient(address, tls=tls)
        client.register(cid)
        client.send(Subscribe(req=1, topic=topic))
        answer = client.recv()
        if not isinstance(answer, Ok):
            raise BenchError(f"subscribe {topic!r} failed: {answer!r}")
        if client.decoder.buffered:
            raise BenchError(f"unexpected frames after subscribing: {client.recv()!r}")
        conns.append(_SubConn(client, expected))
    sent_ns = array.array("q")
    lat_ns = array.array("q")
    sel = selectors.DefaultSelector()
    for conn in conns:
        sel.register(conn.client.sock, selectors.EVENT_READ, conn)
    sel.register(link.commands, selectors.EVENT_READ, None)  # "published": stop waiting soon
    link.reply("ready")
    cpu0 = time.process_time()
    t_first = t_data = 0.0
    waiting = len(conns)
    last_data = time.monotonic()
    hard_deadline = last_data + max_seconds
    settle_until = math.inf
    received = 0
    while True:
        now = time.monotonic()
        if now >= settle_until or now >= hard_deadline:
            break
        events = sel.select(timeout=min(0.5, max(0.0, settle_until - now)))
        now = time.monotonic()
        if not events:
            if waiting and now - last_data > idle_timeout:
                break  # what has not come by now is lost
            continue
        for key, _ in events:
            conn = key.data
            if conn is None:
                step, _ = link.command(0)
                if step == "published":
                    idle_timeout = min(idle_timeout, 2.0)
                elif step == "exit":
                    settle_until = now  # the bench gave up on this run
                continue
            last_data = now
            sock = conn.client.sock
            try:
                data = sock.recv(READ_SIZE) if tls is None else _recv_tls(sock)
            except (BlockingIOError, InterruptedError):
                continue
            recv_ns = time.monotonic_ns()
            if not t_first:
                t_first = now
            if not data:
                sel.unregister(sock)
                conn.tally.errors += 1
                note(conn.tally, "the broker closed the connection")
                if not conn.done_at:
                    waiting -= 1
                continue
            before = conn.tally.received
            _parse(conn, data, recv_ns, sent_ns if latency else None, lat_ns)
            if conn.tally.received > before:
                received += conn.tally.received - before
                t_data = now
            last = conn.stream.last_seq
            if last > conn.acked:
                conn.acked = last
                sock.sendall(encode(Ack(topic=topic, seq=last)))  # cumulative, once per read
            if not conn.done_at and conn.tally.received >= expected:
                conn.done_at = now
                waiting -= 1
                if not waiting:
                    # Keep listening briefly: a duplicate sent after the last one is caught too.
                    settle_until = now + 0.1
        link.tick(received)
    tally = Tally()
    for conn in conns:
        tally.add(conn.tally)
        conn.client.close()
    link.reply(
        "done",
        tally=tally.to_dict(),
        t_first=t_first,
        t_last=max((c.done_at for c in conns), default=0.0) if not waiting else t_data,
        complete=waiting == 0,
        cpu=time.process_time() - cpu0,
        sent_ns=sent_ns.tobytes(),
        lat_ns=lat_ns.tobytes(),
    )


def _recv_tls(sock: socket.socket) -> bytes:
    """What a plaintext `recv(READ_SIZE)` would return: every TLS record already here.

    One `recv` of a TLS socket returns at most one record (16 KiB); without this, a TLS
    subscriber would parse and ack 16 KiB at a time, sending the broker many more acks than
    a plaintext one for the same messages.
    """
    assert isinstance(sock, ssl.SSLSocket)
    chunks = [sock.recv(READ_SIZE)]
    size = len(chunks[0])
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    while chunks[-1] and size < READ_SIZE and (sock.pending() or poll.poll(0)):
        chunks.append(sock.recv(READ_SIZE - size))
        size += len(chunks[-1])
    return b"".join(chunks)


def _parse(
    conn: _SubConn,
    data: bytes,
    recv_ns: int,
    sent_ns: array.array[int] | None,
    lat_ns: array.array[int],
) -> None:
    deliver = conn.stream.deliver
    tally = conn.tally
    for item in conn.decoder.feed(data):
        if item.__class__ is tuple:
            _, seq, payload, redelivered = item  # type: ignore[misc]
            sent = deliver(seq, payload, redelivered)
            if sent > 0 and sent_ns is not None:
                sent_ns.append(sent)
                lat_ns.append(recv_ns - sent)
        elif isinstance(item, Dropped):
            tally.dropped += item.count
        elif isinstance(item, Error):
            tally.errors += 1
            note(tally, f"error {item.code}: {item.message}")


# --- a registration burst -------------------------------------------------------------------


def registration_burst(
    link: Link, address: tuple[str, int], n: int, username: str, password: str, prefix: str
) -> None:
    """On command, `n` fresh registrations sent together (connections opened beforehand)."""
    link.reply("ready")
    step, _ = link.command()
    if step != "burst":
        return
    cpu0 = time.process_time()
    clients = [RawClient(address, timeout=120) for _ in range(n)]
    frames = [
        encode(
            Register(
                req=1,
                client_id=f"{prefix}-{i}",
                username=username,
                password=password,
                keepalive=KEEPALIVE,
            )
        )
        for i in range(n)
    ]
    started = []
    for client, frame in zip(clients, frames, strict=True):
        started.append(time.monotonic())
        client.sock.sendall(frame)
    finished = [0.0] * n
    sel = selectors.DefaultSelector()
    for i, client in enumerate(clients):
        sel.register(client.sock, selectors.EVENT_READ, i)
    deadline = time.monotonic() + 120
    pending = n
    failures: list[str] = []
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            i = key.data
            frame = clients[i].recv()
            finished[i] = time.monotonic()
            if not isinstance(frame, Registered):
                failures.append(repr(frame))
            sel.unregister(key.fileobj)
            pending -= 1
            link.tick(n - pending)
    if pending:
        failures.append(f"{pending} registrations unanswered after 120 s")
    link.reply(
        "done",
        started=started,
        finished=finished,
        failures=failures,
        cpu=time.process_time() - cpu0,
    )
    for client in clients:
        client.close()


# --- many sessions on one asyncio loop ------------------------------------------------------


class _Session(asyncio.Protocol):
    """One session's connection: answers are matched to requests by `req`."""

    def __init__(self, topic: str, tally: Tally, expect: int = 0) -> None:
        self.topic = topic
        self.decoder = DeliverDecoder()
        self.transport: asyncio.Transport | None = None
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.stream = Stream(tally)
        self.tally = tally
        self.expect = expect
        self.got = 0
        self.acked = 0
        self.drained: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if expect == 0:
            self.drained.set_result(0.0)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def request(self, data: bytes, *reqs: int) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futures = []
        for req in reqs:
            future: asyncio.Future[Any] = loop.create_future()
            self.waiters[req] = future
            futures.append(future)
        assert self.transport is not None
        self.transport.write(data)
        return futures

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        try:
            items = self.decoder.feed(data)
        except BenchError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for item in items:
            if item.__class__ is tuple:
                topic, seq, payload, redelivered = item  # type: ignore[misc]
                if topic != self.topic:
                    self.tally.errors += 1
                    note(self.tally, f"deliver on {topic!r}, not {self.topic!r}")
                elif stream.deliver(seq, payload, redelivered) >= 0:
                    self.got += 1
            elif isinstance(item, (Registered, Ok, Pong)):
                future = self.waiters.pop(item.req or 0, None)
                if future is not None and not future.done():
                    future.set_result(item)
            elif isinstance(item, Error):
                future = self.waiters.pop(item.req or 0, None)
                problem = BenchError(f"error {item.code}: {item.message}")
                if future is not None and not future.done():
                    future.set_exception(problem)
                else:
                    self.tally.errors += 1
                    note(self.tally, str(problem))
            elif isinstance(item, Dropped):
                self.tally.dropped += item.count
        if stream.last_seq > self.acked and self.transport is not None:
            self.acked = stream.last_seq
            self.transport.write(encode(Ack(topic=self.topic, seq=self.acked)))
        if self.got >= self.expect and not self.drained.done():
            self.drained.set_result(time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(BenchError("the broker closed the connection"))

    def _fail(self, problem: BenchError) -> None:
        for future in [*self.waiters.values(), self.drained]:
            if not future.done():
                future.set_exception(problem)
                future.exception()  # retrieved: no "never retrieved" noise for unawaited ones
        self.waiters.clear()


@dataclass
class _Info:
    client_id: str
    topic: str
    session_id: str = ""
    resume_token: str = ""
    conn: _Session | None = None


class _Shard:
    """A share of the sessions of a scenario, driven step by step by the bench."""

    def __init__(
        self,
        link: Link,
        address: tuple[str, int],
        names: Sequence[tuple[str, str]],
        inflight: int,
        op_timeout: float,
    ) -> None:
        self.link = link
        self.address = address
        self.sessions = [_Info(cid, topic) for cid, topic in names]
        self.inflight = inflight
        self.op_timeout = op_timeout

    async def run_all(self, op: Callable[[int], Any]) -> dict[str, Any]:
        """`op` on every session, at most `inflight` at a time; failures counted, not fatal."""
        order = iter(range(len(self.sessions)))
        failures: list[str] = []
        finished = 0
        t_start = time.monotonic()
        t_end = t_start

        async def worker() -> None:
            nonlocal finished, t_end
            for i in order:  # one shared iterator: each session is taken by one worker
                try:
                    # asyncio.timeout, not wait_for: no extra task per session.
                    async with asyncio.timeout(self.op_timeout):
                        await op(i)
                except TimeoutError:
                    failures.append(f"{self.sessions[i].client_id}: no answer in time")
                except (BenchError, OSError) as exc:
                    failures.append(f"{self.sessions[i].client_id}: {exc}")
                finished += 1
                t_end = time.monotonic()
                self.link.tick(finished)

        await asyncio.gather(*(worker() for _ in range(min(self.inflight, len(self.sessions)))))
        return {
            "ok": len(self.sessions) - len(failures),
            "failed": len(failures),
            "failures": failures[:5],
            "t_start": t_start,
            "t_end": t_end,
        }

    async def connect(self, info: _Info, tally: Tally, expect: int = 0) -> _Session:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Session(info.topic, tally, expect), *self.address
        )
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info.conn = conn
        return conn

    async def open(self) -> dict[str, Any]:
        """Fresh sessions, each subscribed to its own topic (register + subscribe pipelined)."""
        frames = [
            encode(
                Register(
                    req=1,
                    client_id=s.client_id,
                    username=BENCH_USER,
                    password=BENCH_PASSWORD,
                    keepalive=KEEPALIVE,
                )
            )
            + encode(Subscribe(req=2, topic=s.topic))
            for s in self.sessions
        ]
        tally = Tally()

        async def op(i: int) -> None:
            info = self.sessions[i]
            conn = await self.connect(info, tally)
            registered, _ = await asyncio.gather(*conn.request(frames[i], 1, 2))
            info.session_id = registered.session_id
            info.resume_token = registered.resume_token

        cpu0 = time.process_time()
        result = await self.run_all(op)
        return {**result, "cpu": time.process_time() - cpu0}

    async def ping(self, sample: Sequence[int]) -> dict[str, Any]:
        """Liveness: a ping on each sampled session must come back as a pong."""
        alive = 0
        failures = []
        for i in sample:
            conn = self.sessions[i].conn
            try:
                if conn is None or conn.transport is None:
                    raise BenchError("not connected")
                async with asyncio.timeout(self.op_timeout):
                    await conn.request(encode(Ping(req=3)), 3)[0]
                alive += 1
            except (TimeoutError, BenchError, OSError) as exc:
                failures.append(f"{self.sessions[i].client_id}: {exc or 'no pong in time'}")
        return {"alive": alive, "asked": len(sample), "failures": failures[:5]}

    async def drop(self) -> dict[str, Any]:
        """Every connection goes away without unregistering: the sessions linger."""
        for info in self.sessions:
            if info.conn is not None and info.conn.transport is not None:
                info.conn.transport.close()
            info.conn = None
        await asyncio.sleep(0.05)  # let the closes reach the kernel
        return {"dropped": len(self.sessions)}

    async def resume(self, expect: int) -> dict[str, Any]:
        """Every session resumes and drains `expect` queued messages, checked for order."""
        frames = [
            encode(
                Register(
                    req=1,
                    client_id=s.client_id,
                    username=BENCH_USER,
                    session_id=s.session_id,
                    resume_token=s.resume_token,
                    keepalive=KEEPALIVE,
                )
            )
            for s in self.sessions
        ]
        tally = Tally(expected=expect * len(self.sessions))
        wrong_queued: list[str] = []
        spans: list[tuple[float, float]] = []

        async def op(i: int) -> None:
            info = self.sessions[i]
            conn = await self.connect(info, tally, expect)
            t_sent = time.monotonic()
            (registered,) = conn.request(frames[i], 1)
            answer = await registered
            if not answer.resumed or answer.queued != expect or answer.dropped:
                wrong_queued.append(
                    f"{info.client_id}: resumed={answer.resumed} queued={answer.queued}"
                    f" dropped={answer.dropped}, expected queued={expect}"
                )
            spans.append((t_sent, await conn.drained))

        cpu0 = time.process_time()
        result = await self.run_all(op)
        cpu = time.process_time() - cpu0
        await asyncio.sleep(0.1)  # a duplicate sent after the last message is caught too
        return {
            **result,
            "cpu": cpu,
            "tally": tally.to_dict(),
            "wrong_queued": len(wrong_queued),
            "wrong_queued_examples": wrong_queued[:3],
            "first_sent": min((s for s, _ in spans), default=0.0),
            "last_drained": max((e for _, e in spans), default=0.0),
            "longest": max((e - s for s, e in spans), default=0.0),
        }

    def close(self) -> None:
        for info in self.sessions:
            if info.conn is not None and info.conn.transport is not None:
                info.conn.transport.abort()


def session_shard(
    link: Link,
    address: tuple[str, int],
    names: Sequence[tuple[str, str]],
    inflight: int,
    op_timeout: float = 60.0,
) -> None:
    """Sessions (client id, own topic) in one process; steps: open, ping, drop, resume."""
    raise_nofile()
    asyncio.run(_shard_main(_Shard(link, address, names, inflight, op_timeout)))


async def _shard_main(shard: _Shard) -> None:
    loop = asyncio.get_running_loop()
    link = shard.link
    shard.link.reply("ready")
    try:
        for _ in range(100):  # a scenario takes a handful of steps
            step, args = await loop.run_in_executor(None, link.command)
            link.tick(0)
            if step == "open":
                link.reply(step, **await shard.open())
            elif step == "ping":
                link.reply(step, **await shard.ping(args["sample"]))
            elif step == "drop":
                link.reply(step, **await shard.drop())
            elif step == "resume":
                link.reply(step, **await shard.resume(args["expect"]))
            else:
                break
    finally:
        shard.close()
