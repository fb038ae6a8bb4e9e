"""Mutated and random frames through a real socket into a real broker (issue 12).

Three hundred connections' worth, in batches that run at once: random bytes; valid frames
(register, publish, subscribe, ping with details, ...) mutated byte-wise or field-wise, before
registration and after it. Whatever they send, the broker answers only well-formed frames,
logs no error, lets no pending connection leak, and afterwards serves a well-behaved probe.

The seed is printed (shown with a failure); replay one with TETHER_FUZZ_SEED=<seed>.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import msgpack
import pytest

from tests.helpers import registered
from tests.wire import WireClient, wait_for
from tether.broker.messages import GetMetrics
from tether.broker.server import Broker
from tether.protocol import (
    BROKER_FRAME_TYPES,
    Ack,
    Deliver,
    Frame,
    FrameDecoder,
    Ok,
    Ping,
    Publish,
    Register,
    Registered,
    Stats,
    Subscribe,
    Unregister,
    Unsubscribe,
    encode,
    encode_map,
)
from tether.protocol.maps import to_wire

CONNECTIONS = 300
BATCH = 20  # connections fuzzed at once
READ_WINDOW = 0.3  # seconds a batch's answers are read for


def _seed() -> int:
    given = os.environ.get("TETHER_FUZZ_SEED")
    return int(given) if given else random.SystemRandom().randrange(1 << 32)


def _valid(rng: random.Random, n: int) -> Frame:
    """One well-formed client frame of a random kind."""
    topic = rng.choice(["t", "fuzz/a", "fuzz/b", "x" * rng.randrange(1, 100)])
    details = {"load": rng.random(), "tags": ["a", "b"], "nested": {"k": [1, 2, {"z": None}]}}
    frames: list[Frame] = [
        Register(
            req=n,
            client_id=f"fz-{n}",
            username=rng.choice(["alice", "bob", "nobody"]),
            password=rng.choice(["secret", "hunter2", "wrong"]),
            metadata={"fw": "1.0", "site": {"rack": n}},
        ),
        Publish(topic=topic, payload=rng.randbytes(rng.randrange(0, 200)), req=n),
        Publish(topic=topic, payload=b"p"),
        Subscribe(req=n, topic=topic),
        Subscribe(req=n, topic="$sys/sessions/registered"),
        Unsubscribe(req=n, topic=topic),
        Ping(req=n, status=rng.choice(["healthy", "degraded"]), details=details),
        Ping(req=n),
        Ack(topic=topic, seq=rng.randrange(1, 1 << 40)),
        Stats(req=n),
        Unregister(req=n),
    ]
    return rng.choice(frames)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(12 if depth < 4 else 8)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1 << 31, -(1 << 63), (1 << 64) - 1, rng.randrange(-1000, 1000)])
    if pick == 3:
        return rng.random() * 1e300
    if pick == 4:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40)))
    if pick == 5:
        return rng.randbytes(rng.randrange(40))
    if pick == 6:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(4))
    if pick == 7:
        return msgpack.Timestamp(rng.randrange(1 << 32))
    if pick in (8, 9):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = [_random_value(rng, 3) if rng.random() < 0.2 else f"k{i}" for i in range(4)]
    out: dict[Any, Any] = {}
    for key in keys[: rng.randrange(5)]:
        with contextlib.suppress(TypeError):  # an unhashable key: skip it
            out[key] = _random_value(rng, depth + 1)
    return out


def _frame_bytes(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _mutated(rng: random.Random, n: int) -> bytes:
    frame = _valid(rng, n)
    data = bytearray(encode(frame))
    how = rng.randrange(7)
    if how == 0:  # flip a few bytes of the body, keep the length right
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(4, len(data))
            data[i] = rng.randrange(256)
        return bytes(data)
    if how == 1:  # insert or cut bytes in the body, length fixed up
        body = data[4:]
        i = rng.randrange(len(body) + 1)
        if rng.random() < 0.5:
            body[i:i] = rng.randbytes(rng.randrange(1, 20))
        else:
            del body[i : i + rng.randrange(1, 20)]
        return _frame_bytes(bytes(body)) if body else bytes(data)
    if how == 2:  # a lying length prefix
        data[:4] = struct.pack(">I", rng.choice([0, 1, len(data) + 7, 70_000, 1 << 20, 1 << 31]))
        return bytes(data)
    if how == 3:  # a field replaced by a value of any type
        wire = to_wire(frame)
        wire[rng.choice([*wire, "extra"])] = _random_value(rng)
        return _frame_bytes(msgpack.packb(wire, use_bin_type=True))
    if how == 4:  # the type replaced
        wire = to_wire(frame)
        wire["type"] = _random_value(rng) if rng.random() < 0.5 else "x" * rng.randrange(5000)
        return _frame_bytes(msgpack.packb(wire, use_bin_type=True))
    if how == 5:  # a map that is not a frame at all
        return _frame_bytes(msgpack.packb(_random_value(rng), use_bin_type=True))
    return encode_map(to_wire(frame))  # valid, for context between the broken ones


def _script(rng: random.Random, n: int) -> tuple[bool, bytes]:
    """(register first?, what to send)."""
    kind = rng.random()
    if kind < 0.2:
        return False, rng.randbytes(rng.randrange(1, 2000))
    frames = b"".join(_mutated(rng, n * 100 + i) for i in range(rng.randrange(1, 10)))
    return kind < 0.6, frames


class _Reader:
    """Reads what the broker sends a fuzzed connection and checks it is well-formed."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(max_frame=1 << 22, accept=BROKER_FRAME_TYPES)
        self.registered = False

    def feed(self, data: bytes, seed: int) -> None:
        self.decoder.receive_data(data)
        frames, fatal = self.decoder.drain()
        assert fatal is None, f"the broker sent a broken frame ({fatal}); seed {seed}"
        assert all(not isinstance(f, Exception) for f in frames), f"seed {seed}: {frames}"
        self.registered = self.registered or any(isinstance(f, Registered) for f in frames)


