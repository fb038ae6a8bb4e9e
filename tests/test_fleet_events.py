"""The fleet view against a real in-process broker: lifecycle events received by a real admin
subscriber on `$sys/sessions/<event>`, each produced by its real cause; presence and health as
the SessionManager answers them (`ask`, as the HTTP endpoint does); the operator's disconnect
and end as a raw client sees them; the registration metrics.

Waits are bounded polls (`wait_for`) or the raw client's receive timeouts; nothing is timed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest

from tests.helpers import assert_error, broker_factory, registered, resume_frame, subscribe
from tests.wire import WireClient, wait_for
from tether.broker.config import BrokerConfig
from tether.broker.messages import (
    DisconnectSession,
    EndSessionByAdmin,
    GetMetrics,
    GetSession,
    SessionView,
)
from tether.broker.server import Broker
from tether.broker.users import UserStore, add_user, remove_user
from tether.protocol import Ack, Deliver, Ping, Pong, Registered, Subscribe, Unregister

ADMIN = ("root", "rootpw")
EVENTS = ("registered", "resumed", "disconnected", "taken_over", "expired", "ended", "health")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(scope="module")
def fleet_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fleet-users") / "users.json"
    add_user(path, "alice", "secret", cost=4)
    add_user(path, ADMIN[0], ADMIN[1], cost=4, admin=True)
    return path


@pytest.fixture
def fleet_broker(fleet_users: Path) -> Iterator[Callable[..., Broker]]:
    with broker_factory(fleet_users) as start:
        yield start


@pytest.fixture
def dial_fleet(dial: Callable[..., WireClient]) -> Callable[[Broker], WireClient]:
    # conftest's `dial`, with room for the waits of expiries and presence.
    return lambda broker: dial(broker, timeout=5.0)


Dial = Callable[[Broker], WireClient]


def ask(broker: Broker, message: Any) -> Any:
    return broker._refs["sessions"].ask(message, timeout=10)


def view(broker: Broker, client_id: str) -> SessionView:
    found = ask(broker, GetSession(client_id))
    assert isinstance(found, SessionView), found
    return found


class Watcher:
    """An admin session subscribed to every lifecycle event, acking what it gets."""

    def __init__(self, broker: Broker, dial: Dial) -> None:
        self.client = dial(broker)
        self.registered = registered(self.client.register("fleet-manager", ADMIN[0], ADMIN[1]))
        for event in EVENTS:
            subscribe(self.client, f"$sys/sessions/{event}")

    def next(self, event: str, client_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next event `event` about `client_id`, skipping others (about other sessions,
        or ones a test does not look for)."""
        while True:
            frame = self.client.recv(timeout)
            assert isinstance(frame, Deliver), frame
            self.client.send(Ack(topic=frame.topic, seq=frame.seq))
            payload: dict[str, Any] = msgpack.unpackb(frame.payload, raw=False)
            if frame.topic == f"$sys/sessions/{event}" and payload["client_id"] == client_id:
                assert RFC3339.match(payload.pop("at")), payload
                return payload

    def quiet(self) -> list[tuple[str, dict[str, Any]]]:
        """Every event delivered before a ping's pong (acked)."""
        got = []
        for frame in self.client.sync():
            assert isinstance(frame, Deliver), frame
            self.client.send(Ack(topic=frame.topic, seq=frame.seq))
            got.append((frame.topic, msgpack.unpackb(frame.payload, raw=False)))
        return got


def peer_of(client: WireClient) -> str:
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


