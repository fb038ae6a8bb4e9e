"""Integration tests over real TCP: bad input of every kind, authentication failures, unknown
sessions, and clients that crash. Fatal errors (`bad_frame`, `frame_too_large`) close the
connection; every other error leaves it usable, which each test checks by using it."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.helpers import (
    Dial,
    assert_error,
    registered,
)
from tests.wire import WireClient
from tether.broker.config import BrokerConfig
from tether.broker.server import Broker
from tether.broker.users import UserStore, add_user
from tether.protocol import (
    Deliver,
    Error,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Subscribe,
    encode,
)


def prefixed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def assert_usable(client: WireClient) -> None:
    """A registered connection still answers in order."""
    client.send(Ping(req=999))
    assert client.recv() == Pong(req=999)


def assert_broker_serves(broker: Broker, dial: Dial, tag: str) -> None:
    """Other clients can still register, subscribe, publish and receive."""
    sub = dial(broker)
    registered(sub.register(f"sub-{tag}"))
    sub.send(Subscribe(req=1, topic=f"t-{tag}"))
    assert sub.recv() == Ok(req=1)
    pub = dial(broker)
    registered(pub.register(f"pub-{tag}"))
    pub.send(Publish(topic=f"t-{tag}", payload=b"still here", req=2))
    assert pub.recv() == Ok(req=2)
    assert sub.recv() == Deliver(topic=f"t-{tag}", seq=1, payload=b"still here")


# --- bad_request: well-formed but wrong, the connection stays usable ---------------------------

BAD_REQUESTS: dict[str, dict[str, Any]] = {
    "unknown type": {"type": "frobnicate"},
    "str payload": {"type": "publish", "topic": "t", "payload": "not bytes"},
    "publish to $ topic": {"type": "publish", "topic": "$sys", "payload": b"x"},
    "publish without payload": {"type": "publish", "topic": "t"},
    "int topic": {"type": "publish", "topic": 7, "payload": b"x"},
    "subscribe without topic": {"type": "subscribe"},
    "empty topic": {"type": "subscribe", "topic": ""},
    "topic of 257 chars": {"type": "subscribe", "topic": "x" * 257},
    "unsubscribe without topic": {"type": "unsubscribe"},
    "bad health status": {"type": "ping", "status": "fine"},
    "register once registered": {
        "type": "register",
        "client_id": "again",
        "username": "alice",
        "password": "secret",
    },
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_after_register(broker: Broker, dial: Dial, body: dict[str, Any]) -> None:
    client = dial(broker)
    registered(client.register("dev"))
    client.send_map({**body, "req": 41})
    assert_error(client.recv(), "bad_request", 41)
    assert_usable(client)


def test_bad_request_without_req_has_no_req(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev"))
    client.send_map({"type": "ack", "topic": "t", "seq": -1})
    assert_error(client.recv(), "bad_request", None)
    client.send_map({"type": "publish", "topic": "$sys", "payload": b"x"})
    assert_error(client.recv(), "bad_request", None)
    assert_usable(client)


def test_bad_requests_in_one_write_are_answered_in_order(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev"))
    client.sock.sendall(
        encode(Ping(req=1))
        + prefixed(msgpack.packb({"type": "nope", "req": 2}))
        + encode(Publish(topic="t", payload=b"x", req=3))
        + prefixed(msgpack.packb({"type": "publish", "topic": "$x", "payload": b"", "req": 4}))
        + encode(Ping(req=5))
    )
    frames = client.recv_many(5)
    assert frames[0] == Pong(req=1)
    assert_error(frames[1], "bad_request", 2)
    assert frames[2] == Ok(req=3)
    assert_error(frames[3], "bad_request", 4)
    assert frames[4] == Pong(req=5)


BAD_REGISTERS: dict[str, dict[str, Any]] = {
    "keepalive 0": {"keepalive": 0},
    "keepalive negative": {"keepalive": -5},
    "keepalive str": {"keepalive": "30"},
    "empty client_id": {"client_id": ""},
    "client_id of 129 chars": {"client_id": "c" * 129},
    "no username": {"username": None},
    "token without session_id": {"resume_token": "abc"},
    "takeover not bool": {"takeover": "yes"},
    "metadata not a map": {"metadata": ["a"]},
}


@pytest.mark.parametrize("change", BAD_REGISTERS.values(), ids=BAD_REGISTERS.keys())
def test_bad_register_is_bad_request_and_connection_stays_usable(
    broker: Broker, dial: Dial, change: dict[str, Any]
) -> None:
    client = dial(broker)
    body: dict[str, Any] = {
        "type": "register",
        "req": 3,
        "client_id": "dev",
        "username": "alice",
        "password": "secret",
    }
    body.update(change)
    client.send_map({k: v for k, v in body.items() if v is not None})
    assert_error(client.recv(), "bad_request", 3)
    # Not registered by that: the next request is refused as unregistered...
    client.send(Ping(req=4))
    assert_error(client.recv(), "not_registered", 4)
    # ...and a correct register on the same connection works.
    assert registered(client.register("dev")).req == client._req


def test_client_id_of_128_chars_and_unknown_keys_are_accepted(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send_map(
        {
            "type": "register",
            "req": 1,
            "client_id": "c" * 128,
            "username": "alice",
            "password": "secret",
            "from_the_future": {"x": [1, 2]},
        }
    )
    assert registered(client.recv()).req == 1
    client.send_map({"type": "subscribe", "req": 2, "topic": "t", "extra": 1})
    assert client.recv() == Ok(req=2)
    client.send_map({"type": "publish", "topic": "t", "payload": b"p", "req": 3, "qos": 9})
    frames = client.recv_many(2)
    assert Ok(req=3) in frames
    assert Deliver(topic="t", seq=1, payload=b"p") in frames


def test_topic_length_counts_characters(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev"))
    topic = "é" * 256  # 256 characters, 512 bytes
    client.send(Subscribe(req=1, topic=topic))
    assert client.recv() == Ok(req=1)
    client.send(Publish(topic=topic, payload=b"x", req=2))
    frames = client.recv_many(2)
    assert Ok(req=2) in frames
    assert Deliver(topic=topic, seq=1, payload=b"x") in frames
    client.send_map({"type": "subscribe", "req": 3, "topic": "é" * 257})
    assert_error(client.recv(), "bad_request", 3)


# --- fatal framing errors: error without req, then close ---------------------------------------

GARBAGE: dict[str, bytes] = {
    "not msgpack": prefixed(b"\xc1\xc1\xc1\xc1"),
    "a list, not a map": prefixed(msgpack.packb(["type", "ping"])),
    "a string": prefixed(msgpack.packb("ping")),
    "int keys": prefixed(msgpack.packb({1: "ping"})),
    "no type": prefixed(msgpack.packb({"req": 1})),
    "int type": prefixed(msgpack.packb({"type": 1, "req": 1})),
    "trailing bytes": prefixed(msgpack.packb({"type": "ping", "req": 1}) + b"\x00"),
    "truncated body": prefixed(msgpack.packb({"type": "ping", "req": 1})[:-1]),
    "invalid utf-8": prefixed(b"\x82\xa4type\xa4ping\xa3req\xa4\xff\xfe\xfd\xfc"),
    "zero length": b"\x00\x00\x00\x00",
}


@pytest.mark.parametrize("registered_first", [False, True], ids=["unregistered", "registered"])
@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_bad_frame_and_closes(
    broker: Broker, dial: Dial, data: bytes, registered_first: bool
) -> None:
    client = dial(broker)
    if registered_first:
        registered(client.register("dev"))
    client.send_raw(data)
    frames = client.frames_until_closed(timeout=3)
    assert len(frames) == 1, frames
    assert_error(frames[0], "bad_frame", None)
    assert_broker_serves(broker, dial, "after")


def test_frames_before_garbage_are_answered(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("dev"))
    client.send_raw(encode(Ping(req=1)) + encode(Ping(req=2)) + prefixed(b"\xc1"))
    frames = client.frames_until_closed(timeout=3)
    assert frames[:2] == [Pong(req=1), Pong(req=2)]
    assert len(frames) == 3, frames
    assert_error(frames[2], "bad_frame", None)


@pytest.mark.parametrize("registered_first", [False, True], ids=["unregistered", "registered"])
def test_oversized_frame_is_refused_from_its_prefix(
    start_broker: Callable[..., Broker], dial: Dial, registered_first: bool
) -> None:
    broker = start_broker(max_frame=1024)
    client = dial(broker)
    if registered_first:
        registered(client.register("dev"))
    client.send_raw(struct.pack(">I", 1025))  # the prefix alone: the body never comes
    frames = client.frames_until_closed(timeout=3)
    assert len(frames) == 1, frames
    assert_error(frames[0], "frame_too_large", None)
    assert_broker_serves(broker, dial, "after")


def test_frame_of_exactly_max_frame_is_accepted(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(max_frame=1024)
    client = dial(broker)
    registered(client.register("dev"))
    client.send(Subscribe(req=1, topic="big"))
    assert client.recv() == Ok(req=1)
    base = {"type": "publish", "topic": "big", "payload": b"", "req": 2}
    overhead = len(msgpack.packb(base, use_bin_type=True))
    payload = b"p" * (1024 - overhead - 1)  # b"" has a 2-byte bin 8 header, ~1 KiB a 3-byte one
    body = msgpack.packb({**base, "payload": payload}, use_bin_type=True)
    assert len(body) == 1024
    client.send_raw(prefixed(body))
    frames = client.recv_many(2)
    assert Ok(req=2) in frames
    # The delivery may exceed max_frame by its header; the client accepts it.
    assert Deliver(topic="big", seq=1, payload=payload) in frames


def test_http_request_is_refused(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    frames = client.frames_until_closed(timeout=3)
    assert len(frames) == 1, frames
    assert isinstance(frames[0], Error) and frames[0].req is None
    assert frames[0].code in ("frame_too_large", "bad_frame")


# --- clients that crash ---------------------------------------------------------------------


def test_client_crash_mid_frame_does_not_affect_others(broker: Broker, dial: Dial) -> None:
    sub = dial(broker)
    registered(sub.register("sub"))
    sub.send(Subscribe(req=1, topic="t"))
    assert sub.recv() == Ok(req=1)
    pub = dial(broker)
    registered(pub.register("pub"))

    half = encode(Publish(topic="t", payload=b"z" * 200, req=9))
    # A registered client dies half-way through a frame.
    crasher = dial(broker)
    crash_reg = registered(crasher.register("crasher"))
    crasher.send_raw(half[: len(half) // 2])
    crasher.close()
    # An unregistered one too, half-way through its register.
    early = dial(broker)
    early.send_raw(encode(Register(req=1, client_id="x", username="alice", password="s"))[:10])
    early.close()
    # And one that resets the connection.
    resetter = dial(broker)
    registered(resetter.register("resetter"))
    resetter.send_raw(half[:7])
    resetter.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    resetter.close()

    pub.send(Publish(topic="t", payload=b"after", req=2))
    assert pub.recv() == Ok(req=2)
    assert sub.recv() == Deliver(topic="t", seq=1, payload=b"after")
    assert sub.sync() == []  # the half publish was never delivered
    assert_broker_serves(broker, dial, "crash")
    # The crashed client's session lingers like any dropped one.
    back = dial(broker)
    back.send(
        Register(
            req=1,
            client_id="crasher",
            username="alice",
            session_id=crash_reg.session_id,
            resume_token=crash_reg.resume_token,
        )
    )
    assert registered(back.recv()).resumed is True


# --- authentication ---------------------------------------------------------------------------


def test_wrong_password_and_unknown_user_look_the_same(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send(Register(req=1, client_id="dev", username="alice", password="wrong"))
    wrong = assert_error(client.recv(), "auth_failed", 1)
    client.send(Register(req=2, client_id="dev", username="mallory", password="secret"))
    unknown = assert_error(client.recv(), "auth_failed", 2)
    assert wrong.message == unknown.message
    # The connection is usable: the right password now succeeds on it.
    client.send(Register(req=3, client_id="dev", username="alice", password="secret"))
    reg = registered(client.recv())
    assert reg.req == 3
    assert reg.resumed is False
    assert_usable(client)


def test_the_log_tells_unknown_user_from_wrong_password(
    broker: Broker, dial: Dial, caplog: pytest.LogCaptureFixture
) -> None:
    """The wire answer is the same for both; the operator's log says which it was."""
    caplog.set_level(logging.INFO)
    client = dial(broker)
    client.send(Register(req=1, client_id="dev", username="alice", password="wrong"))
    assert_error(client.recv(), "auth_failed", 1)
    client.send(Register(req=2, client_id="dev", username="mallory", password="secret"))
    assert_error(client.recv(), "auth_failed", 2)
    # Logged on the broker's thread before it answered, so both lines are there now.
    lines = [r.getMessage() for r in caplog.records if "'auth_failed'" in r.getMessage()]
    assert len(lines) == 2
    assert "username='alice'" in lines[0] and "reason='wrong_password'" in lines[0]
    assert "username='mallory'" in lines[1] and "reason='unknown_user'" in lines[1]


