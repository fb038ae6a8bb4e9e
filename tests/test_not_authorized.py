"""`not_authorized` (issue 11): a `subscribe` to `$sys/...` by a user not marked admin is refused,
non-fatally, on the wire and as a typed error of both client front ends; other `$` topics are
subscribed as before. (What an admin receives there: tests/test_sys_events.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.helpers import assert_error, registered, subscribe
from tests.test_client_aio import aclient
from tests.test_client_sync import client
from tests.wire import WireClient
from tether.broker.server import Broker
from tether.client import Rejected
from tether.client.errors import NotAuthorized
from tether.protocol import ErrorCode, Ok, Ping, Pong, Publish, Subscribe


def test_a_non_admin_subscribe_to_sys_is_refused_and_the_connection_goes_on(
    connect: Callable[[], WireClient],
) -> None:
    alice = connect()
    registered(alice.register("plain"))
    alice.send(Subscribe(req=41, topic="$sys/sessions/registered"))
    error = assert_error(alice.recv(), ErrorCode.NOT_AUTHORIZED, 41)
    assert "admin" in error.message and "$sys" in error.message
    # Not fatal, and answered in turn: the frames after it are answered as usual.
    alice.send(Subscribe(req=42, topic="$sys/other"), Ping(req=43), Subscribe(req=44, topic="$x"))
    assert_error(alice.recv(), ErrorCode.NOT_AUTHORIZED, 42)
    assert alice.recv() == Pong(req=43)
    assert alice.recv() == Ok(req=44)  # other `$` topics: as before
    subscribe(alice, "t")
    alice.send(Publish(topic="t", payload=b"x", req=45))
    frames = alice.recv_many(2)
    assert Ok(req=45) in frames
    # Publishing to `$sys` is still a bad request.
    alice.send_map({"type": "publish", "topic": "$sys/sessions/x", "payload": b"", "req": 46})
    assert_error(alice.recv(), ErrorCode.BAD_REQUEST, 46)


def test_the_sync_client_raises_not_authorized_and_stays_usable(broker: Broker) -> None:
    with client(broker, "sync-plain") as c:
        with pytest.raises(NotAuthorized) as caught:
            c.subscribe("$sys/sessions/registered")
        assert isinstance(caught.value, Rejected)
        assert caught.value.code == ErrorCode.NOT_AUTHORIZED
        assert "--admin" in str(caught.value)
        sub = c.subscribe("t")
        c.publish("t", "after", confirm=True)
        message = sub.get(timeout=5)
        assert message is not None and message.payload == b"after"


def test_the_async_client_raises_not_authorized_and_stays_usable(broker: Broker) -> None:
    async def main() -> None:
        async with aclient(broker, "aio-plain") as a:
            with pytest.raises(NotAuthorized):
                await a.subscribe("$sys/sessions/health")
            stream = await a.subscribe("t")
            await a.publish("t", b"after", confirm=True)
            message = await stream.get(timeout=5)
            assert message is not None and message.payload == b"after"

    asyncio.run(main())
