"""The `stats` extension frame. (`tether stats` reads the HTTP API: tests/test_admin_cli.py.)"""

from __future__ import annotations

from collections.abc import Callable

from tests.wire import WireClient
from tether.broker.server import Broker
from tether.protocol import Ok, Publish, Registered, Stats, StatsResult, Subscribe


def test_stats_frame_answers_counters(broker: Broker, connect: Callable[[], WireClient]) -> None:
    client = connect()
    assert isinstance(client.register("dev"), Registered)
    client.send(Subscribe(req=2, topic="t"), Publish(topic="t", payload=b"x", req=3))
    assert client.recv() == Ok(req=2)
    assert client.recv() == Ok(req=3)
    client.recv()  # the delivery of its own publish
    client.send(Stats(req=4))
    answer = client.recv()
    assert isinstance(answer, StatsResult)
    assert answer.req == 4
    assert answer.stats["sessions"] == 1
    assert answer.stats["connected"] == 1
    assert answer.stats["published"] == 1
    assert answer.stats["delivered"] == 1
    assert answer.stats["bcrypt_hashes"] >= 1


def test_stats_before_register_is_not_registered(connect: Callable[[], WireClient]) -> None:
    client = connect()
    client.send(Stats(req=9))
    answer = client.recv()
    assert getattr(answer, "code", None) == "not_registered"