def test_password_of_another_user_fails(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send(Register(req=1, client_id="dev", username="bob", password="secret"))
    assert_error(client.recv(), "auth_failed", 1)
    assert registered(client.register("dev", "bob", "hunter2")).resumed is False


def test_long_passwords_are_not_truncated(tmp_path: Path, dial: Dial) -> None:
    users = tmp_path / "users.json"
    long_password = "p" * 72 + "A"
    add_user(users, "longpw", long_password, cost=4)
    broker = Broker(
        BrokerConfig(port=0, users_path=users, data_dir=None), users=UserStore.load(users)
    )
    broker.start()
    try:
        client = dial(broker)
        # Same first 72 bytes, different tail: must not verify.
        client.send(Register(req=1, client_id="dev", username="longpw", password="p" * 72 + "B"))
        assert_error(client.recv(), "auth_failed", 1)
        # A long password (within --max-register-bytes) neither crashes nor verifies.
        client.send(Register(req=2, client_id="dev", username="longpw", password="p" * 60_000))
        assert_error(client.recv(), "auth_failed", 2)
        client.send(Register(req=3, client_id="dev", username="longpw", password=long_password))
        assert registered(client.recv()).req == 3
        # One beyond the register limit (64 KiB by default) is frame_too_large, fatal.
        other = dial(broker)
        other.send(Register(req=4, client_id="dev2", username="longpw", password="p" * 100_000))
        assert_error(other.recv(), "frame_too_large", None)
    finally:
        broker.stop()


def test_repeated_auth_failures_are_rate_limited(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(auth_fail_limit=3)
    # A session made before the failures, to resume afterwards.
    owner = dial(broker)
    reg = registered(owner.register("dev"))
    owner.close()

    client = dial(broker)
    client.send(Register(req=1, client_id="x", username="alice", password="bad"))
    assert_error(client.recv(), "auth_failed", 1)
    client.send(Register(req=2, client_id="x", username="nobody", password="bad"))
    assert_error(client.recv(), "auth_failed", 2)
    other = dial(broker)  # the limit is per address, not per connection
    other.send(Register(req=3, client_id="x", username="alice", password="bad"))
    assert_error(other.recv(), "auth_failed", 3)
    client.send(Register(req=4, client_id="x", username="alice", password="bad"))
    assert_error(client.recv(timeout=5), "rate_limited", 4)  # may come after a penalty delay
    # Still a usable (unregistered) connection.
    client.send(Ping(req=5))
    assert_error(client.recv(), "not_registered", 5)
    # A resume costs no password check and is not throttled.
    client.send(
        Register(
            req=6,
            client_id="dev",
            username="alice",
            session_id=reg.session_id,
            resume_token=reg.resume_token,
        )
    )
    assert registered(client.recv()).resumed is True
    # Successful logins are never throttled: the right password still gets in.
    other.send(Register(req=7, client_id="y", username="alice", password="secret"))
    assert registered(other.recv(timeout=5)).req == 7


# --- unknown session --------------------------------------------------------------------------


def test_unknown_session_then_register_afresh(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send(
        Register(
            req=7,
            client_id="dev",
            username="alice",
            session_id="no-such-session",
            resume_token="made-up",
        )
    )
    assert_error(client.recv(), "unknown_session", 7)
    client.send(Ping(req=8))
    assert_error(client.recv(), "not_registered", 8)
    client.send(Register(req=9, client_id="dev", username="alice", password="secret"))
    reg = registered(client.recv())
    assert reg.req == 9
    assert reg.resumed is False
    assert reg.session_id != "no-such-session"
    assert_usable(client)


def test_resume_of_unknown_session_needs_no_valid_password(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send(
        Register(
            req=1,
            client_id="dev",
            username="nobody",
            password="whatever",
            session_id="nope",
            resume_token="nope",
        )
    )
    assert_error(client.recv(), "unknown_session", 1)
    assert registered(client.register("dev")).resumed is False
