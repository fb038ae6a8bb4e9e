"""Topic permissions against real brokers: publish and subscribe allowed and refused (the
connection goes on), placeholders, a crafted client id, `--default-deny`, and permissions
changed while subscribed (the subscription ends with one `error` carrying `topic`, its queue
is discarded, the others go on), for a connected session, an away one and across a restart;
and the client library's view of it.

Brokers here load their users from a file they watch; a change is applied with
`reload_users()` (what SIGHUP does), and tests wait for what the broker then sends or counts.
"""

from __future__ import annotations

import subprocess
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from tests.helpers import assert_error, registered, resume_frame, subscribe
from tests.test_client_restart import cli_env, tether
from tests.wire import WireClient, wait_for
from tether.broker.messages import GetMetrics, GetSubscriptions, SubscriptionView
from tether.broker.server import Broker
from tether.broker.users import add_user, set_user
from tether.client import Client, NotAuthorized, TetherError
from tether.protocol import Ack, Deliver, Error, ErrorCode, Ok, Publish, Registered, Subscribe

COST = 4
NOT_AUTHORIZED = ErrorCode.NOT_AUTHORIZED
DEV_SUB = ["devices/{client_id}/cmd/#", "fleet/broadcast"]
DEV_PUB = ["devices/{client_id}/telemetry"]


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    add_user(path, "alice", "secret", cost=COST)  # no lists: every topic
    add_user(path, "dev", "pw", cost=COST, publish=DEV_PUB, subscribe=DEV_SUB)
    add_user(path, "ops", "pw", cost=COST, admin=True)
    return path


def _metrics(broker: Broker) -> dict[str, int]:
    ref = broker._refs["subscribers"]
    return cast("dict[str, int]", ref.ask(GetMetrics(), timeout=5))


def _topics(broker: Broker, session_id: str) -> list[str]:
    ref = broker._refs["subscribers"]
    views = cast(
        "dict[str, tuple[SubscriptionView, ...]]",
        ref.ask(GetSubscriptions((session_id,)), timeout=5),
    )
    return [view.topic for view in views.get(session_id, ())]


def _publish(client: WireClient, topic: str, payload: bytes = b"x") -> Ok | Error:
    req = client.next_req()
    client.send(Publish(req=req, topic=topic, payload=payload))
    answer = client.recv()
    assert isinstance(answer, Ok | Error), answer
    assert answer.req == req, answer
    return answer


def _subscribe(client: WireClient, topic: str) -> Ok | Error:
    req = client.next_req()
    client.send(Subscribe(req=req, topic=topic))
    answer = client.recv()
    assert isinstance(answer, Ok | Error), answer
    assert answer.req == req, answer
    return answer


def _refused(answer: object, topic: str) -> None:
    assert isinstance(answer, Error), answer
    assert answer.code == NOT_AUTHORIZED and answer.topic is None, answer
    assert repr(topic) in answer.message, answer


@pytest.mark.parametrize("durable", [False, True], ids=["in_memory", "durable"])
def test_publish_and_subscribe_allowed_and_refused(
    live: Callable[..., Broker],
    dial: Callable[[Broker], WireClient],
    tmp_path: Path,
    durable: bool,
) -> None:
    # Durable: the refusals take their place among answers that wait for the commit.
    broker = live(http=("127.0.0.1", 0), data_dir=tmp_path / "data" if durable else None)
    dev, alice = dial(broker), dial(broker)
    registered(dev.register("dev-7", "dev", "pw"))
    registered(alice.register("a-1"))
    subscribe(alice, "devices/dev-8/telemetry")

    assert _subscribe(dev, "devices/dev-7/cmd/reboot") == Ok(req=dev._req)
    assert _subscribe(dev, "fleet/broadcast") == Ok(req=dev._req)
    _refused(_subscribe(dev, "devices/dev-8/cmd/reboot"), "devices/dev-8/cmd/reboot")
    _refused(_subscribe(dev, "fleet/other"), "fleet/other")
    assert _publish(dev, "devices/dev-7/telemetry") == Ok(req=dev._req)
    _refused(_publish(dev, "devices/dev-8/telemetry"), "devices/dev-8/telemetry")
    # Without `req`: the error has none either, and no `topic` (that marks a revocation).
    dev.send(Publish(topic="devices/dev-8/telemetry", payload=b"sneaky"))
    (answer,) = dev.sync()
    assert_error(answer, NOT_AUTHORIZED, None)
    assert isinstance(answer, Error) and answer.topic is None
    assert "devices/dev-8/telemetry" in answer.message

    # Pipelined: each answer in its request's place.
    reqs = [dev.next_req() for _ in range(3)]
    dev.send(
        Publish(req=reqs[0], topic="devices/dev-7/telemetry", payload=b"1"),
        Publish(req=reqs[1], topic="devices/dev-8/telemetry", payload=b"2"),
        Publish(req=reqs[2], topic="devices/dev-7/telemetry", payload=b"3"),
    )
    first, second, third = dev.recv_many(3)
    assert first == Ok(req=reqs[0]) and third == Ok(req=reqs[2])
    assert_error(second, NOT_AUTHORIZED, reqs[1])

    # Nothing refused was published; the connection and its subscriptions go on.
    assert alice.sync() == []
    assert _publish(alice, "fleet/broadcast", b"hello") == Ok(req=alice._req)
    (delivered,) = dev.sync()
    assert isinstance(delivered, Deliver) and delivered.payload == b"hello"
    figures = _metrics(broker)
    assert figures["permission_denied_publish"] == 3
    assert figures["permission_denied_subscribe"] == 2
    assert broker.http_address is not None
    host, port = broker.http_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as page:
        scraped = page.read().decode()
    assert 'tether_permission_denied_total{action="publish"} 3.0' in scraped
    assert 'tether_permission_denied_total{action="subscribe"} 2.0' in scraped
    # alice (no lists) may use any topic.
    assert _subscribe(alice, "devices/dev-7/cmd/reboot") == Ok(req=alice._req)


