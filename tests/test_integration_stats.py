"""The `stats` extension frame: admin users only. (`tether stats` reads the HTTP API:
tests/test_admin_cli.py.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import broker_factory
from tests.wire import WireClient
from tether.broker.server import Broker
from tether.broker.users import add_user
from tether.protocol import Error, Ok, Publish, Registered, Stats, StatsResult, Subscribe

ROOT, ROOT_PASSWORD = "root", "rootpw"


@pytest.fixture(scope="module")
def admin_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats-users") / "users.json"
    add_user(path, "alice", "secret", cost=4)
    add_user(path, ROOT, ROOT_PASSWORD, cost=4, admin=True)
    return path


@pytest.fixture
def admin_broker(admin_users: Path) -> Iterator[Broker]:
    with broker_factory(admin_users) as start:
        yield start()


@pytest.fixture
def dial_admin(admin_broker: Broker, dial: Callable[..., WireClient]) -> Callable[[], WireClient]:
    return lambda: dial(admin_broker, timeout=5.0)  # WireClient's own default


def test_stats_frame_answers_counters(dial_admin: Callable[[], WireClient]) -> None:
    client = dial_admin()
    assert isinstance(client.register("dev", ROOT, ROOT_PASSWORD), Registered)
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
    assert answer.stats["queued"] == 1  # its own delivery, not acked
    assert answer.stats["topics"] == 1
    assert answer.stats["bcrypt_hashes"] >= 1


def test_stats_from_a_user_not_admin_is_not_authorized_and_not_fatal(
    dial_admin: Callable[[], WireClient],
) -> None:
    client = dial_admin()
    assert isinstance(client.register("dev"), Registered)  # alice: not admin
    client.send(Stats(req=4), Subscribe(req=5, topic="t"))
    answer = client.recv()
    assert isinstance(answer, Error) and answer.code == "not_authorized" and answer.req == 4
    assert client.recv() == Ok(req=5)  # the session goes on


def test_stats_before_register_is_not_registered(connect: Callable[[], WireClient]) -> None:
    client = connect()
    client.send(Stats(req=9))
    answer = client.recv()
    assert getattr(answer, "code", None) == "not_registered"
