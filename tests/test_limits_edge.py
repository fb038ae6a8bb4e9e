"""Issue 12 at the connection edge: what an unregistered connection may hold, how many may be
pending, one read's batch handed on in chunks, the open-file limit. Real brokers on loopback
where it is about behaviour; the Listener alone (fake link) for the chunking's order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.helpers import assert_error, registered
from tests.test_client_restart import cli_env
from tests.test_listener import CONN_ID, FakeLink, Harness, Told
from tests.test_netedge import FakeTransport, Recorder
from tests.wire import WireClient, wait_for
from tether.broker.listener import OPS_PER_BATCH, Listener, ListenerRegistered
from tether.broker.logthrottle import LogThrottle, LoopErrors
from tether.broker.messages import GetMetrics, SessionAttached, SessionOps, Throttle
from tether.broker.netedge import READ_SIZE, Connection
from tether.broker.server import Broker
from tether.client import Client
from tether.protocol import (
    Error,
    ErrorCode,
    Frame,
    Ok,
    Ping,
    Publish,
    Register,
    Registered,
    Subscribe,
    Unregister,
    encode,
)

REGISTER_LIMIT = 64 * 1024


def metrics(broker: Broker) -> dict[str, int]:
    return cast("dict[str, int]", broker._refs["listeners"].ask(GetMetrics(), timeout=10))


def listeners_of(broker: Broker) -> list[Listener]:
    """The broker's Listener objects (test introspection, read from this thread)."""
    manager: Any = broker._refs["listeners"]._actor_weakref()
    return [ref._actor_weakref() for ref in manager._listeners.values()]


