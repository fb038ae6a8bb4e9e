"""Issue 9, items 3, 4 and 7, against real brokers: connecting, and the errors and notices of
a client whose broker is wrong, refuses it, or goes away.

- The first `connect` fails at once when the connection is refused or the host unknown; a
  client that had a session keeps retrying through an outage.
- `on_disconnected` and `on_reconnected` run once per transition, not per failed attempt.
- A `rate_limited` login says what the broker said; so does a connect that times out after the
  broker refused it; `auth_failed` no longer sends the user to `tether user add`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_client_chaos import FAST, ChaosProxy, proxy_to, wait_until
from tether.broker.server import Broker
from tether.client import (
    AsyncClient,
    AuthFailed,
    Client,
    ConnectionFailed,
    Disconnected,
    Reconnected,
    Rejected,
)
from tether.protocol import NEED_DATA, Error, FrameDecoder, Register, Registered, encode


def client(address: tuple[str, int], client_id: str, **kw: Any) -> Client:
    host, port = address
    options: dict[str, Any] = {"username": "alice", "password": "secret", **FAST, **kw}
    return Client(client_id=client_id, host=host, port=port, **options)


def free_port() -> int:
    """A port nothing listens on (bound, then released: connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- item 7: fail fast on the first connect -----------------------------------------------


def test_a_refused_first_connect_fails_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        client(("127.0.0.1", free_port()), "early", connect_timeout=30).connect()
    assert time.monotonic() - started < 3, "waited for connect_timeout"
    assert "refused" in str(info.value) and "check that the broker runs" in str(info.value)


def test_an_unknown_host_fails_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionFailed, match=r"nonexistent\.invalid") as info:
        client(("nonexistent.invalid", 7878), "lost", connect_timeout=30).connect()
    assert time.monotonic() - started < 10  # one name lookup, not connect_timeout
    assert "host name" in str(info.value)


def test_the_async_client_fails_at_once_too() -> None:
    async def main() -> None:
        c = AsyncClient(
            client_id="early", username="alice", password="secret", port=free_port(), **FAST
        )
        with pytest.raises(ConnectionFailed, match="refused"):
            await c.connect()
        assert c.closed

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 3


# --- item 7: told once when the connection goes, once when it is back ---------------------