@pytest.mark.parametrize("durable", [False, True], ids=["in_memory", "durable"])
def test_every_lifecycle_event_reaches_an_admin_subscriber(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial, tmp_path: Path, durable: bool
) -> None:
    broker = fleet_broker(data_dir=tmp_path / "data" if durable else None)
    watcher = Watcher(broker, dial_fleet)

    device = dial_fleet(broker)
    reg = registered(device.register("sensor-7", keepalive=20, metadata={"model": "x1"}))
    who = {"client_id": "sensor-7", "username": "alice", "session_id": reg.session_id}
    assert watcher.next("registered", "sensor-7") == {
        **who,
        "peer": peer_of(device),
        "keepalive": 20,
        "metadata": {"model": "x1"},
    }

    device.send(Ping(req=device.next_req(), status="degraded", details={"battery": 12}))
    assert isinstance(device.recv(), Pong)
    assert watcher.next("health", "sensor-7") == {
        **who,
        "status": "degraded",
        "was": None,
        "details": {"battery": 12},
    }

    lost_peer = peer_of(device)
    device.close()
    assert watcher.next("disconnected", "sensor-7") == {
        **who,
        "peer": lost_peer,
        "reason": "connection_lost",
    }

    again = dial_fleet(broker)
    again.send(resume_frame(again.next_req(), "sensor-7", reg))
    reg = registered(again.recv())
    assert watcher.next("resumed", "sensor-7") == {**who, "peer": peer_of(again)}

    # A resume over the live connection takes it over.
    third = dial_fleet(broker)
    third.send(resume_frame(third.next_req(), "sensor-7", reg))
    reg = registered(third.recv())
    assert_error(again.frames_until_closed()[0], "taken_over", None)
    assert watcher.next("taken_over", "sensor-7") == {
        **who,
        "peer": peer_of(third),
        "reason": "resume",
    }
    assert watcher.next("resumed", "sensor-7") == {**who, "peer": peer_of(third)}

    # A fresh registration with takeover=true ends it: taken over, then a new session.
    fresh = dial_fleet(broker)
    new = registered(fresh.register("sensor-7", takeover=True))
    assert watcher.next("taken_over", "sensor-7") == {
        **who,
        "peer": peer_of(fresh),
        "reason": "takeover",
    }
    assert watcher.next("registered", "sensor-7")["session_id"] == new.session_id

    fresh.send(Unregister(req=fresh.next_req()))
    fresh.frames_until_closed()
    assert watcher.next("ended", "sensor-7") == {
        "client_id": "sensor-7",
        "username": "alice",
        "session_id": new.session_id,
        "reason": "unregistered",
    }

    # The operator's end.
    other = dial_fleet(broker)
    other_reg = registered(other.register("pump-1"))
    watcher.next("registered", "pump-1")
    assert ask(broker, EndSessionByAdmin("pump-1")) is not None
    assert watcher.next("ended", "pump-1") == {
        "client_id": "pump-1",
        "username": "alice",
        "session_id": other_reg.session_id,
        "reason": "ended_by_admin",
    }
    # Once per cause: nothing else came about these sessions.
    assert watcher.quiet() == []


def test_an_away_session_expires_with_an_event(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial
) -> None:
    broker = fleet_broker(session_expiry=0.3)
    watcher = Watcher(broker, dial_fleet)
    device = dial_fleet(broker)
    reg = registered(device.register("short-lived"))
    device.close()
    watcher.next("disconnected", "short-lived")
    assert watcher.next("expired", "short-lived") == {
        "client_id": "short-lived",
        "username": "alice",
        "session_id": reg.session_id,
    }
    assert ask(broker, GetSession("short-lived")) is None


def test_only_admin_users_may_subscribe_to_sys_topics(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial
) -> None:
    broker = fleet_broker()
    plain = dial_fleet(broker)
    registered(plain.register("plain"))
    req = plain.next_req()
    plain.send(Subscribe(req=req, topic="$sys/sessions/registered"))
    assert_error(plain.recv(), "not_authorized", req)
    # The admin flag comes with a resume too.
    admin = dial_fleet(broker)
    reg = registered(admin.register("ops", ADMIN[0], ADMIN[1]))
    admin.close()
    back = dial_fleet(broker)
    back.send(resume_frame(back.next_req(), "ops", reg, username=ADMIN[0]))
    registered(back.recv())
    subscribe(back, "$sys/sessions/registered")


# --- presence and health ------------------------------------------------------------------


