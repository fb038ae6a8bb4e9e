"""One owner per counter: `Broker.stats()` merges the actors' counters and refuses a name two
of them report, and the `stats` frame answers the same counters, with the same values, as the
actor that owns them (docs/architecture.md section 2; docs/protocol.md section 10).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.wire import WireClient, wait_for
from tether.broker.config import BrokerConfig
from tether.broker.messages import GetStats
from tether.broker.server import Broker
from tether.broker.users import UserStore, add_user
from tether.protocol import Registered, Stats, StatsResult

# What the `stats` frame holds (docs/protocol.md section 10), all the SubscriberManager's.
FRAME_COUNTERS = {
    "sessions",
    "connected",
    "expired",
    "bcrypt_hashes",
    "topics",
    "published",
    "delivered",
    "dropped",
    "queued",
}
OWNERS = {
    "listeners": {"connections", "accepted"},
    "supervisor": {"auth_ok", "auth_failed", "rate_limited"},
    "subscribers": FRAME_COUNTERS,
}


class FakeRef:
    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters

    def ask(self, message: Any, timeout: float | None = None) -> dict[str, int]:
        return self.counters


def test_a_counter_reported_by_two_actors_is_refused() -> None:
    broker = Broker(BrokerConfig(port=0, data_dir=None))
    broker._refs = {
        "listeners": FakeRef({"connections": 1}),
        "supervisor": FakeRef({"auth_ok": 2, "sessions": 3}),
        "sessions": FakeRef({}),
        "subscribers": FakeRef({"sessions": 3, "queued": 0}),
    }  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="'sessions' reported by both supervisor and"):
        broker.stats()
    broker._refs["supervisor"] = FakeRef({"auth_ok": 2})  # type: ignore[assignment]
    assert broker.stats() == {"connections": 1, "auth_ok": 2, "sessions": 3, "queued": 0}


@pytest.fixture
def admin_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker whose users file has an admin (only admins may send `stats`)."""
    users = tmp_path / "users.json"
    add_user(users, "root", "rootpw", cost=4, admin=True)
    broker = Broker(
        BrokerConfig(port=0, users_path=users, data_dir=None), users=UserStore.load(users)
    )
    broker.start()
    yield broker
    broker.stop()


def test_each_counter_has_one_owner_and_the_frame_agrees(admin_broker: Broker) -> None:
    broker = admin_broker
    assert broker.address is not None
    client = WireClient(broker.address)
    assert isinstance(client.register("dev", "root", "rootpw"), Registered)
    wait_for(lambda: broker.stats()["connected"] == 1)
    merged = broker.stats()
    assert set(merged) == set().union(*OWNERS.values())
    for name, keys in OWNERS.items():
        assert set(broker._refs[name].ask(GetStats(), timeout=10)) == keys
    client.send(Stats(req=4))
    answer = client.recv()
    assert isinstance(answer, StatsResult) and set(answer.stats) == FRAME_COUNTERS
    # Nothing moved between the two readings but the frame's own session: the same values.
    assert answer.stats == {key: merged[key] for key in FRAME_COUNTERS}
    client.close()
