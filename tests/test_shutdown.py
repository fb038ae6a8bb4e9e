"""Graceful drain (issue 11): a stop closes every connection at once, and a client resumes its
session on the next broker. The signal tests run real broker processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import registered, subscribe
from tests.test_cli_user import fake_server  # noqa: F401 - a fixture used below
from tests.test_client_chaos import FAST, wait_until
from tests.test_client_restart import cli_env, serve_broker, tether
from tests.wire import WireClient
from tether.broker.config import BrokerConfig
from tether.broker.server import Broker
from tether.cli import main
from tether.client import Client, Disconnected, SessionLost


def test_stop_closes_open_connections_at_once(
    start_broker: Callable[..., Broker], dial: Callable[[Broker], WireClient]
) -> None:
    broker = start_broker()
    active = dial(broker)
    registered(active.register("drained"))
    unregistered = dial(broker)  # connected, no session yet
    wait_until(lambda: broker.stats()["connections"] == 2, 5, lambda: "both connections")
    started = time.monotonic()
    broker.stop()
    took = time.monotonic() - started
    # Closed cleanly, without an error frame: nothing went wrong with these clients.
    assert active.frames_until_closed(timeout=1.0) == []
    assert unregistered.frames_until_closed(timeout=1.0) == []
    assert took < 2.0, f"stop took {took:.2f} s"
    assert broker.drain_result == (2, 0)
    assert broker.draining.is_set()


def test_a_drain_waits_no_longer_than_asked(start_broker: Callable[..., Broker]) -> None:
    broker = start_broker(shutdown_grace=0.5)
    started = time.monotonic()
    broker.stop()
    assert time.monotonic() - started < 0.5
    assert broker.drain_result == (0, 0)


def test_sigterm_drains_and_the_client_resumes_on_the_next_broker(
    users_file: Path,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    data = str(tmp_path / "data")
    port = serve_broker(users_file, 0, processes, "--data-dir", data, "--shutdown-grace", "3")
    lost: list[SessionLost] = []
    disconnected: list[float] = []
    got: list[bytes] = []

    def on_disconnected(_event: Disconnected) -> None:
        disconnected.append(time.monotonic())

    options = {"username": "alice", "password": "secret", "port": port, **FAST}
    with Client(
        client_id="drained",
        keepalive=30,
        on_session_lost=lost.append,
        on_disconnected=on_disconnected,
        **options,  # type: ignore[arg-type]
    ) as sub:
        sub.subscribe("t", lambda m: got.append(m.payload))
        signalled = time.monotonic()
        processes[0].send_signal(signal.SIGTERM)
        assert processes[0].wait(3) == 0
        assert time.monotonic() - signalled < 3
        wait_until(lambda: bool(disconnected), 2, lambda: "on_disconnected")
        # At once, not after a missed pong (45 s with keepalive 30).
        assert disconnected[0] - signalled < 2
        serve_broker(users_file, port, processes, "--data-dir", data)
        wait_until(lambda: sub.connected, 10, lambda: "the reconnection")
        with Client(client_id="pub", **options) as pub:  # type: ignore[arg-type]
            pub.publish("t", b"after", confirm=True)
        wait_until(lambda: got == [b"after"], 10, lambda: f"the message: {got}")
    assert lost == []


def test_sigterm_logs_the_drain_and_exits_0(
    users_file: Path,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        tether(
            "serve", "--port", "0", "--users", str(users_file), "--log-format", "json",
            "--data-dir", str(tmp_path / "data"),
        ),
        stdout=subprocess.PIPE,
        env=cli_env(),
    )  # fmt: skip
    processes.append(proc)
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "listening":
            port = int(event["port"])
            break
    with WireClient(("127.0.0.1", port)) as client:
        registered(client.register("logged"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert client.frames_until_closed(timeout=1.0) == []
    assert proc.returncode == 0
    events = {e["event"]: e for e in map(json.loads, out.splitlines())}
    assert events["draining"]["connections"] == 1
    stopped = events["broker_stopped"]
    assert stopped["connections_closed"] == 1 and stopped["connections_left_open"] == 0
    assert stopped["sessions_saved"] == 1


def test_a_second_signal_during_the_drain_exits_at_once(
    users_file: Path,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    port = serve_broker(
        users_file, 0, processes, "--data-dir", str(tmp_path / "data"), "--shutdown-grace", "60"
    )
    # A subscriber that never reads: the broker's close then waits for its writes to drain
    # (up to netedge's CLOSE_GRACE), so the drain is still under way at the second signal.
    stuck = WireClient(("127.0.0.1", port))
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    registered(stuck.register("stuck"))
    subscribe(stuck, "flood")
    with Client(client_id="flooder", username="alice", password="secret", port=port) as pub:
        for _ in range(100):
            pub.publish("flood", b"x" * 65536)
        pub.publish("flood", b"end", confirm=True)
    proc = processes[0]
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None, "the drain ended before the second signal"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 128 + signal.SIGINT
    assert time.monotonic() - started < 2
    stuck.close()


def test_shutdown_grace_option(fake_server: list[object], tmp_path: Path) -> None:  # noqa: F811
    users = ["--users", str(tmp_path / "users.json"), "--in-memory"]
    assert main(["serve", *users]) == 0
    assert main(["serve", *users, "--shutdown-grace", "1.5"]) == 0
    default, given = fake_server
    assert isinstance(default, BrokerConfig) and isinstance(given, BrokerConfig)
    assert default.shutdown_grace == BrokerConfig().shutdown_grace == 5.0
    assert given.shutdown_grace == 1.5


def test_shutdown_grace_is_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--shutdown-grace SECONDS" in text and "(default: 5.0)" in text


def test_shutdown_grace_must_be_positive() -> None:
    with pytest.raises(ValueError, match="shutdown_grace"):
        BrokerConfig(shutdown_grace=0)
