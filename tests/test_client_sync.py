"""The blocking `Client` against a real broker on loopback: sessions, errors, heartbeats."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.admin_users import ROOT, ROOT_PASSWORD, users_with_admin
from tests.test_client_chaos import FAST, ChaosProxy, wait_until
from tests.test_client_connect import free_port
from tether.broker.server import Broker
from tether.client import (
    AuthFailed,
    Client,
    ClientClosed,
    ConnectionFailed,
    Dropped,
    Health,
    Message,
    Rejected,
    SessionLost,
    TakenOver,
    Timeout,
    load_state,
)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's users and an admin, root (only admins may ask `stats`)."""
    return users_with_admin(tmp_path_factory.mktemp("users") / "users.json")


def client(broker: Broker | ChaosProxy, client_id: str, **kw: Any) -> Client:
    assert broker.address is not None
    host, port = broker.address
    options: dict[str, Any] = {"username": "alice", "password": "secret", **FAST, **kw}
    return Client(client_id=client_id, host=host, port=port, **options)


def test_publish_subscribe_and_confirm(broker: Broker) -> None:
    got: list[Message] = []
    with (
        client(broker, "sub") as sub,
        client(broker, "pub", username="bob", password="hunter2") as pub,
    ):
        sub.subscribe("greetings", got.append)
        pub.publish("greetings", "hello", confirm=True)
        pub.publish("greetings", b"\x00\xff")
        wait_until(lambda: len(got) == 2, 5, lambda: f"2 messages, got {got}")
    assert [(m.topic, m.seq, m.payload) for m in got] == [
        ("greetings", 1, b"hello"),
        ("greetings", 2, b"\x00\xff"),
    ]


def test_stats_returns_the_broker_counters(broker: Broker) -> None:
    with client(broker, "stats", username=ROOT, password=ROOT_PASSWORD) as c:
        c.subscribe("t")
        c.publish("t", "x", confirm=True)
        stats = c.stats()
        assert stats["sessions"] == 1
        assert stats["connected"] == 1
        assert stats["topics"] == 1
        assert stats["published"] == 1
        assert stats["bcrypt_hashes"] >= 1
    with pytest.raises(ClientClosed):
        c.stats()


def test_close_is_idempotent_and_later_calls_say_closed(broker: Broker) -> None:
    c = client(broker, "idem").connect()
    c.close()
    c.close()
    assert c.closed
    with pytest.raises(ClientClosed, match="create a new Client"):
        c.publish("t", b"x")


def test_wrong_password_fails_connect_without_retrying(broker: Broker) -> None:
    started = time.monotonic()
    with pytest.raises(AuthFailed, match="check the password of user 'alice'"):
        client(broker, "bad", password="wrong").connect()
    assert time.monotonic() - started < 5


def test_unreachable_broker_fails_connect_after_the_timeout() -> None:
    # (A port nothing listens on, rather than port 1, which some machines do use.)
    port = free_port()
    with pytest.raises(ConnectionFailed, match="check that the broker runs"):
        Client(client_id="x", username="u", password="p", port=port, connect_timeout=0.3).connect()


def test_conflict_is_rejected_and_takeover_replaces(broker: Broker) -> None:
    taken: list[TakenOver] = []
    first = client(broker, "dev", on_taken_over=taken.append).connect()
    with pytest.raises(Rejected) as info:
        client(broker, "dev").connect()
    assert info.value.code == "conflict" and "takeover=True" in str(info.value)
    with client(broker, "dev", takeover=True) as second:
        wait_until(lambda: bool(taken), 5, lambda: "the taken_over callback")
        assert first.closed and isinstance(first.error, TakenOver)
        with pytest.raises(TakenOver):
            first.publish("t", b"x")
        # The old client does not come back for its session: the new one keeps it.
        time.sleep(0.3)
        assert second.connected
        assert broker.stats()["connected"] == 1
    first.close()


