"""Helpers shared by the integration tests: short, asserting steps over a WireClient."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.wire import WireClient, wait_for
from tether.broker.config import BrokerConfig
from tether.broker.server import Broker
from tether.broker.users import UserStore
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


@contextlib.contextmanager
def broker_factory(users_path: Path, *, watched: bool = False) -> Iterator[Callable[..., Broker]]:
    """Start brokers on a free port, in memory unless a test asks for a data directory (then
    its own, under tmp_path: nothing is written to the working directory), all stopped at the
    end. `watched`: each loads `users_path` itself and watches it, as `tether serve` does (a
    reload, SIGHUP's, is `broker.reload_users()`); else it gets the users as they are now."""
    started: list[Broker] = []

    def start(**overrides: Any) -> Broker:
        config = replace(BrokerConfig(port=0, users_path=users_path, data_dir=None), **overrides)
        broker = Broker(config) if watched else Broker(config, users=UserStore.load(users_path))
        broker.start()
        started.append(broker)
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()
