"""Integration tests over real TCP: registration, resume, takeover, expiry, unregister, keepalive.

Each test starts a broker with the `start_broker`/`broker` fixtures (as a user would run it,
on a loopback port) and talks to it with blocking `WireClient`s. Tests synchronise on frames;
the only sleeps are where the passing of time is the behaviour under test (keepalive, expiry).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from tests.helpers import (
    Dial,
    assert_error,
    publish_confirmed,
    registered,
    resume_frame,
    subscribe,
    wait_connected,
)
from tests.wire import Closed
from tether.broker.server import Broker
from tether.protocol import (
    Deliver,
    Error,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Registered,
    Subscribe,
    Unregister,
)

# --- new session ------------------------------------------------------------------------------


def test_new_session_registered_fields(start_broker: Callable[..., Broker], dial: Dial) -> None:
    broker = start_broker(session_expiry=42, max_frame=4096)
    client = dial(broker)
    client.send(
        Register(
            req=77,
            client_id="dev-1",
            username="alice",
            password="secret",
            keepalive=7,
            metadata={"name": "sensor", "kind": "probe", "version": "1.2", "tags": ["a"]},
        )
    )
    reg = registered(client.recv())
    assert reg.req == 77
    assert reg.resumed is False
    assert reg.keepalive == 7
    assert reg.expiry == 42
    assert reg.queued == 0
    assert reg.dropped == 0
    assert reg.max_frame == 4096  # the broker's frame limit, so clients need not be told it
    assert reg.session_id and reg.resume_token
    # Nothing else was sent, and the connection is live.
    assert client.sync() == []

    other = registered(dial(broker).register("dev-2"))
    assert other.session_id != reg.session_id
    assert other.resume_token != reg.resume_token


def test_default_keepalive_is_30(broker: Broker, dial: Dial) -> None:
    reg = registered(dial(broker).register("dev"))
    assert reg.keepalive == 30
    assert reg.expiry == round(broker.config.session_expiry)


def test_frame_before_register_is_not_registered(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send(Subscribe(req=5, topic="t"))
    assert_error(client.recv(), "not_registered", 5)
    client.send(Ping(req=6))
    assert_error(client.recv(), "not_registered", 6)
    client.send(Publish(topic="t", payload=b"x", req=7))
    assert_error(client.recv(), "not_registered", 7)
    client.send(Ping())
    assert_error(client.recv(), "not_registered", None)
    # Still usable: it can register now.
    client.send(Register(req=8, client_id="late", username="alice", password="secret"))
    reg = registered(client.recv())
    assert reg.req == 8
    assert client.sync() == []


# --- resume -----------------------------------------------------------------------------------


def test_resume_restores_session_and_rotates_token(broker: Broker, dial: Dial) -> None:
    first = dial(broker)
    reg = registered(first.register("dev", keepalive=20))
    subscribe(first, "t")
    first.close()
    wait_connected(broker, 0)

    second = dial(broker)
    second.send(resume_frame(3, "dev", reg))  # no password
    again = registered(second.recv())
    assert again.req == 3
    assert again.resumed is True
    assert again.session_id == reg.session_id
    assert again.resume_token != reg.resume_token
    assert again.queued == 0
    assert again.dropped == 0
    # The subscription survived the drop.
    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"hello"])
    assert second.recv() == Deliver(topic="t", seq=1, payload=b"hello")

    # A wrong token is refused and does not disturb the session.
    forged = dial(broker)
    forged.send(resume_frame(9, "dev", replace(reg, resume_token="forged")))
    assert_error(forged.recv(), "unknown_session", 9)
    assert second.sync() == []


def test_lost_registered_answer_does_not_strand_the_session(broker: Broker, dial: Dial) -> None:
    # The client resumes with T0 but its connection dies before it reads `registered` (T1):
    # T0 must still work, or the queued messages would be lost to a takeover.
    first = dial(broker)
    reg0 = registered(first.register("dev"))
    subscribe(first, "t")
    first.close()
    wait_connected(broker, 0)
    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"kept"])
    publisher.close()
    wait_connected(broker, 0)
    lost = dial(broker)
    lost.send(resume_frame(1, "dev", reg0))
    wait_connected(broker, 1)  # the resume went through...
    lost.close()  # ...but its answer is never read
    wait_connected(broker, 0)
    again = dial(broker)
    again.send(resume_frame(2, "dev", reg0))
    reg = registered(again.recv())
    assert reg.resumed is True
    delivery = again.recv()
    assert isinstance(delivery, Deliver)
    assert (delivery.seq, delivery.payload) == (1, b"kept")


def test_token_is_dead_once_its_successor_was_used(broker: Broker, dial: Dial) -> None:
    first = dial(broker)
    reg0 = registered(first.register("dev"))
    first.close()
    wait_connected(broker, 0)
    second = dial(broker)
    second.send(resume_frame(1, "dev", reg0))
    reg1 = registered(second.recv())
    second.close()
    wait_connected(broker, 0)
    third = dial(broker)
    third.send(resume_frame(1, "dev", reg1))
    reg2 = registered(third.recv())
    assert len({reg0.resume_token, reg1.resume_token, reg2.resume_token}) == 3
    probe = dial(broker)
    probe.send(resume_frame(2, "dev", reg0))
    assert_error(probe.recv(), "unknown_session", 2)
    assert third.sync() == []  # the session and its connection are untouched


def test_resume_needs_matching_client_id_and_username(broker: Broker, dial: Dial) -> None:
    owner = dial(broker)
    reg = registered(owner.register("dev"))
    owner.close()
    wait_connected(broker, 0)

    probe = dial(broker)
    probe.send(resume_frame(1, "someone-else", reg))
    assert_error(probe.recv(), "unknown_session", 1)
    probe.send(resume_frame(2, "dev", reg, username="bob"))
    assert_error(probe.recv(), "unknown_session", 2)
    # A wrong token for the right session.
    probe.send(
        Register(
            req=3,
            client_id="dev",
            username="alice",
            session_id=reg.session_id,
            resume_token=reg.resume_token + "x",
        )
    )
    assert_error(probe.recv(), "unknown_session", 3)
    # None of those damaged the session: the genuine pair still resumes, on the same connection.
    probe.send(resume_frame(4, "dev", reg))
    assert registered(probe.recv()).resumed is True


# --- takeover and conflict --------------------------------------------------------------------


def test_second_register_without_takeover_conflicts(broker: Broker, dial: Dial) -> None:
    owner = dial(broker)
    registered(owner.register("dev"))
    rival = dial(broker)
    rival.send(Register(req=4, client_id="dev", username="alice", password="secret"))
    assert_error(rival.recv(), "conflict", 4)
    # The rival's connection is still usable, the owner's untouched.
    assert registered(rival.register("dev-b")).resumed is False
    assert rival.sync() == []
    assert owner.sync() == []


def test_takeover_ends_old_session_and_closes_its_connection(broker: Broker, dial: Dial) -> None:
    old = dial(broker)
    old_reg = registered(old.register("dev"))
    subscribe(old, "t")

    new = dial(broker)
    new.send(Register(req=1, client_id="dev", username="alice", password="secret", takeover=True))
    new_reg = registered(new.recv())
    assert new_reg.resumed is False
    assert new_reg.session_id != old_reg.session_id
    assert new_reg.queued == 0

    frames = old.frames_until_closed(timeout=3)
    assert len(frames) == 1, frames
    assert_error(frames[0], "taken_over", None)

    # The old session is gone: its token no longer resumes it.
    probe = dial(broker)
    probe.send(resume_frame(2, "dev", old_reg))
    assert_error(probe.recv(), "unknown_session", 2)
    # And its subscription went with it: the new session gets nothing on "t".
    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"x"])
    assert new.sync() == []


@pytest.mark.parametrize("takeover", [False, True])
def test_another_users_register_conflicts(broker: Broker, dial: Dial, takeover: bool) -> None:
    owner = dial(broker)
    registered(owner.register("dev"))
    intruder = dial(broker)
    intruder.send(
        Register(req=5, client_id="dev", username="bob", password="hunter2", takeover=takeover)
    )
    assert_error(intruder.recv(), "conflict", 5)
    assert owner.sync() == []  # still connected, not taken over
    assert registered(intruder.register("bob-dev", "bob", "hunter2")).resumed is False


def test_resume_while_old_connection_open_takes_it_over(broker: Broker, dial: Dial) -> None:
    old = dial(broker)
    reg = registered(old.register("dev"))
    subscribe(old, "t")
    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"m1", b"m2", b"m3"])
    got = old.recv_many(3)
    assert [d.seq for d in got] == [1, 2, 3]  # type: ignore[union-attr]

    new = dial(broker)
    new.send(resume_frame(1, "dev", reg))
    again = registered(new.recv())
    assert again.resumed is True
    assert again.session_id == reg.session_id
    assert again.queued == 3  # the unacked deliveries

    frames = old.frames_until_closed(timeout=3)
    assert len(frames) == 1, frames
    assert_error(frames[0], "taken_over", None)

    redelivered = new.recv_many(3)
    assert redelivered == [
        Deliver(topic="t", seq=1, payload=b"m1", redelivered=True),
        Deliver(topic="t", seq=2, payload=b"m2", redelivered=True),
        Deliver(topic="t", seq=3, payload=b"m3", redelivered=True),
    ]
    publish_confirmed(publisher, "t", [b"m4"])
    assert new.recv() == Deliver(topic="t", seq=4, payload=b"m4")
    assert new.sync() == []


# --- expiry -----------------------------------------------------------------------------------


def test_session_expires_after_session_expiry(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(session_expiry=0.5)
    owner = dial(broker)
    reg = registered(owner.register("dev"))
    subscribe(owner, "t")
    owner.close()
    dropped_at = time.monotonic()

    # Polled with a fresh register, which (unlike a resume) does not revive the session:
    # `conflict` while the session lingers, `registered` once it has expired.
    attempts = 0
    while True:
        probe = dial(broker)
        probe.send(Register(req=1, client_id="dev", username="alice", password="secret"))
        answer = probe.recv()
        attempts += 1
        if isinstance(answer, Registered):
            break
        assert_error(answer, "conflict", 1)
        probe.close()
        assert time.monotonic() - dropped_at < 5, "the session never expired"
        time.sleep(0.2)
    waited = time.monotonic() - dropped_at
    assert attempts > 1, "the session did not linger at all"
    assert waited >= 0.45, f"expired after {waited:.2f}s, expiry is 0.5s"
    assert answer.resumed is False
    assert answer.queued == 0

    # The expired session's token is dead.
    late = dial(broker)
    late.send(resume_frame(2, "dev", reg))
    assert_error(late.recv(), "unknown_session", 2)
    # Its subscription was removed with it: the fresh session receives nothing on "t".
    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"x"])
    assert probe.sync() == []


def test_resume_within_expiry_then_expiry_after_second_drop(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(session_expiry=0.5)
    first = dial(broker)
    reg = registered(first.register("dev"))
    first.close()
    wait_connected(broker, 0)
    second = dial(broker)
    second.send(resume_frame(1, "dev", reg))
    reg2 = registered(second.recv())
    assert reg2.resumed is True
    # Connected for longer than the expiry: a connected session never expires.
    time.sleep(0.7)
    assert second.sync() == []
    second.close()
    deadline = time.monotonic() + 5
    while True:
        probe = dial(broker)
        probe.send(resume_frame(2, "dev", reg2))
        answer = probe.recv()
        if isinstance(answer, Error):
            assert_error(answer, "unknown_session", 2)
            break
        # Resumed before it expired: drop again and wait past the expiry before retrying.
        reg2 = registered(answer)
        probe.close()
        assert time.monotonic() < deadline, "the session never expired"
        time.sleep(0.7)
    # After expiry, a fresh register for the client_id needs no takeover.
    fresh = dial(broker)
    assert registered(fresh.register("dev")).resumed is False


# --- unregister -------------------------------------------------------------------------------


def test_unregister_answers_ok_closes_and_ends_session(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    reg = registered(client.register("dev"))
    subscribe(client, "t")
    client.send(Unregister(req=42))
    frames = client.frames_until_closed(timeout=3)
    assert frames == [Ok(req=42)]

    probe = dial(broker)
    probe.send(resume_frame(1, "dev", reg))
    assert_error(probe.recv(), "unknown_session", 1)
    # No takeover needed: the client_id is free again, on the same connection.
    fresh = registered(probe.register("dev"))
    assert fresh.resumed is False
    assert fresh.session_id != reg.session_id
    assert fresh.queued == 0
    # The old subscription is gone.
    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"x"])
    assert probe.sync() == []


def test_unregister_discards_queued_messages(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev"))
    subscribe(client, "t")
    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"a", b"b"])
    assert len(client.recv_many(2)) == 2
    client.send(Unregister(req=9))
    frames = client.frames_until_closed(timeout=3)
    assert frames == [Ok(req=9)]
    again = registered(dial(broker).register("dev"))
    assert again.queued == 0
    assert again.dropped == 0


# --- keepalive --------------------------------------------------------------------------------


def test_keepalive_silence_closes_connection(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev", keepalive=1))
    start = time.monotonic()
    frames = client.frames_until_closed(timeout=4)
    elapsed = time.monotonic() - start
    assert 1.2 <= elapsed <= 3.0, f"closed after {elapsed:.2f}s, expected about 1.5s"
    assert len(frames) <= 1, frames
    if frames:
        assert_error(frames[0], "timeout", None)


def test_pings_keep_connection_alive(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev", keepalive=1))
    start = time.monotonic()
    req = 100
    while time.monotonic() - start < 2.2:
        time.sleep(0.5)
        req += 1
        client.send(Ping(req=req, status="healthy", details={"load": 0.1}))
        assert client.recv() == Pong(req=req)
    # Ping without req: answered with a pong without req.
    client.send(Ping())
    assert client.recv() == Pong()
    assert client.sync() == []


def test_any_frame_counts_as_keepalive_traffic(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev", keepalive=1))
    start = time.monotonic()
    while time.monotonic() - start < 2.2:
        time.sleep(0.5)
        client.send(Publish(topic="nobody-listens", payload=b"."))
    assert client.sync() == []


def test_session_lingers_after_keepalive_close(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    reg = registered(client.register("dev", keepalive=1))
    subscribe(client, "t")
    client.frames_until_closed(timeout=4)
    wait_connected(broker, 0)

    publisher = dial(broker)
    registered(publisher.register("pub"))
    publish_confirmed(publisher, "t", [b"while-away"])

    back = dial(broker)
    back.send(resume_frame(1, "dev", reg))
    again = registered(back.recv())
    assert again.resumed is True
    assert again.keepalive == 30  # the resume's own (default) keepalive is in force
    assert again.queued == 1
    assert back.recv() == Deliver(topic="t", seq=1, payload=b"while-away")


# --- registration timeout ---------------------------------------------------------------------


def test_registration_timeout_closes_silent_connection(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(register_timeout=0.5)
    client = dial(broker)
    start = time.monotonic()
    frames = client.frames_until_closed(timeout=4)
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed <= 2.5, f"closed after {elapsed:.2f}s, expected about 0.5s"
    assert len(frames) <= 1, frames
    if frames:
        assert_error(frames[0], "timeout", None)


def test_registration_timeout_stops_at_register(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(register_timeout=0.5)
    client = dial(broker)
    registered(client.register("dev"))  # keepalive 30
    time.sleep(1.0)  # twice the registration timeout
    assert client.sync() == []


def test_unregistered_chatter_does_not_extend_registration_timeout(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    """Frames other than `register` do not register: the connection still times out."""
    broker = start_broker(register_timeout=0.5)
    client = dial(broker)
    start = time.monotonic()
    frames = []
    try:
        while time.monotonic() - start < 3:
            client.send(Ping(req=1))
            frames.append(client.recv(1))
            time.sleep(0.1)
    except (Closed, ConnectionResetError, BrokenPipeError):
        pass
    else:
        pytest.fail("a connection that never registered stayed open for 3s")
    assert all(isinstance(f, Error) for f in frames), frames
