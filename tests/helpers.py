"""Helpers shared by the integration tests: short, asserting steps over a WireClient."""

from __future__ import annotations

from collections.abc import Callable

from tests.wire import WireClient, wait_for
from tether.broker.server import Broker
from tether.protocol import (
    Ack,
    BrokerFrame,
    Deliver,
    Error,
    Ok,
    Publish,
    Register,
    Registered,
    Subscribe,
)

Dial = Callable[[Broker], WireClient]


def wait_connected(broker: Broker, count: int) -> None:
    """Until the broker has seen the closes: exactly `count` sessions hold a connection."""
    wait_for(lambda: broker.stats()["connected"] == count)


def registered(frame: object) -> Registered:
    assert isinstance(frame, Registered), frame
    return frame


def assert_error(frame: object, code: str, req: int | None) -> Error:
    assert isinstance(frame, Error), frame
    assert frame.code == code, frame
    assert frame.req == req, frame
    assert frame.message, frame
    return frame


def delivers(frames: list[BrokerFrame]) -> list[Deliver]:
    assert all(isinstance(f, Deliver) for f in frames), frames
    return frames  # type: ignore[return-value]


def resume_frame(req: int, client_id: str, reg: Registered, username: str = "alice") -> Register:
    return Register(
        req=req,
        client_id=client_id,
        username=username,
        session_id=reg.session_id,
        resume_token=reg.resume_token,
    )


def subscribe(client: WireClient, topic: str) -> None:
    req = client.next_req()
    client.send(Subscribe(req=req, topic=topic))
    assert client.recv() == Ok(req=req)


def publish_confirmed(client: WireClient, topic: str, payloads: list[bytes]) -> None:
    """Publish all in one write, the last with a req, and wait for its confirm."""
    req = client.next_req()
    frames = [Publish(topic=topic, payload=p) for p in payloads[:-1]]
    frames.append(Publish(topic=topic, payload=payloads[-1], req=req))
    client.send(*frames)
    assert client.recv() == Ok(req=req)


def recv_acking(client: WireClient, n: int) -> list[Deliver]:
    """Receive `n` deliveries, acking each as it comes, as a client library would."""
    got: list[Deliver] = []
    while len(got) < n:
        frame = client.recv()
        assert isinstance(frame, Deliver), frame
        got.append(frame)
        client.send(Ack(topic=frame.topic, seq=frame.seq))
    return got


def ack(client: WireClient, topic: str, seq: int) -> None:
    """Ack, and wait until the broker has handled it (answers come in order)."""
    client.send(Ack(topic=topic, seq=seq))
    assert client.sync() == []
