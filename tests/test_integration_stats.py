"""The `stats` extension frame: admin users only. (`tether stats` reads the HTTP API:
tests/test_admin_cli.py.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.wire import WireClient
from tether.broker.config import BrokerConfig
from tether.broker.server import Broker
from tether.broker.users import UserStore, add_user
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
    config = BrokerConfig(port=0, users_path=admin_users, data_dir=None)
    broker = Broker(replace(config), users=UserStore.load(admin_users))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def dial_admin(admin_broker: Broker) -> Iterator[Callable[[], WireClient]]:
    made: list[WireClient] = []

    def make() -> WireClient:
        assert admin_broker.address is not None
        client = WireClient(admin_broker.address)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


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
