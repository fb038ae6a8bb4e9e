"""`AsyncClient` against a real broker: the same semantics as the blocking client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.admin_users import ROOT, ROOT_PASSWORD, users_with_admin
from tests.test_client_chaos import FAST, ChaosProxy
from tether.broker.server import Broker
from tether.client import (
    AsyncClient,
    AuthFailed,
    ClientClosed,
    Health,
    Message,
    Rejected,
    SessionLost,
    TakenOver,
)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's users and an admin, root (only admins may ask `stats`)."""
    return users_with_admin(tmp_path_factory.mktemp("users") / "users.json")


def aclient(target: Broker | ChaosProxy, client_id: str, **kw: Any) -> AsyncClient:
    assert target.address is not None
    host, port = target.address
    options: dict[str, Any] = {"username": "alice", "password": "secret", **FAST, **kw}
    return AsyncClient(client_id=client_id, host=host, port=port, **options)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_publish_subscribe_iterate_and_close_twice(broker: Broker) -> None:
    async def main() -> None:
        got: list[Message] = []
        async with aclient(broker, "a1") as a, aclient(broker, "a2") as b:
            await a.subscribe("t", got.append)  # a plain function works as a handler too
            stream = await a.subscribe("u")
            await b.publish("t", "hello", confirm=True)
            await b.publish("u", b"one")
            await b.publish("u", b"two", confirm=True)
            await until(lambda: len(got) == 1)
            first = await stream.get(timeout=2)
            second = await stream.get(timeout=2)
            assert [first.payload, second.payload] == [b"one", b"two"]  # type: ignore[union-attr]
            await a.close()
            await a.close()
            with pytest.raises(ClientClosed):
                await a.publish("t", b"x")
        assert got[0].payload == b"hello" and got[0].seq == 1

    asyncio.run(main())


def test_stats_returns_the_broker_counters(broker: Broker) -> None:
    async def main() -> None:
        async with aclient(broker, "stats", username=ROOT, password=ROOT_PASSWORD) as a:
            await a.publish("t", "x", confirm=True)
            stats = await a.stats()
            assert stats["sessions"] == 1
            assert stats["connected"] == 1
            assert stats["published"] == 1
            assert stats["bcrypt_hashes"] >= 1
        with pytest.raises(ClientClosed):
            await a.stats()

    asyncio.run(main())


def test_auth_failed_and_conflict(broker: Broker) -> None:
    async def main() -> None:
        with pytest.raises(AuthFailed):
            await aclient(broker, "x", password="nope").connect()
        async with aclient(broker, "dup"):
            with pytest.raises(Rejected) as info:
                await aclient(broker, "dup").connect()
            assert info.value.code == "conflict"

    asyncio.run(main())


def test_taken_over_stops_for_good(broker: Broker) -> None:
    async def main() -> None:
        taken: list[TakenOver] = []

        async def on_taken_over(error: TakenOver) -> None:  # coroutine callbacks are awaited
            taken.append(error)

        first = await aclient(broker, "dev", on_taken_over=on_taken_over).connect()
        async with aclient(broker, "dev", takeover=True) as second:
            await until(lambda: bool(taken))
            assert first.closed and isinstance(first.error, TakenOver)
            await asyncio.sleep(0.3)
            assert second.connected and broker.stats()["connected"] == 1
        await first.close()

    asyncio.run(main())


def test_session_lost_while_away_and_heartbeats(start_broker: Callable[..., Broker]) -> None:
    broker = start_broker(session_expiry=0.3)
    assert broker.address is not None
    proxy = ChaosProxy(broker.address, cut_bytes=None, cut_seconds=None)
    health_calls = 0

    async def health() -> Health:
        nonlocal health_calls
        health_calls += 1
        return Health("healthy", {"queue": 0})

    async def main() -> None:
        lost: list[SessionLost] = []
        got: list[bytes] = []

        async def handler(message: Message) -> None:
            got.append(message.payload)

        async with (
            aclient(proxy, "roam", on_session_lost=lost.append, keepalive=1, health=health) as c,
            aclient(broker, "pub") as pub,
        ):
            await c.subscribe("n", handler)
            old = c.session_id
            proxy.set_down(True)
            await until(lambda: broker.stats()["sessions"] == 1)
            proxy.set_down(False)
            await until(lambda: bool(lost) and c.connected)
            assert c.session_id != old and lost[0].old_session_id == old
            await until(lambda: broker.stats()["topics"] == 1)
            await pub.publish("n", b"after", confirm=True)
            await until(lambda: got == [b"after"])
            await asyncio.sleep(1.7)  # idle longer than 1.5 x keepalive: pings keep it
            assert c.connected
        assert health_calls >= 1

    try:
        asyncio.run(main())
    finally:
        proxy.close()


def test_unregister(broker: Broker) -> None:
    async def main() -> None:
        c = await aclient(broker, "bye").connect()
        await c.unregister()
        assert c.closed
        async with aclient(broker, "bye") as again:
            assert again.connected

    asyncio.run(main())