def _run_batch(broker: Broker, rng: random.Random, first: int, seed: int) -> int:
    """Fuzz connections `first`.. at once; returns how many were fuzzed once registered."""
    assert broker.address is not None
    registered_ones = 0
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        for n in range(first, first + BATCH):
            source = f"127.0.1.{n % 250 + 1}"  # not the probe's address (failed logins)
            register_first, data = _script(rng, n)
            sock = socket.create_connection(broker.address, timeout=5, source_address=(source, 0))
            socks.append(sock)
            reader = _Reader()
            if register_first:
                sock.sendall(encode(Register(req=1, client_id=f"fz-{n}", username="alice",
                                             password="secret")))  # fmt: skip
                with contextlib.suppress(TimeoutError, ConnectionError):
                    reader.feed(sock.recv(65536), seed)  # registered, or refused
                registered_ones += reader.registered
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError, ConnectionError):
                sock.send(data)  # what fits at once: a full socket is no error here
            selector.register(sock, selectors.EVENT_READ, reader)
        deadline = time.monotonic() + READ_WINDOW
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = cast("socket.socket", key.fileobj)
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ConnectionError):
                    data = b""
                if data:
                    key.data.feed(data, seed)
                else:
                    selector.unregister(sock)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    return registered_ones


def test_fuzzed_frames_over_real_sockets_leave_the_broker_serving(
    start_broker: Callable[..., Broker],
    dial: Callable[[Broker], WireClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed = _seed()
    print(f"fuzz seed {seed}: replay with TETHER_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    broker = start_broker(register_timeout=2.0)
    fuzzed_registered = sum(
        _run_batch(broker, rng, first, seed) for first in range(0, CONNECTIONS, BATCH)
    )
    assert fuzzed_registered >= CONNECTIONS // 10, f"seed {seed}: the active path went unfuzzed"
    listeners = broker._refs["listeners"]

    def pending() -> int:
        return cast("dict[str, int]", listeners.ask(GetMetrics(), timeout=10))[
            "connections_pending"
        ]

    wait_for(lambda: pending() == 0, 10)
    # A well-behaved client: fresh register, subscribe, confirmed publish, receive.
    probe = dial(broker)
    registered(probe.register("probe"))
    probe.send(Subscribe(req=2, topic="probe/t"))
    assert probe.recv() == Ok(req=2), f"seed {seed}"
    probe.send(Publish(topic="probe/t", payload=b"still here", req=3))
    got = [probe.recv(), probe.recv()]
    assert Ok(req=3) in got, f"seed {seed}: {got}"
    [deliver] = [f for f in got if isinstance(f, Deliver)]
    assert deliver.payload == b"still here"
    assert broker.stats()["connected"] >= 1
    errors = [r.getMessage()[:300] for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == [], f"seed {seed}: the broker logged errors"