def test_a_crafted_client_id_does_not_widen_a_grant(
    live: Callable[..., Broker], dial: Callable[[Broker], WireClient]
) -> None:
    broker = live()
    for crafted in ("a/#", "+", "#"):
        dev = dial(broker)
        registered(dev.register(crafted, "dev", "pw"))
        # Naively substituted, `devices/{client_id}/cmd/#` would become a wildcard grant.
        for topic in ("devices/a/#/cmd/x", "devices/a/b/cmd/x", "devices/x/cmd/y", "devices/#"):
            _refused(_subscribe(dev, topic), topic)
        for topic in ("devices/a/#/telemetry", "devices/x/telemetry", "devices/+/telemetry"):
            _refused(_publish(dev, topic), topic)
        # What does not use the placeholder still holds.
        assert _subscribe(dev, "fleet/broadcast") == Ok(req=dev._req)


def test_default_deny(live: Callable[..., Broker], dial: Callable[[Broker], WireClient]) -> None:
    broker = live(default_deny=True)
    alice, dev, ops = dial(broker), dial(broker), dial(broker)
    registered(alice.register("a-1"))
    registered(dev.register("dev-7", "dev", "pw"))
    registered(ops.register("ops-1", "ops", "pw"))
    # A user without lists may use no topic.
    _refused(_subscribe(alice, "anything"), "anything")
    _refused(_publish(alice, "anything"), "anything")
    # Lists still grant what they say.
    assert _subscribe(dev, "devices/dev-7/cmd/x") == Ok(req=dev._req)
    assert _publish(dev, "devices/dev-7/telemetry") == Ok(req=dev._req)
    # `$sys/...` follows the admin mark only.
    assert _subscribe(ops, "$sys/sessions/registered") == Ok(req=ops._req)
    _refused(_subscribe(ops, "fleet/broadcast"), "fleet/broadcast")
    assert_error(_subscribe(dev, "$sys/sessions/registered"), NOT_AUTHORIZED, dev._req)


def _await_revoked(client: WireClient, topic: str) -> Error:
    (notice,) = client.recv_until(lambda f: isinstance(f, Error))[-1:]
    assert_error(notice, NOT_AUTHORIZED, None)
    assert isinstance(notice, Error) and notice.topic == topic, notice
    return notice


def _dev_subscribed(
    broker: Broker, dial: Callable[[Broker], WireClient]
) -> tuple[WireClient, WireClient, Registered]:
    """dev-7 (user dev) subscribed to its command topic and the broadcast; alice beside it."""
    dev, alice = dial(broker), dial(broker)
    reg = registered(dev.register("dev-7", "dev", "pw"))
    registered(alice.register("a-1"))
    subscribe(dev, "devices/dev-7/cmd/a")
    subscribe(dev, "fleet/broadcast")
    return dev, alice, reg


def test_a_permission_removed_while_subscribed(
    live: Callable[..., Broker], dial: Callable[[Broker], WireClient], users_path: Path
) -> None:
    broker = live()
    dev, alice, reg = _dev_subscribed(broker, dial)
    for n in range(3):  # delivered, never acked: held in the queue
        assert _publish(alice, "devices/dev-7/cmd/a", b"%d" % n) == Ok(req=alice._req)
    assert len(dev.sync()) == 3
    assert _metrics(broker)["messages_queued"] == 3

    set_user(users_path, "dev", subscribe=["fleet/broadcast"])
    broker.reload_users()
    notice = _await_revoked(dev, "devices/dev-7/cmd/a")
    assert "devices/dev-7/cmd/a" in notice.message
    assert dev.sync() == []  # one notice, no more

    # Its queue is gone; the other subscription goes on; the topic cannot be taken again.
    assert _topics(broker, reg.session_id) == ["fleet/broadcast"]
    figures = _metrics(broker)
    assert figures["messages_queued"] == 0 and figures["subscriptions_revoked"] == 1
    assert _publish(alice, "devices/dev-7/cmd/a") == Ok(req=alice._req)
    assert _publish(alice, "fleet/broadcast", b"still") == Ok(req=alice._req)
    (delivered,) = dev.sync()
    assert isinstance(delivered, Deliver) and delivered.topic == "fleet/broadcast"
    dev.send(Ack(topic="fleet/broadcast", seq=delivered.seq))
    _refused(_subscribe(dev, "devices/dev-7/cmd/a"), "devices/dev-7/cmd/a")
    # The publish list was not touched.
    assert _publish(dev, "devices/dev-7/telemetry") == Ok(req=dev._req)


