"""Issue 9, items 1 and 2, against real brokers: messages larger than the broker's frame limit.

A publish that cannot fit is refused at the call, before anything goes on the wire; a frame the
broker refuses anyway is never sent again; a large delivery is received up to the broker's
limit; and no message, however large, makes a client reconnect in a loop. The broker's
`accepted` counter tells how many connections a client made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.test_client_chaos import FAST, wait_until
from tether.broker.server import Broker
from tether.client import Client, Health, Message, PayloadTooLarge
from tether.protocol import DEFAULT_MAX_FRAME

MiB = 1 << 20


def client(broker: Broker, client_id: str, **kw: Any) -> Client:
    assert broker.address is not None
    host, port = broker.address
    options: dict[str, Any] = {"username": "alice", "password": "secret", **FAST, **kw}
    return Client(client_id=client_id, host=host, port=port, **options)


def accepted(broker: Broker) -> int:
    return broker.stats()["accepted"]


@pytest.mark.parametrize("confirm", [True, False])
@pytest.mark.parametrize("size", [DEFAULT_MAX_FRAME, DEFAULT_MAX_FRAME + 1, 2 * MiB])
def test_a_publish_over_the_limit_fails_at_once_and_sends_nothing(
    broker: Broker, size: int, confirm: bool
) -> None:
    """It used to go out again at every reconnect (confirmed), or vanish (not confirmed)."""
    with client(broker, "big", request_timeout=3) as c:
        before = accepted(broker)
        started = time.monotonic()
        with pytest.raises(PayloadTooLarge) as info:
            c.publish("t", b"x" * size, confirm=confirm)
        assert time.monotonic() - started < 1
        error = info.value
        assert error.size > size and error.limit == DEFAULT_MAX_FRAME
        assert f"{error.size} bytes" in str(error) and f"{DEFAULT_MAX_FRAME} bytes" in str(error)
        # Nothing went out: the connection is the same, and it still works.
        c.publish("t", b"small", confirm=True)
        assert c.connected and accepted(broker) == before


def test_the_limit_the_broker_announces_wins_over_the_configured_one(
    start_broker: Callable[..., Broker],
) -> None:
    """A client configured above the broker's limit goes by the limit the broker announced
    in `registered`. (A frame a broker refuses anyway, one that does not announce its limit,
    fails its request and is never sent again: tests/test_client_machine.py.)"""
    broker = start_broker(max_frame=MiB)
    with client(broker, "optimist", max_frame=4 * MiB) as c:
        before = accepted(broker)
        for confirm in (True, False):
            with pytest.raises(PayloadTooLarge) as info:
                c.publish("t", b"y" * (2 * MiB), confirm=confirm)
            assert info.value.limit == MiB
        c.publish("t", b"small", confirm=True)
        assert accepted(broker) == before


def test_a_large_message_on_a_broker_with_a_larger_limit_is_received(
    start_broker: Callable[..., Broker],
) -> None:
    """Item 2: the broker announces its limit (`registered.max_frame`); the client takes
    deliveries up to it, and publishes up to it, without being configured."""
    broker = start_broker(max_frame=4 * MiB)
    payload = bytes(range(256)) * (8 * 1024)  # 2 MiB
    got: list[Message] = []
    with client(broker, "big-sub") as sub, client(broker, "big-pub") as pub:
        sub.subscribe("blobs", got.append)
        pub.publish("blobs", payload, confirm=True)
        wait_until(lambda: bool(got) or sub.closed, 10, lambda: "the delivery")
        assert sub.error is None
        assert got[0].payload == payload


def test_a_delivery_too_large_for_the_client_never_makes_it_reconnect_in_a_loop(
    start_broker: Callable[..., Broker], dial: Callable[[Broker], Any]
) -> None:
    """Item 2: a 2 MiB message used to be a poison message (166 reconnects in 8 s). Now it
    is received (the broker announced its limit) or, from a broker that does not announce it,
    ends the client with `PayloadTooLarge`: never a reconnect loop."""
    broker = start_broker(max_frame=4 * MiB)
    got: list[Message] = []
    with client(broker, "poisoned") as sub:
        sub.subscribe("blobs", got.append)
        before = accepted(broker)
        with client(broker, "publisher", max_frame=4 * MiB) as pub:
            pub.publish("blobs", b"z" * (2 * MiB), confirm=True)
        wait_until(lambda: bool(got) or sub.closed, 10, lambda: "the delivery or the end")
        # (Received, or stopped for good: either way no reconnect is still to come.)
        assert accepted(broker) - before == 1, "the subscriber reconnected"  # (the publisher)
        if not got:
            assert isinstance(sub.error, PayloadTooLarge) and "max_frame" in str(sub.error)


def test_health_details_too_large_for_a_ping_do_not_make_the_client_reconnect(
    start_broker: Callable[..., Broker],
) -> None:
    """A health report is the application's input too: a ping the broker would refuse
    dropped the connection at every keepalive. The ping goes without its details."""
    broker = start_broker(max_frame=4096)

    reports: list[float] = []

    def health() -> Health:
        reports.append(time.monotonic())
        return Health("degraded", {"log": "x" * 5000})

    with client(broker, "chatty", keepalive=1, health=health) as c:
        before = accepted(broker)
        # Three pings, a second apart: each refused one would have cost a connection.
        wait_until(lambda: len(reports) >= 3, 10, lambda: f"3 pings, got {len(reports)}")
        assert c.connected and accepted(broker) == before