def test_presence_turns_away_on_disconnect(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial
) -> None:
    broker = fleet_broker()
    device = dial_fleet(broker)
    reg = registered(device.register("d-1", keepalive=30, metadata={"rack": 4}))
    now = view(broker, "d-1")
    assert (now.status, now.peer, now.session_id) == ("online", peer_of(device), reg.session_id)
    assert now.connected_since is not None and now.away_since is None
    assert now.expires_at is None and dict(now.metadata) == {"rack": 4}
    device.close()
    wait_for(lambda: view(broker, "d-1").status == "away")
    gone = view(broker, "d-1")
    assert gone.peer is None and gone.connected_since is None
    assert gone.away_since is not None and gone.expires_at is not None
    assert gone.expires_at == pytest.approx(gone.away_since + broker.config.session_expiry)


def test_health_turns_stale_on_silence_and_fresh_on_a_report(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial
) -> None:
    broker = fleet_broker()
    device = dial_fleet(broker)
    registered(device.register("d-2", keepalive=1))
    device.send(Ping(req=device.next_req(), status="healthy", details={"load": 3}))
    assert isinstance(device.recv(), Pong)
    health = view(broker, "d-2").health
    assert (health.status, dict(health.details or {}), health.stale) == (
        "healthy",
        {"load": 3},
        False,
    )

    def keepalive_without_health_until_stale() -> bool:
        # Plain pings keep it online (the broker closes a connection silent 1.5 s).
        device.sync()
        return view(broker, "d-2").health.stale

    wait_for(keepalive_without_health_until_stale, timeout=8.0, interval=0.3)
    stale = view(broker, "d-2")
    assert stale.status == "online" and stale.health.status == "healthy"
    device.send(Ping(req=device.next_req(), status="degraded"))
    assert isinstance(device.recv(), Pong)
    fresh = view(broker, "d-2").health
    assert (fresh.stale, fresh.status) == (False, "degraded")


# --- the operator's actions, as a client sees them ------------------------------------------


def test_an_operators_disconnect_closes_quietly_and_the_client_resumes(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial
) -> None:
    broker = fleet_broker()
    watcher = Watcher(broker, dial_fleet)
    device = dial_fleet(broker)
    reg = registered(device.register("d-3"))
    before = ask(broker, DisconnectSession("d-3"))
    assert isinstance(before, SessionView) and before.status == "online"
    assert device.frames_until_closed() == []  # no error frame
    assert watcher.next("disconnected", "d-3")["reason"] == "disconnected_by_admin"
    wait_for(lambda: view(broker, "d-3").status == "away")
    back = dial_fleet(broker)
    back.send(resume_frame(back.next_req(), "d-3", reg))
    resumed = back.recv()
    assert isinstance(resumed, Registered) and resumed.resumed
    assert ask(broker, DisconnectSession("nobody")) is None


def test_an_operators_end_sends_session_ended_and_the_session_is_gone(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial
) -> None:
    broker = fleet_broker()
    device = dial_fleet(broker)
    reg = registered(device.register("d-4"))
    before = ask(broker, EndSessionByAdmin("d-4"))
    assert isinstance(before, SessionView) and before.session_id == reg.session_id
    [frame] = device.frames_until_closed()
    assert_error(frame, "session_ended", None)
    assert ask(broker, GetSession("d-4")) is None
    back = dial_fleet(broker)
    req = back.next_req()
    back.send(resume_frame(req, "d-4", reg))
    assert_error(back.recv(), "unknown_session", req)
    assert ask(broker, EndSessionByAdmin("d-4")) is None


# --- metrics ------------------------------------------------------------------------------