def test_an_away_session_is_told_on_resume(
    live: Callable[..., Broker], dial: Callable[[Broker], WireClient], users_path: Path
) -> None:
    broker = live()
    dev, alice, reg = _dev_subscribed(broker, dial)
    dev.close()
    wait_for(lambda: broker.stats()["connected"] == 1)
    for topic in ("devices/dev-7/cmd/a", "fleet/broadcast"):
        assert _publish(alice, topic) == Ok(req=alice._req)

    set_user(users_path, "dev", subscribe=["fleet/broadcast"])
    broker.reload_users()
    wait_for(lambda: _metrics(broker)["subscriptions_revoked"] == 1, timeout=10)
    assert _topics(broker, reg.session_id) == ["fleet/broadcast"]

    back = dial(broker)
    back.send(resume_frame(back.next_req(), "dev-7", reg, username="dev"))
    again = registered(back.recv())
    assert again.resumed and again.queued == 1  # the revoked queue's message is gone
    _await_revoked(back, "devices/dev-7/cmd/a")
    frames = back.sync()
    assert [f.topic for f in frames if isinstance(f, Deliver)] == ["fleet/broadcast"]
    assert not any(isinstance(f, Error) for f in frames)


def test_a_restart_applies_the_current_permissions(
    live: Callable[..., Broker],
    dial: Callable[[Broker], WireClient],
    users_path: Path,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    broker = live(data_dir=data)
    dev = dial(broker)
    reg = registered(dev.register("dev-7", "dev", "pw"))
    subscribe(dev, "devices/dev-7/cmd/a")
    subscribe(dev, "fleet/broadcast")
    dev.close()
    broker.stop()

    set_user(users_path, "dev", subscribe=["fleet/broadcast"])
    broker = live(data_dir=data)
    # Restored, and checked at start: the store keeps only what is still allowed.
    assert _topics(broker, reg.session_id) == ["fleet/broadcast"]
    back = dial(broker)
    back.send(resume_frame(back.next_req(), "dev-7", reg, username="dev"))
    assert registered(back.recv()).resumed
    _await_revoked(back, "devices/dev-7/cmd/a")
    broker.stop()
    broker = live(data_dir=data)
    assert _topics(broker, reg.session_id) == ["fleet/broadcast"]  # the unsubscribe was stored


def test_the_client_library(
    live: Callable[..., Broker], users_path: Path, dial: Callable[[Broker], WireClient]
) -> None:
    broker = live()
    assert broker.address is not None
    host, port = broker.address
    errors: list[TetherError] = []
    got_error = threading.Event()

    def on_error(error: TetherError) -> None:
        errors.append(error)
        got_error.set()

    alice = dial(broker)
    registered(alice.register("a-1"))
    with Client(
        client_id="dev-7",
        username="dev",
        password="pw",
        host=host,
        port=port,
        takeover=True,
        on_error=on_error,
    ) as client:
        commands = client.subscribe("devices/dev-7/cmd/a")
        client.subscribe("fleet/broadcast")
        with pytest.raises(NotAuthorized):
            client.subscribe("devices/dev-8/cmd/a")
        with pytest.raises(NotAuthorized):
            client.publish("devices/dev-8/telemetry", b"x", confirm=True)
        client.publish("devices/dev-7/telemetry", b"x", confirm=True)
        assert "devices/dev-8/cmd/a" not in client._machine.topics

        set_user(users_path, "dev", subscribe=["fleet/broadcast"])
        broker.reload_users()
        assert got_error.wait(10)
        assert isinstance(errors[0], NotAuthorized)
        assert "devices/dev-7/cmd/a" in str(errors[0])
        # Forgotten: a new session would not subscribe to it again.
        wait_for(lambda: "devices/dev-7/cmd/a" not in client._machine.topics)
        assert client._machine.topics == ("fleet/broadcast",)
        # Its iterator ends (None: the end, not a timeout) instead of waiting for ever.
        assert commands.get(timeout=10) is None


def test_tether_sub_ends_when_its_subscriptions_are_revoked(
    live: Callable[..., Broker], users_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    broker = live()
    assert broker.address is not None
    topics_before = broker.stats()["topics"]
    proc = subprocess.Popen(
        tether(
            "sub",
            "devices/dev-7/cmd/a",
            *("--username", "dev", "--client-id", "dev-7", "--port", str(broker.address[1])),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env("pw"),
    )
    processes.append(proc)
    wait_for(lambda: broker.stats()["topics"] > topics_before or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    set_user(users_path, "dev", subscribe=["fleet/broadcast"])
    broker.reload_users()
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    assert "the broker ended a subscription" in err and "devices/dev-7/cmd/a" in err
    assert "not authorized for any of the topics any more" in err