def raw(broker: Broker, source: str = "127.0.0.1") -> socket.socket:
    assert broker.address is not None
    return socket.create_connection(broker.address, timeout=5, source_address=(source, 0))


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the broker closed `sock` (what it sent first is read and dropped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


# --- the edge's read limit ----------------------------------------------------------------


def test_the_edge_reads_no_more_than_its_limit_until_it_is_lifted() -> None:
    loop = asyncio.new_event_loop()
    try:
        handler = Recorder()
        conn = Connection(loop, make_handler=lambda _link: handler, high_water=1024, read_limit=10)
        transport = FakeTransport()
        conn.connection_made(transport)
        buf = conn.get_buffer(-1)
        assert len(buf) == 10  # a read can take no more than the limit leaves
        buf[:6] = b"abcdef"
        conn.buffer_updated(6)
        assert len(conn.get_buffer(-1)) == 4 and transport.reading
        conn.get_buffer(-1)[:4] = b"ghij"
        conn.buffer_updated(4)
        assert not transport.reading  # spent: the rest waits in the socket
        conn.resume_reading()  # the handler's resume does not lift the limit
        assert not transport.reading
        conn.lift_read_limit()
        assert transport.reading and conn.read_left is None
        assert len(conn.get_buffer(-1)) == READ_SIZE
        assert handler.events == [("data", b"abcdef"), ("data", b"ghij")]
    finally:
        loop.close()


# --- before registration: what a connection may hold --------------------------------------


def test_a_frame_declared_larger_than_the_register_limit_is_refused_at_once(
    start_broker: Callable[..., Broker], dial: Callable[[Broker], WireClient]
) -> None:
    broker = start_broker()
    client = dial(broker)
    client.send_raw(struct.pack(">I", 1 << 20) + b"\x85")  # 1 MiB declared, a byte sent
    error = assert_error(client.recv(), "frame_too_large", None)
    assert str(REGISTER_LIMIT) in error.message
    client.expect_closed()
    # The same frame size is fine once registered (max_frame is 1 MiB by default).
    other = dial(broker)
    registered(other.register("big"))
    req = other.next_req()
    other.send(Publish(topic="t", payload=b"x" * (REGISTER_LIMIT * 3), req=req))
    assert other.recv() == Ok(req=req)


def test_an_unregistered_connection_holds_at_most_the_register_limit(
    start_broker: Callable[..., Broker], opened: list[socket.socket]
) -> None:
    broker = start_broker(register_timeout=30.0)
    sock = raw(broker)
    opened.append(sock)
    # A frame of exactly the limit, declared, and far more than that sent behind it: the
    # broker reads the limit and no more, the rest waits in the socket.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.settimeout(0.5)
    junk = struct.pack(">I", REGISTER_LIMIT) + b"\x80" * (200 * 1024)
    with contextlib.suppress(TimeoutError):  # the socket fills up: that is the point
        sock.sendall(junk)
    wait_for(lambda: metrics(broker)["connections_pending_bytes"] == REGISTER_LIMIT)
    time.sleep(0.2)  # were it still reading, more would be counted by now
    assert metrics(broker)["connections_pending_bytes"] == REGISTER_LIMIT
    assert metrics(broker)["connections_pending"] == 1
    # What its Listener holds: the incomplete frame's bytes read so far, no more.
    [listener] = listeners_of(broker)
    assert listener._decoder.buffered == REGISTER_LIMIT


def test_frames_pipelined_behind_register_are_read_once_registered_whatever_their_size(
    start_broker: Callable[..., Broker], dial: Callable[[Broker], WireClient]
) -> None:
    broker = start_broker()
    sub = dial(broker)
    registered(sub.register("sub"))
    sub.send(Subscribe(req=sub.next_req(), topic="t"))
    assert isinstance(sub.recv(), Ok)
    client = dial(broker)
    big = b"b" * (REGISTER_LIMIT * 2)  # over the register limit, under max_frame
    frames: list[Frame] = [
        Register(req=1, client_id="pipelined", username="alice", password="secret")
    ]
    frames += [Publish(topic="t", payload=big, req=2), Ping(req=3)]
    frames += [Publish(topic="t", payload=b"%d" % i, req=4 + i) for i in range(50)]
    client.send_raw(b"".join(encode(f) for f in frames))
    assert isinstance(client.recv(), Registered)
    answers = client.recv_many(52)
    assert [getattr(a, "req", None) for a in answers] == list(range(2, 54))
    assert answers[0] == Ok(req=2)
    got = [sub.recv() for _ in range(51)]
    assert [getattr(d, "payload", None) for d in got] == [big] + [b"%d" % i for i in range(50)]
    assert metrics(broker)["connections_pending"] == 0
    assert metrics(broker)["connections_pending_bytes"] == 0


def test_error_replies_do_not_echo_unbounded_input(
    start_broker: Callable[..., Broker], dial: Callable[[Broker], WireClient]
) -> None:
    broker = start_broker()
    client = dial(broker)
    client.send_map({"type": "x" * 20_000, "req": 1})  # an unknown type, quoted in the reply
    error = assert_error(client.recv(), "bad_request", 1)
    assert len(error.message) <= 200
    registered(client.register("echo"))
    client.send_map({"type": "y" * 20_000, "req": 7})
    error = assert_error(client.recv(), "bad_request", 7)
    assert len(error.message) <= 200


# --- pending connections, bounded --------------------------------------------------------


def test_pending_connections_are_bounded_per_address_and_in_all(
    start_broker: Callable[..., Broker],
    opened: list[socket.socket],
    dial: Callable[[Broker], WireClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = start_broker(max_pending_per_address=3, max_pending_connections=5)
    opened.extend(raw(broker, "127.0.0.2") for _ in range(3))
    wait_for(lambda: metrics(broker)["connections_pending"] == 3)
    # A fourth from the same address is closed at once; another address still gets in.
    refused = raw(broker, "127.0.0.2")
    opened.append(refused)
    assert closed_by_peer(refused)
    opened.extend(raw(broker, "127.0.0.3") for _ in range(2))
    wait_for(lambda: metrics(broker)["connections_pending"] == 5)
    # Five pending in all: a sixth, from a fresh address, is closed at once too.
    for _ in range(4):
        late = raw(broker, "127.0.0.4")
        opened.append(late)
        assert closed_by_peer(late)
    figures = metrics(broker)
    assert figures["connections_refused_pending"] == 5
    assert figures["connections_pending"] == 5
    # Refusals are logged once per interval, with their count, not once each.
    lines = [r for r in caplog.records if "connections_refused" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    # A pending connection that registers is pending no more: one more may come.
    opened[0].close()
    wait_for(lambda: metrics(broker)["connections_pending"] == 4)
    client = dial(broker)
    registered(client.register("counted"))
    wait_for(lambda: metrics(broker)["connections_pending"] == 4)
    newcomer = raw(broker, "127.0.0.2")
    opened.append(newcomer)
    wait_for(lambda: metrics(broker)["connections_pending"] == 5)
    assert metrics(broker)["connections_refused_pending"] == 5


def test_refused_and_timed_out_connections_cost_no_line_each(
    start_broker: Callable[..., Broker],
    opened: list[socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = start_broker(max_pending_per_address=20, register_timeout=0.3)
    caplog.clear()
    opened.extend(raw(broker, "127.0.0.5") for _ in range(60))
    for sock in opened:
        assert closed_by_peer(sock)
    wait_for(lambda: metrics(broker)["connections_pending"] == 0)
    infos = [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"]
    # Without the summaries: 40 refusals, 20 timeouts and 20 closes, a line each.
    assert len(infos) <= 4, infos
    assert metrics(broker)["connections_refused_pending"] == 40
    assert metrics(broker)["connections_closed_unregistered"] == 20


# --- one read, handed on in chunks -------------------------------------------------------


def _listener(loop: asyncio.AbstractEventLoop, conn_id: int, subscribers: Told) -> Listener:
    listener = Listener(
        loop,
        threading.get_ident(),
        link=FakeLink(),
        conn_id=conn_id,
        supervisor=Told(),  # type: ignore[arg-type]
        session_manager=Told(),  # type: ignore[arg-type]
        subscriber_manager=subscribers,  # type: ignore[arg-type]
        listener_manager=Told(),  # type: ignore[arg-type]
        max_frame=1 << 20,
        register_timeout=5.0,
        max_register_bytes=REGISTER_LIMIT,
    )
    listener.start_unregistered()
    listener.on_data(encode(Register(req=1, client_id=f"c{conn_id}", username="a", password="p")))
    registered_frame = encode(
        Registered(
            req=1,
            session_id=f"s{conn_id}",
            resume_token="t",
            resumed=False,
            keepalive=10,
            expiry=60,
            queued=0,
            dropped=0,
        )
    )
    listener.actor_ref.tell(SessionAttached(f"s{conn_id}", f"c{conn_id}", 10, registered_frame))
    loop.run_until_complete(asyncio.sleep(0))
    return listener


def test_a_big_read_goes_on_in_chunks_in_order_and_other_connections_interleave() -> None:
    loop = asyncio.new_event_loop()
    try:
        subscribers = Told()
        busy, quiet = _listener(loop, 1, subscribers), _listener(loop, 2, subscribers)
        n = OPS_PER_BATCH * 3 + 10
        publishes = [Publish(topic="t", payload=b"%d" % i) for i in range(n)]
        busy.on_data(b"".join(encode(p) for p in publishes))
        quiet.on_data(encode(Ping(req=1)))  # read while the busy one's batch is on its way
        for _ in range(10):
            loop.run_until_complete(asyncio.sleep(0))
        batches = [m for m in subscribers.take() if isinstance(m, SessionOps)]
        sizes = [(m.session_id, len(m.ops)) for m in batches]
        assert sizes[0] == ("s1", OPS_PER_BATCH)
        assert ("s2", 1) in sizes and sizes.index(("s2", 1)) < len(sizes) - 1, sizes
        assert all(size <= OPS_PER_BATCH for _, size in sizes)
        ops = [op for m in batches if m.session_id == "s1" for op in m.ops]
        assert ops == publishes  # nothing lost, nothing reordered
        events = cast("FakeLink", busy._link).take()
        assert ("pause",) in events and events[-1] == ("resume",)
    finally:
        loop.close()


def test_a_chunked_read_keeps_a_fatal_error_last(h: Harness) -> None:
    h.activate()
    n = OPS_PER_BATCH + 5
    h.read(*[Publish(topic="t", payload=b"x") for _ in range(n)], b"\x00\x00\x00\x00")
    for _ in range(3):
        h.settle()
    batches = [m for m in h.subscribers.take() if isinstance(m, SessionOps)]
    assert [len(b.ops) for b in batches] == [OPS_PER_BATCH, 6]
    assert [b.close for b in batches] == [False, True]
    last = batches[-1].ops[-1]
    assert isinstance(last, Error) and last.code == ErrorCode.BAD_FRAME
    # Nothing after the fatal error is read, nor after unregister.
    h.read(Ping(req=9))
    h.settle()
    assert h.subscribers.messages == []


def test_a_chunked_read_stops_at_unregister_in_a_later_chunk(h: Harness) -> None:
    h.activate()
    n = OPS_PER_BATCH + 3
    publishes = [Publish(topic="t", payload=b"x") for _ in range(n)]
    h.read(*publishes, Unregister(req=2), Ping(req=3))
    h.listener.on_data(encode(Ping(req=4)))  # came while the backlog was on its way
    for _ in range(3):
        h.settle()
    batches = [m.ops for m in h.subscribers.take() if isinstance(m, SessionOps)]
    assert [len(b) for b in batches] == [OPS_PER_BATCH, 4]
    assert batches[1][-1] == Unregister(req=2)  # nothing after it is handed on
    assert ("resume",) not in h.link.take()


def test_a_throttle_that_ends_during_a_chunked_read_resumes_only_after_it(h: Harness) -> None:
    h.activate()
    h.read(*[Publish(topic="t", payload=b"x") for _ in range(OPS_PER_BATCH + 1)])
    # Handled before the loop turns, so while the rest of the read still waits.
    h.listener.on_receive(Throttle(True))
    h.listener.on_receive(Throttle(False))  # the read is not handed on in full: not reading
    events = h.link.take()
    assert events == [("pause",), ("pause",)], events
    h.settle()
    assert h.link.take() == [("resume",)]
    assert [len(m.ops) for m in h.subscribers.take()] == [OPS_PER_BATCH, 1]


def test_the_attach_tells_the_listener_manager(h: Harness) -> None:
    h.register()
    assert h.listeners.messages == []
    h.attach()
    assert h.listeners.take() == [ListenerRegistered(CONN_ID)]


# --- lines an attacker can cause, at most once per interval ---------------------------------


def test_a_log_throttle_writes_the_first_at_once_and_the_rest_as_one_counted_line() -> None:
    loop = asyncio.new_event_loop()
    try:
        lines: list[tuple[str, int]] = []
        throttle = LogThrottle(loop, lambda kind, count, _: lines.append((kind, count)), 0.05)
        for _ in range(5):
            throttle.hit("refused")
        throttle.hit("other")
        assert lines == [("refused", 1), ("other", 1)]
        loop.run_until_complete(asyncio.sleep(0.1))  # the interval ends: the count's line
        assert lines[2:] == [("refused", 4)]
        throttle.close()
    finally:
        loop.close()


def test_loop_errors_log_a_traceback_once_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        handler = LoopErrors(loop, interval=0.05)
        loop.set_exception_handler(handler)
        error = OSError(24, "Too many open files")
        for _ in range(1000):
            loop.call_exception_handler({"message": "accept failed", "exception": error})
        loop.run_until_complete(asyncio.sleep(0.1))
        lines = [r for r in caplog.records if "loop_error" in r.getMessage()]
        assert len(lines) == 2, [r.getMessage() for r in lines]
        assert "loop_error" in lines[0].getMessage() and "exc_info" in lines[0].getMessage()
        assert "count=999" in lines[1].getMessage()
        handler.close()
    finally:
        loop.close()


# --- the open-file limit -----------------------------------------------------------------


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_a_flood_past_the_open_file_limit_pauses_accepting_and_costs_few_lines(
    users_file: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "serve", "--port", "0", "--users", str(users_file),
         "--log-format", "json", "--in-memory"],
        stdout=subprocess.PIPE,
        env=cli_env(),
        preexec_fn=_low_fd_limit,
    )  # fmt: skip
    processes.append(proc)
    assert proc.stdout is not None
    lines: list[dict[str, Any]] = []
    port = 0
    for line in proc.stdout:
        lines.append(json.loads(line))
        if lines[-1].get("event") == "listening":
            port = int(lines[-1]["port"])
            break
    assert port, lines

    def read_rest() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))

    reader = threading.Thread(target=read_rest, daemon=True)
    reader.start()
    flood: list[socket.socket] = []
    try:
        for _ in range(400):  # past 256: some wait in the backlog, unaccepted
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: any(e.get("event") == "accepting_paused" for e in lines), 10)
    finally:
        for sock in flood:
            sock.close()
    # The flood is over: a well-behaved client is served.
    got: list[bytes] = []
    with Client(client_id="probe", username="alice", password="secret", port=port) as probe:
        probe.subscribe("t", lambda m: got.append(m.payload))
        probe.publish("t", b"after the flood", confirm=True)
        wait_for(lambda: got == [b"after the flood"], 10)
    assert proc.poll() is None, "the broker died"
    assert len(lines) < 60, [e.get("event") for e in lines]
    assert not any("Traceback" in json.dumps(e) for e in lines)


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(
    start_broker: Callable[..., Broker],
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(64, hard // 2), hard))
    try:
        start_broker()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