def test_an_outage_is_told_once_and_the_return_once(
    broker: Broker, proxy_to: Callable[..., ChaosProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's host refuses connections for a while (the client, which had a session,
    tries again and again), then takes them again: one `Disconnected`, one `Reconnected`."""
    proxy = proxy_to(broker, cut_bytes=None, cut_seconds=None)
    lost: list[Disconnected] = []
    back: list[Reconnected] = []
    got: list[bytes] = []
    with client(
        proxy.address, "steady", on_disconnected=lost.append, on_reconnected=back.append
    ) as c:
        c.subscribe("news", lambda m: got.append(m.payload))
        caplog.set_level("INFO", logger="tether.client")
        proxy.refuse()
        wait_until(lambda: bool(lost), 5, lambda: "the Disconnected")
        # Refused attempts meanwhile (backoff capped at 0.1 s): none of them is told.
        wait_until(
            lambda: caplog.text.count("connect_failed") >= 3, 10, lambda: "3 refused attempts"
        )
        with client(broker.address, "pub") as pub:  # type: ignore[arg-type]
            pub.publish("news", b"meanwhile", confirm=True)
            assert not c.closed and not c.connected and back == []
            proxy.listen_again()
            wait_until(lambda: bool(back) and c.connected, 10, lambda: "the Reconnected")
            pub.publish("news", b"after", confirm=True)
        wait_until(lambda: len(got) == 2, 5, lambda: f"the messages, got {got}")
    assert got == [b"meanwhile", b"after"]
    assert len(lost) == 1 and lost[0].reason
    assert back == [Reconnected(resumed=True, queued=1)]


def test_the_async_client_tells_the_transitions_too(
    broker: Broker, proxy_to: Callable[..., ChaosProxy], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = proxy_to(broker, cut_bytes=None, cut_seconds=None)
    lost: list[Disconnected] = []
    back: list[Reconnected] = []

    async def on_reconnected(event: Reconnected) -> None:  # coroutine callbacks are awaited
        back.append(event)

    caplog.set_level("INFO", logger="tether.client")

    async def main() -> None:
        host, port = proxy.address
        async with AsyncClient(
            client_id="roamer",
            username="alice",
            password="secret",
            host=host,
            port=port,
            on_disconnected=lost.append,
            on_reconnected=on_reconnected,
            **FAST,
        ) as c:
            await c.subscribe("t")
            proxy.set_down(True)  # cut, and new connections closed at once
            deadline = time.monotonic() + 5
            while not lost and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            # Failed attempts meanwhile (accepted, closed at once): none of them is told.
            while caplog.text.count("connection_lost") < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert caplog.text.count("connection_lost") >= 3, "3 failed attempts"
            proxy.set_down(False)
            while not (back and c.connected) and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert len(lost) == 1
    assert back == [Reconnected(resumed=True, queued=0)]


def test_without_callbacks_the_transitions_are_logged(
    broker: Broker, proxy_to: Callable[..., ChaosProxy], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = proxy_to(broker, cut_bytes=None, cut_seconds=None)
    with caplog.at_level("INFO", logger="tether.client"), client(proxy.address, "quiet") as c:
        proxy.refuse()
        wait_until(lambda: not c.connected, 5, lambda: "the loss")
        wait_until(
            lambda: caplog.text.count("connect_failed") >= 3, 10, lambda: "3 refused attempts"
        )
        proxy.listen_again()
        wait_until(lambda: "'reconnected'" in caplog.text, 10, lambda: f"the log: {caplog.text}")
    assert caplog.text.count("event='disconnected'") == 1
    assert caplog.text.count("event='reconnected'") == 1


# --- items 3 and 4: the broker's word, not a guess ----------------------------------------


def test_rate_limited_says_what_the_broker_said(start_broker: Callable[..., Broker]) -> None:
    """Item 3: it used to retry until connect_timeout, then blame a broker that "does not
    answer" ("check that the broker runs there")."""
    broker = start_broker(auth_fail_limit=1, auth_fail_penalty=0.05)
    assert broker.address is not None
    with pytest.raises(AuthFailed):
        client(broker.address, "guess1", password="wrong").connect()
    started = time.monotonic()
    with pytest.raises(Rejected) as info:
        client(broker.address, "guess2", password="wrong", connect_timeout=10).connect()
    assert time.monotonic() - started < 5
    error = info.value
    assert error.code == "rate_limited"
    assert "too many failed logins" in str(error) and "check the password" in str(error)
    assert "no answer" not in str(error) and "check that the broker runs" not in str(error)


@pytest.fixture
def refusing_server() -> Iterator[tuple[str, int]]:
    """A server that answers every connection with a fatal `timeout` error and closes it, as
    a broker too busy to register anyone would."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.sendall(encode(Error(code="timeout", message="the broker is too busy")))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[:2]
    stop.set()
    server.close()
    thread.join(5)


def test_a_connect_that_times_out_says_what_the_broker_said_last(
    refusing_server: tuple[str, int],
) -> None:
    with pytest.raises(ConnectionFailed) as info:
        client(refusing_server, "patient", connect_timeout=0.5).connect()
    text = str(info.value)
    assert "timeout: the broker is too busy" in text
    assert "no answer" not in text and "closed the connection" not in text


def test_a_login_refused_unchecked_is_tried_again_after_retry_after() -> None:
    """Issue 12: a broker whose login queue is full answers `rate_limited` with `retry_after`
    (no verdict on the password). A client that never had a session dials again after that
    long instead of giving up, and gets in."""
    server = socket.create_server(("127.0.0.1", 0))
    dialled: list[float] = []

    def serve() -> None:
        for attempt in range(2):
            conn, _ = server.accept()
            dialled.append(time.monotonic())
            with conn:
                decoder = FrameDecoder()
                while (frame := decoder.next_frame()) is NEED_DATA:
                    decoder.receive_data(conn.recv(65536))
                assert isinstance(frame, Register)
                if attempt == 0:
                    busy = Error(req=frame.req, code="rate_limited", message="busy", retry_after=1)
                    conn.sendall(encode(busy))
                    continue
                conn.sendall(
                    encode(
                        Registered(
                            req=frame.req,
                            session_id="s-1",
                            resume_token="t-1",
                            resumed=False,
                            keepalive=30,
                            expiry=300,
                            queued=0,
                            dropped=0,
                        )
                    )
                )
                conn.recv(65536)  # until the client goes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client(server.getsockname()[:2], "patient", connect_timeout=10) as c:
            assert c.session_id == "s-1"
    finally:
        server.close()
        thread.join(5)
    assert len(dialled) == 2
    assert dialled[1] - dialled[0] >= 1.0  # it waited what the broker asked, at least


def test_auth_failed_points_at_the_brokers_users_file(broker: Broker) -> None:
    """Item 4: the hint sent the user to `tether user add`, which they had just run. (The
    broker now reloads the users file, so the hint no longer says to restart it.)"""
    assert broker.address is not None
    with pytest.raises(AuthFailed) as info:
        client(broker.address, "newbie", username="carol", password="fresh").connect()
    text = str(info.value)
    assert "tether user add" not in text
    assert "users file" in text and "--users" in text and "'carol'" in text


def test_the_docs_say_what_connect_timeout_means() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "client.md").read_text(encoding="utf-8")
    (row,) = [line for line in docs.splitlines() if line.startswith("| `connect_timeout`")]
    assert "refused" in row and "at once" in row


__all__ = ["proxy_to"]  # a fixture, imported for its use here