def test_registration_and_connection_metrics_move_with_traffic(
    fleet_broker: Callable[..., Broker], dial_fleet: Dial
) -> None:
    broker = fleet_broker()

    def metrics(actor: str) -> dict[str, int]:
        return cast("dict[str, int]", broker._refs[actor].ask(GetMetrics(), timeout=10))

    assert metrics("supervisor") == {
        "registrations_auth_failed": 0,
        "registrations_rate_limited": 0,
        "password_checks": 0,
        "auth_queue_length": 0,
        "auth_queue_refused": 0,
        "client_id_refused": 0,
        "certificate_logins": 0,
    }
    bad = dial_fleet(broker)
    assert_error(bad.register("m-1", password="wrong"), "auth_failed", 1)
    good = dial_fleet(broker)
    reg = registered(good.register("m-1"))
    conflict = dial_fleet(broker)
    assert_error(conflict.register("m-1"), "conflict", 1)
    good.close()
    wait_for(lambda: view(broker, "m-1").status == "away")
    back = dial_fleet(broker)
    back.send(resume_frame(back.next_req(), "m-1", reg))
    registered(back.recv())
    assert metrics("supervisor") == {
        "registrations_auth_failed": 1,
        "registrations_rate_limited": 0,
        "password_checks": 3,  # the wrong one, the good one, the conflicting one
        "auth_queue_length": 0,
        "auth_queue_refused": 0,
        "client_id_refused": 0,
        "certificate_logins": 0,
    }
    sessions = metrics("sessions")
    assert sessions == {
        "sessions_online": 1,
        "sessions_away": 0,
        "registrations_new": 1,
        "registrations_resumed": 1,
        "registrations_taken_over": 0,
        "registrations_conflict": 1,
        "registrations_unknown_session": 0,
        "sessions_quota_refused": 0,
    }
    listeners = metrics("listeners")
    assert listeners["connections_accepted"] == 4
    wait_for(lambda: metrics("listeners")["connections_open"] == 3)  # `good` closed


def test_removing_or_revoking_a_user_raises_ended_with_the_reason(
    tmp_path: Path, dial_fleet: Dial
) -> None:
    users_path = tmp_path / "users.json"
    add_user(users_path, "alice", "secret", cost=4)
    add_user(users_path, "carol", "pw", cost=4)
    add_user(users_path, ADMIN[0], ADMIN[1], cost=4, admin=True)
    config = BrokerConfig(port=0, users_path=users_path, data_dir=None)
    broker = Broker(config)  # no `users=`: loaded from the file, and watched
    broker.start()
    try:
        watcher = Watcher(broker, dial_fleet)
        carol = dial_fleet(broker)
        carol_reg = registered(carol.register("carol-1", "carol", "pw"))
        alice = dial_fleet(broker)
        alice_reg = registered(alice.register("alice-1"))
        remove_user(users_path, "carol")
        ended = watcher.next("ended", "carol-1", timeout=10.0)
        assert ended == {
            "client_id": "carol-1",
            "username": "carol",
            "session_id": carol_reg.session_id,
            "reason": "user_removed",
        }
        assert_error(carol.frames_until_closed()[0], "session_ended", None)
        add_user(users_path, "alice", "rotated", cost=4, replace=True, end_sessions=True)
        ended = watcher.next("ended", "alice-1", timeout=10.0)
        assert (ended["session_id"], ended["reason"]) == (alice_reg.session_id, "sessions_revoked")
    finally:
        broker.stop()


def test_disconnects_by_a_shutdown_say_so_to_a_durable_subscriber(
    fleet_users: Path, tmp_path: Path, dial_fleet: Dial
) -> None:
    config = BrokerConfig(port=0, users_path=fleet_users, data_dir=tmp_path / "data")
    first = Broker(config, users=UserStore.load(fleet_users))
    first.start()
    try:
        watcher = Watcher(first, dial_fleet)
        device = dial_fleet(first)
        reg = registered(device.register("d-9"))
        watcher.next("registered", "d-9")
    finally:
        first.stop()
    second = Broker(config, users=UserStore.load(fleet_users))
    second.start()
    try:
        back = dial_fleet(second)
        resume = resume_frame(1, "fleet-manager", watcher.registered, username=ADMIN[0])
        back.send(resume)
        assert registered(back.recv()).resumed
        watcher.client = back
        event = watcher.next("disconnected", "d-9")
        assert (event["session_id"], event["reason"]) == (reg.session_id, "shutdown")
    finally:
        second.stop()