def test_unregister_ends_the_session(broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    c = client(broker, "gone", state_file=state).connect()
    c.subscribe("t")
    c.unregister()
    assert c.closed
    saved = load_state(state, "gone")
    assert saved is not None and saved.session_id is None
    # The client_id is free again at once (no conflict with a lingering session).
    with client(broker, "gone") as again:
        assert again.session_id is not None


def test_session_lost_while_away_is_told_and_the_client_carries_on(
    start_broker: Callable[..., Broker],
) -> None:
    broker = start_broker(session_expiry=0.3)
    assert broker.address is not None
    proxy = ChaosProxy(broker.address, cut_bytes=None, cut_seconds=None)
    lost: list[SessionLost] = []
    got: list[bytes] = []
    try:
        with (
            client(proxy, "roamer", on_session_lost=lost.append) as c,
            client(broker, "pub2", username="bob", password="hunter2") as pub,
        ):
            c.subscribe("news", lambda m: got.append(m.payload))
            pub.publish("news", b"before", confirm=True)
            wait_until(lambda: got == [b"before"], 5, lambda: f"the first message, got {got}")
            old = c.session_id
            proxy.set_down(True)  # away longer than the session lingers
            wait_until(lambda: broker.stats()["sessions"] == 1, 5, lambda: "the expiry")
            proxy.set_down(False)
            wait_until(lambda: bool(lost) and c.connected, 5, lambda: "the new session")
            assert c.session_id != old
            assert lost[0].old_session_id == old and "session-expiry" in str(lost[0])
            # Subscriptions were restored on the new session: messages flow again.
            wait_until(lambda: broker.stats()["topics"] == 1, 5, lambda: "the re-subscription")
            pub.publish("news", b"after", confirm=True)
            wait_until(lambda: got == [b"before", b"after"], 5, lambda: f"got {got}")
    finally:
        proxy.close()


def test_heartbeats_carry_health_and_keep_an_idle_connection(broker: Broker) -> None:
    calls: list[float] = []

    def health() -> Health:
        calls.append(time.monotonic())
        return Health("degraded", {"disk_free": 0.07})

    with client(broker, "hb", keepalive=1, health=health) as c:
        time.sleep(2.4)  # the broker drops a connection silent for 1.5 s
        assert c.connected
        assert len(calls) >= 2
    assert broker.stats()["sessions"] >= 1


def test_a_dead_path_is_noticed_by_the_pings_and_the_client_reconnects(
    broker: Broker,
) -> None:
    assert broker.address is not None
    proxy = ChaosProxy(broker.address, cut_bytes=None, cut_seconds=None)
    try:
        with client(proxy, "pinger", keepalive=1) as c:
            first = proxy.connections
            proxy.freeze_links()  # bytes vanish, nothing closes
            wait_until(lambda: proxy.connections > first, 5, lambda: "a new connection")
            wait_until(lambda: c.connected, 5, lambda: "the resume")
    finally:
        proxy.close()


def test_drops_while_away_reach_the_application(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = start_broker(queue_limit=10)
    state = tmp_path / "s.json"
    with client(broker, "slow", state_file=state) as c:
        c.subscribe("firehose")
    with client(broker, "pub4") as pub:
        for i in range(30):
            pub.publish("firehose", b"%d" % i)
        pub.publish("firehose", b"30", confirm=True)
    drops: list[Dropped] = []
    got: list[int] = []
    with client(broker, "slow", state_file=state, on_dropped=drops.append) as c:
        c.subscribe("firehose", lambda m: got.append(int(m.payload)))
        wait_until(lambda: len(got) == 10, 5, lambda: f"10 messages, got {got}")
    assert drops == [Dropped(None, 21)]
    assert got == list(range(21, 31))


def test_messages_for_a_resumed_topic_wait_for_the_application(
    broker: Broker, tmp_path: Path
) -> None:
    """A restarted process subscribes after connecting: what the resumed session delivers
    meanwhile is held for it, in order, not lost and not acked."""
    state = tmp_path / "s.json"
    with client(broker, "late", state_file=state) as c:
        c.subscribe("t")
    with client(broker, "pub5") as pub:
        for i in range(5):
            pub.publish("t", b"%d" % i, confirm=True)
    with client(broker, "late", state_file=state) as c:
        time.sleep(0.2)  # the queued messages arrive before anyone subscribed
        messages = c.subscribe("t")
        assert [int(m.payload) for m in (messages.get(2) for _ in range(5)) if m] == [0, 1, 2, 3, 4]


def test_request_timeout_says_what_to_do(broker: Broker) -> None:
    assert broker.address is not None
    proxy = ChaosProxy(broker.address, cut_bytes=None, cut_seconds=None)
    try:
        with client(proxy, "slowpoke", request_timeout=0.3) as c:
            proxy.frozen = True
            with pytest.raises(Timeout, match="the client keeps trying") as info:
                c.publish("t", b"x", confirm=True)
            assert isinstance(info.value, TimeoutError)
            proxy.frozen = False
    finally:
        proxy.close()


def test_a_failing_handler_does_not_stop_the_others(broker: Broker) -> None:
    got: list[int] = []

    def picky(message: Message) -> None:
        if message.payload == b"1":
            raise RuntimeError("boom")
        got.append(int(message.payload))

    with client(broker, "picky") as c:
        c.subscribe("t", picky)
        for i in range(3):
            c.publish("t", b"%d" % i)
        wait_until(lambda: got == [0, 2], 5, lambda: f"got {got}")


def test_unsubscribe_ends_the_iterator(broker: Broker) -> None:
    with client(broker, "iter") as c:
        sub = c.subscribe("t")
        result: list[Any] = []
        reader = threading.Thread(target=lambda: result.extend(sub))
        reader.start()
        c.publish("t", b"one", confirm=True)
        wait_until(lambda: len(result) == 1, 5, lambda: "one message")
        sub.unsubscribe()
        reader.join(5)
        assert not reader.is_alive()
