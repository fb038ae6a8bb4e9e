"""The client against a real broker through a TCP proxy that cuts connections at random points.

`ChaosProxy` forwards bytes between clients and the broker and cuts each connection after a
random number of bytes (so mid-frame, mid-register, mid-ack) or a random time, whichever
comes first. It can also be taken down (connections refused) and frozen (bytes swallowed,
sockets kept open: a dead path the client can only notice by its pings). Other client tests
import it from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tether.broker.server import Broker
from tether.client import AsyncClient, Client, Message

# Each connection carries a random number of bytes (at least a registration) and lives a
# random time. Large enough budgets matter: a resume redelivers the whole unacked window at
# once, and a link that always died within that burst would never carry an ack.
CUT_BYTES = (300, 200_000)
CUT_SECONDS = (0.01, 0.3)


class _Link:
    def __init__(self, proxy: ChaosProxy, down: socket.socket, up: socket.socket) -> None:
        self.proxy = proxy
        self.sockets = (down, up)
        self.lock = threading.Lock()
        self.budget: int | None = None
        self.closed = False
        self.frozen = False

    def take(self, n: int) -> tuple[int, bool]:
        """How many of n bytes may pass, and whether the link is then to be cut."""
        with self.lock:
            if self.budget is None:
                return n, False
            if n >= self.budget:
                allowed, self.budget = self.budget, 0
                return allowed, True
            self.budget -= n
            return n, False

    def close(self, *, cut: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        if cut:
            self.proxy.cuts += 1
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class ChaosProxy:
    def __init__(
        self,
        target: tuple[str, int],
        *,
        seed: int = 0,
        cut_bytes: tuple[int, int] | None = CUT_BYTES,
        cut_seconds: tuple[float, float] | None = CUT_SECONDS,
    ) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.cut_bytes = cut_bytes
        self.cut_seconds = cut_seconds
        self.cuts = 0
        self.connections = 0
        self.down = False
        self.frozen = False
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._stopped = False
        threading.Thread(target=self._accept_loop, name="chaos-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            if self.down or self._stopped:
                down.close()
                continue
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                down.close()
                continue
            for sock in (down, up):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, down, up)
            with self._lock:
                self.connections += 1
                if self.cut_bytes is not None:
                    link.budget = self.rng.randint(*self.cut_bytes)
                delay = self.rng.uniform(*self.cut_seconds) if self.cut_seconds else None
                self._links.add(link)
            if delay is not None:
                timer = threading.Timer(delay, link.close, kwargs={"cut": True})
                timer.daemon = True
                timer.start()
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(link, src, dst), daemon=True).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.frozen or link.frozen:
                    continue  # swallowed: the peer hears nothing, and nothing closes
                allowed, cut = link.take(len(data))
                dst.sendall(data[:allowed])
                if cut:
                    link.close(cut=True)
                    return
        except OSError:
            pass
        link.close()
        with self._lock:
            self._links.discard(link)

    def cut_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close(cut=True)

    def freeze_links(self) -> None:
        """The current connections swallow every byte from now on; new ones work."""
        with self._lock:
            for link in self._links:
                link.frozen = True

    def set_down(self, down: bool) -> None:
        """Down: every connection is cut and new ones are closed at once."""
        self.down = down
        if down:
            self.cut_all()

    def refuse(self) -> None:
        """Stop listening (connections are refused, as by a host whose broker is down) and
        cut every connection."""
        # shutdown() first: it wakes the accept() under way, which close() alone does not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut_all()

    def listen_again(self) -> None:
        """After `refuse()`: accept connections again, on the same port."""
        self._listener = socket.create_server(self.address)
        threading.Thread(target=self._accept_loop, name="chaos-accept", daemon=True).start()

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        self.cut_all()


@pytest.fixture
def proxy_to() -> Iterator[Callable[..., ChaosProxy]]:
    made: list[ChaosProxy] = []

    def make(broker: Broker, **kw: object) -> ChaosProxy:
        assert broker.address is not None
        proxy = ChaosProxy(broker.address, **kw)  # type: ignore[arg-type]
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what()}")
        time.sleep(0.01)


def publish_slowly(pub: Client, topic: str, n: int, *, seconds: float) -> None:
    """n messages b"0".."n-1" spread over about `seconds`, then a confirmed b"n"."""
    batches = max(1, n // 20)
    for i in range(n):
        pub.publish(topic, b"%d" % i)
        if i % 20 == 19:
            time.sleep(seconds / batches)
    pub.publish(topic, b"%d" % n, confirm=True)


SEED = int(os.environ.get("TETHER_CHAOS_SEED", "1"))
FAST = {"backoff_base": 0.01, "backoff_cap": 0.1, "request_timeout": 10.0}


def test_every_message_once_in_order_through_random_cuts(
    broker: Broker, proxy_to: Callable[..., ChaosProxy]
) -> None:
    n = 5000
    proxy = proxy_to(broker, seed=SEED)
    host, port = proxy.address
    seen: list[int] = []

    def handler(message: Message) -> None:
        seen.append(int(message.payload))

    assert broker.address is not None
    bport = broker.address[1]
    with (
        Client(
            client_id="chaos-sub", username="alice", password="secret", host=host, port=port, **FAST
        ) as sub,
        Client(client_id="chaos-pub", username="bob", password="hunter2", port=bport) as pub,
    ):
        sub.subscribe("chaos", handler)
        publish_slowly(pub, "chaos", n, seconds=2.5)
        wait_until(lambda: len(seen) > n, 15, lambda: f"{n + 1} messages, got {len(seen)}")
    assert seen == list(range(n + 1))
    assert proxy.cuts >= 5, proxy.cuts


def test_confirmed_publishes_through_random_cuts_are_at_least_once_in_order(
    broker: Broker, proxy_to: Callable[..., ChaosProxy]
) -> None:
    """A confirmed publish in flight when the connection is cut is sent again."""
    n = 300
    proxy = proxy_to(broker, seed=2, cut_bytes=(200, 3000))
    host, port = proxy.address
    assert broker.address is not None
    seen: list[int] = []
    with (
        Client(
            client_id="c-sub", username="alice", password="secret", port=broker.address[1]
        ) as sub,
        Client(
            client_id="c-pub", username="bob", password="hunter2", host=host, port=port, **FAST
        ) as pub,
    ):
        sub.subscribe("confirmed", lambda m: seen.append(int(m.payload)))
        for i in range(n):
            pub.publish("confirmed", b"%d" % i, confirm=True)
        wait_until(lambda: bool(seen) and seen[-1] == n - 1, 10, lambda: "the last message")
    once = [x for i, x in enumerate(seen) if i == 0 or seen[i - 1] != x]
    assert once == list(range(n))
    assert proxy.cuts >= 3, proxy.cuts


def test_async_client_every_message_once_in_order_through_random_cuts(
    broker: Broker, proxy_to: Callable[..., ChaosProxy]
) -> None:
    n = 3000
    proxy = proxy_to(broker, seed=3)
    host, port = proxy.address
    assert broker.address is not None
    bport = broker.address[1]

    async def main() -> list[int]:
        seen: list[int] = []

        async def handler(message: Message) -> None:
            seen.append(int(message.payload))

        async with (
            AsyncClient(
                client_id="a-sub", username="alice", password="secret", host=host, port=port, **FAST
            ) as sub,
            AsyncClient(client_id="a-pub", username="bob", password="hunter2", port=bport) as pub,
        ):
            await sub.subscribe("achaos", handler)
            for i in range(n):
                await pub.publish("achaos", b"%d" % i)
                if i % 20 == 19:
                    await asyncio.sleep(0.01)
            await pub.publish("achaos", b"%d" % n, confirm=True)
            deadline = time.monotonic() + 20
            while len(seen) <= n and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        return seen

    assert asyncio.run(main()) == list(range(n + 1))
    assert proxy.cuts >= 5, proxy.cuts


def test_iterator_form_through_random_cuts(
    broker: Broker, proxy_to: Callable[..., ChaosProxy]
) -> None:
    n = 1000
    proxy = proxy_to(broker, seed=4)
    host, port = proxy.address
    assert broker.address is not None
    with (
        Client(
            client_id="i-sub", username="alice", password="secret", host=host, port=port, **FAST
        ) as sub,
        Client(
            client_id="i-pub", username="bob", password="hunter2", port=broker.address[1]
        ) as pub,
    ):
        messages = sub.subscribe("iter")
        publisher = threading.Thread(
            target=publish_slowly, args=(pub, "iter", n), kwargs={"seconds": 1}
        )
        publisher.start()
        seen = []
        for message in messages:
            seen.append(int(message.payload))
            if len(seen) == n + 1:
                break
        publisher.join()
    assert seen == list(range(n + 1))
