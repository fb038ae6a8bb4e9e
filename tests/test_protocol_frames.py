"""Tests for protocol.frames and protocol.errors: validation, to_wire/from_wire, errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tether import protocol
from tether.protocol import (
    BROKER_FRAME_TYPES,
    CLIENT_FRAME_TYPES,
    FATAL_CODES,
    FRAME_TYPES,
    NEED_DATA,
    Ack,
    BadFrame,
    BadRequest,
    Deliver,
    Dropped,
    Error,
    ErrorCode,
    FrameTooLarge,
    LocalProtocolError,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    Register,
    Registered,
    RemoteProtocolError,
    Subscribe,
    Unregister,
    Unsubscribe,
    from_wire,
    to_wire,
)

REGISTER: dict[str, Any] = {"req": 1, "client_id": "c", "username": "u", "password": "p"}


def test_frame_type_strings() -> None:
    assert {name: cls.type for name, cls in FRAME_TYPES.items()} == {
        name: name for name in FRAME_TYPES
    }
    assert set(CLIENT_FRAME_TYPES) == {
        "register", "subscribe", "unsubscribe", "publish", "ack", "ping", "unregister", "stats"
    }  # fmt: skip
    assert set(BROKER_FRAME_TYPES) == {
        "registered", "ok", "pong", "deliver", "dropped", "error", "stats_result"
    }  # fmt: skip
    assert dict(FRAME_TYPES) == {**CLIENT_FRAME_TYPES, **BROKER_FRAME_TYPES}


def test_frames_are_frozen_kw_only_slotted() -> None:
    frame = Ok(req=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.req = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Ok(1)  # type: ignore[misc]
    assert not hasattr(frame, "__dict__")


def test_defaults() -> None:
    r = Register(**REGISTER)
    assert (r.keepalive, r.metadata, r.takeover) == (30, {}, False)
    assert (r.session_id, r.resume_token) == (None, None)
    assert Register(**REGISTER).metadata is not r.metadata
    assert Deliver(topic="t", seq=1, payload=b"").redelivered is False
    assert Error(code="x", message="y").req is None
    assert (Ping().req, Ping().status, Ping().details) == (None, None, None)


INVALID: list[tuple[type[Any], dict[str, Any], str]] = [
    (Register, {**REGISTER, "req": True}, "req"),
    (Register, {**REGISTER, "client_id": ""}, "client_id"),
    (Register, {**REGISTER, "client_id": "c" * 129}, "client_id"),
    (Register, {**REGISTER, "keepalive": 0}, "keepalive"),
    (Register, {**REGISTER, "keepalive": 65536}, "keepalive"),
    (Register, {**REGISTER, "keepalive": 30.0}, "keepalive"),
    (Register, {**REGISTER, "metadata": []}, "metadata"),
    (Register, {**REGISTER, "takeover": 1}, "takeover"),
    (Register, {**REGISTER, "session_id": "s"}, "resume_token"),
    (Register, {**REGISTER, "resume_token": "t"}, "session_id"),
    (Register, {**REGISTER, "username": b"u"}, "username"),
    (Subscribe, {"req": 1, "topic": "a" * 257}, "topic"),
    (Subscribe, {"req": 1, "topic": ""}, "topic"),
    (Unsubscribe, {"req": None, "topic": "a"}, "req"),
    (Publish, {"topic": "$sys", "payload": b""}, "topic"),
    (Publish, {"topic": "a", "payload": "x"}, "payload"),
    (Publish, {"topic": "a", "payload": b"", "req": False}, "req"),
    (Publish, {"topic": "a", "payload": b"", "req": 1 << 64}, "req"),
    (Ack, {"topic": "a", "seq": -1}, "seq"),
    (Ping, {"status": "fine"}, "status"),
    (Ping, {"status": 1}, "status"),
    (Ping, {"details": "x"}, "details"),
    (Unregister, {"req": "1"}, "req"),
    (Registered, {"req": 1, "session_id": "s", "resume_token": "t", "resumed": 0,
                  "keepalive": 30, "expiry": 0, "queued": 0, "dropped": 0}, "resumed"),
    (Registered, {"req": 1, "session_id": "s", "resume_token": "t", "resumed": False,
                  "keepalive": 30, "expiry": 0, "queued": -1, "dropped": 0}, "queued"),
    (Ok, {"req": 1.0}, "req"),
    (Pong, {"req": "x"}, "req"),
    (Deliver, {"topic": "a", "seq": 0, "payload": b""}, "seq"),
    (Deliver, {"topic": "a", "seq": 1, "payload": bytearray()}, "payload"),
    (Deliver, {"topic": "a", "seq": 1, "payload": b"", "redelivered": None}, "redelivered"),
    (Dropped, {"topic": "a", "count": -1}, "count"),
    (Error, {"code": None, "message": "m"}, "code"),
    (Error, {"code": "c", "message": b"m"}, "message"),
]  # fmt: skip


@pytest.mark.parametrize("cls,kwargs,field", INVALID)
def test_invalid_construction_raises_local_error(
    cls: type[Any], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        cls(**kwargs)
    assert info.value.field == field
    assert info.value.frame_type == cls.type
    assert isinstance(info.value, ValueError)


def test_valid_edge_values() -> None:
    Register(**{**REGISTER, "client_id": "é" * 128, "keepalive": 65535})
    Register(req=1, client_id="c", username="u", session_id="s", resume_token="t")
    Subscribe(req=-5, topic="ü" * 256)
    Publish(topic="a$", payload=b"")
    Deliver(topic="$sys/broker", seq=1, payload=b"")  # the broker may deliver on $ topics
    Ack(topic="a", seq=0)
    Ping(status="degraded", details={"load": 0.9})
    Error(code=ErrorCode.AUTH_FAILED, message="")


def test_to_wire_order_and_omission() -> None:
    assert list(to_wire(Publish(topic="a", payload=b"x", req=1))) == [
        "type", "topic", "payload", "req"
    ]  # fmt: skip
    assert to_wire(Error(req=None, code="c", message="m")) == {
        "type": "error",
        "code": "c",
        "message": "m",
    }
    assert "redelivered" not in to_wire(Deliver(topic="a", seq=1, payload=b""))
    assert to_wire(Deliver(topic="a", seq=1, payload=b"", redelivered=True))["redelivered"] is True
    resume = Register(req=1, client_id="c", username="u", session_id="s", resume_token="t")
    assert "password" not in to_wire(resume)
    assert to_wire(Pong()) == {"type": "pong"}


def test_to_wire_rejects_non_frames() -> None:
    with pytest.raises(TypeError):
        to_wire({"type": "ok"})  # type: ignore[arg-type]


def test_from_wire_round_trip_and_errors() -> None:
    frame = Registered(
        req=3,
        session_id="s",
        resume_token="t",
        resumed=True,
        keepalive=60,
        expiry=3600,
        queued=2,
        dropped=1,
    )
    assert from_wire(to_wire(frame), accept=BROKER_FRAME_TYPES) == frame
    with pytest.raises(BadRequest) as info:
        from_wire(to_wire(frame), accept=CLIENT_FRAME_TYPES)
    assert (info.value.req, info.value.field) == (3, "type")
    with pytest.raises(BadRequest) as info:
        from_wire({"type": "ok", "req": "7"}, accept=FRAME_TYPES)
    assert (info.value.req, info.value.frame_type, info.value.field) == (None, "ok", "req")
    with pytest.raises(BadRequest) as info:
        from_wire({"type": "deliver", "topic": "a", "payload": b""}, accept=FRAME_TYPES)
    assert info.value.field == "seq"


def test_from_wire_resume_rules() -> None:
    base = {"type": "register", "req": 4, "client_id": "c", "username": "u"}
    # No password is a valid frame (a client certificate may log it in): the broker decides.
    fresh = from_wire(base, accept=CLIENT_FRAME_TYPES)
    assert isinstance(fresh, Register) and fresh.password is None and fresh.session_id is None
    with pytest.raises(BadRequest) as info:
        from_wire({**base, "session_id": "s"}, accept=CLIENT_FRAME_TYPES)
    assert info.value.field == "resume_token"
    frame = from_wire({**base, "session_id": "s", "resume_token": "t"}, accept=CLIENT_FRAME_TYPES)
    assert isinstance(frame, Register) and frame.password is None


# --- errors --------------------------------------------------------------------------------


def test_error_codes() -> None:
    assert ErrorCode.BAD_FRAME == "bad_frame"
    assert {c.value for c in ErrorCode} == {
        "bad_frame", "frame_too_large", "bad_request", "not_registered", "auth_failed",
        "unknown_session", "conflict", "taken_over", "rate_limited", "timeout", "internal",
        "unavailable", "session_ended", "not_authorized", "quota_exceeded",
    }  # fmt: skip
    fatal = {
        ErrorCode.BAD_FRAME,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.TAKEN_OVER,
        ErrorCode.TIMEOUT,
        ErrorCode.SESSION_ENDED,
    }
    assert fatal == FATAL_CODES


def test_exception_hierarchy_and_attributes() -> None:
    e = RemoteProtocolError("gone", code=ErrorCode.TAKEN_OVER, req=3)
    assert (str(e), e.message, e.req, e.fatal) == ("gone", "gone", 3, True)
    assert not RemoteProtocolError("x", code=ErrorCode.AUTH_FAILED).fatal

    bf = BadFrame("junk")
    assert (bf.code, bf.req, bf.fatal, str(bf)) == (ErrorCode.BAD_FRAME, None, True, "junk")

    big = FrameTooLarge(size=10, limit=5)
    assert (big.code, big.size, big.limit, big.fatal) == (ErrorCode.FRAME_TOO_LARGE, 10, 5, True)
    assert "10" in str(big) and "5" in str(big)

    br = BadRequest("nope", req=2, frame_type="ok", field="req")
    assert (br.code, br.req, br.frame_type, br.field, br.fatal) == (
        ErrorCode.BAD_REQUEST, 2, "ok", "req", False
    )  # fmt: skip

    for exc in (bf, big, br):
        assert isinstance(exc, RemoteProtocolError) and isinstance(exc, ProtocolError)
    local = LocalProtocolError("bad", frame_type="ok", field="req")
    assert isinstance(local, ValueError) and isinstance(local, ProtocolError)
    assert (local.frame_type, local.field) == ("ok", "req")


def test_error_frame_from_exception() -> None:
    exc = BadRequest("bad topic", req=5)
    frame = Error(req=exc.req, code=exc.code, message=exc.message)
    assert to_wire(frame) == {
        "type": "error",
        "req": 5,
        "code": "bad_request",
        "message": "bad topic",
    }


def test_public_api() -> None:
    assert sorted(protocol.__all__) == sorted(set(protocol.__all__))
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    assert repr(NEED_DATA) == "NEED_DATA"
