"""Users without restarts: a running broker reloads its users file when it changes (and on
SIGHUP), ends the sessions of a removed or revoked user with `session_ended`, and keeps the
users it had when the new file does not load.

Brokers here load their users from the file (no `users=`), so they watch it. Tests wait for
the broker's own log line of a reload (polled, at most 10 s) instead of sleeping; the command
line runs as real processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import assert_error, registered, resume_frame
from tests.test_client_chaos import FAST
from tests.wire import WireClient, wait_for
from tether.broker.server import Broker
from tether.broker.users import add_user
from tether.client import Client
from tether.client.errors import SessionEnded
from tether.protocol import Ping, Pong, Registered

COST = "4"
RELOAD_WAIT = 10.0


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    add_user(path, "alice", "secret", cost=int(COST))
    return path


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def _count(caplog: pytest.LogCaptureFixture, event: str) -> int:
    return sum(1 for r in caplog.records if f"event='{event}'" in r.getMessage())


def _await_log(caplog: pytest.LogCaptureFixture, event: str, before: int) -> str:
    """Wait until `event` was logged once more than `before` times; its last line."""
    wait_for(lambda: _count(caplog, event) > before, timeout=RELOAD_WAIT, interval=0.05)
    return [r.getMessage() for r in caplog.records if f"event='{event}'" in r.getMessage()][-1]


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "tether", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def _login(broker: Broker, name: str, password: str, client_id: str) -> object:
    assert broker.address is not None
    with WireClient(broker.address, timeout=5.0) as client:
        return client.register(client_id, username=name, password=password)


def test_added_user_logs_in_without_restart(
    live: Callable[..., Broker], users_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = live()
    assert_error(_login(broker, "bob", "pw-b", "b0"), "auth_failed", 1)
    seen = _count(caplog_info, "users_reloaded")
    _cli("user", "add", "bob", "--users", str(users_path), "--cost", COST, stdin="pw-b\n")
    line = _await_log(caplog_info, "users_reloaded", seen)
    assert "bob" in line
    assert isinstance(_login(broker, "bob", "pw-b", "b1"), Registered)


def test_new_password_replaces_the_old_at_once(
    live: Callable[..., Broker], users_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = live()
    assert isinstance(_login(broker, "alice", "secret", "a0"), Registered)
    seen = _count(caplog_info, "users_reloaded")
    _cli("user", "add", "alice", "--replace", "--users", str(users_path), "--cost", COST,
         stdin="rotated\n")  # fmt: skip
    _await_log(caplog_info, "users_reloaded", seen)
    assert_error(_login(broker, "alice", "secret", "a1"), "auth_failed", 1)
    assert isinstance(_login(broker, "alice", "rotated", "a2"), Registered)


def test_user_remove_ends_live_and_away_sessions(
    live: Callable[..., Broker], users_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = live()
    assert broker.address is not None
    online = WireClient(broker.address, timeout=5.0)
    registered(online.register("on"))
    away = WireClient(broker.address, timeout=5.0)
    away_reg = registered(away.register("away"))
    away.close()
    wait_for(lambda: broker.stats()["connected"] == 1)

    seen = _count(caplog_info, "users_reloaded")
    _cli("user", "remove", "alice", "--users", str(users_path))
    _await_log(caplog_info, "users_reloaded", seen)

    frames = online.frames_until_closed(timeout=5)
    assert len(frames) == 1, frames
    assert_error(frames[0], "session_ended", None)
    online.close()
    wait_for(lambda: broker.stats()["sessions"] == 0)
    # The away session is gone too: its token resumes nothing, and alice cannot log in.
    with WireClient(broker.address, timeout=5.0) as probe:
        probe.send(resume_frame(1, "away", away_reg))
        assert_error(probe.recv(), "unknown_session", 1)
    assert_error(_login(broker, "alice", "secret", "again"), "auth_failed", 1)


def test_replace_end_sessions_ends_sessions_and_the_client_stops(
    live: Callable[..., Broker], users_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = live()
    assert broker.address is not None
    host, port = broker.address
    client = Client(
        client_id="leaky", host=host, port=port, username="alice", password="secret", **FAST
    )
    client.connect(timeout=10)
    try:
        seen = _count(caplog_info, "users_reloaded")
        _cli("user", "add", "alice", "--replace", "--end-sessions", "--users", str(users_path),
             "--cost", COST, stdin="fresh\n")  # fmt: skip
        _await_log(caplog_info, "users_reloaded", seen)
        wait_for(lambda: client.closed, timeout=5)
        assert isinstance(client.error, SessionEnded)
        # Stopped for good: no reconnect with the old password.
        time.sleep(0.3)
        assert broker.stats()["connected"] == 0 and broker.stats()["sessions"] == 0
    finally:
        client.close()
    # A session opened with the new password after the rotation is valid.
    assert isinstance(_login(broker, "alice", "fresh", "new"), Registered)
    assert _count(caplog_info, "session_ended") >= 1


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{oops", "malformed"),
        (json.dumps({"version": 99, "users": {}}), "newer than this broker reads"),
    ],
)
def test_a_file_that_does_not_load_keeps_the_previous_users(
    live: Callable[..., Broker],
    users_path: Path,
    caplog_info: pytest.LogCaptureFixture,
    content: str,
    why: str,
) -> None:
    broker = live()
    seen = _count(caplog_info, "users_reload_failed")
    tmp = users_path.with_suffix(".tmp")
    tmp.write_text(content)
    os.replace(tmp, users_path)
    line = _await_log(caplog_info, "users_reload_failed", seen)
    assert why in line
    assert isinstance(_login(broker, "alice", "secret", "still"), Registered)
    # Logged once per change, not once a second.
    time.sleep(2.5)
    assert _count(caplog_info, "users_reload_failed") == seen + 1


def test_removed_while_down_ends_restored_sessions(
    live: Callable[..., Broker], users_path: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = live(data_dir=data)
    assert first.address is not None
    with WireClient(first.address, timeout=5.0) as client:
        reg = registered(client.register("dev"))
    first.stop()
    add_user(users_path, "bob", "pw", cost=int(COST))
    _cli("user", "remove", "alice", "--users", str(users_path))
    second = live(data_dir=data)
    assert second.address is not None
    with WireClient(second.address, timeout=5.0) as probe:
        probe.send(resume_frame(1, "dev", reg))
        assert_error(probe.recv(), "unknown_session", 1)


def test_sighup_reloads_a_served_broker(users_path: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "serve", "--port", "0", "--in-memory",
         "--users", str(users_path), "--log-format", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def events(name: str) -> list[dict[str, Any]]:
        return [line for line in list(lines) if line.get("event") == name]

    try:
        wait_for(lambda: bool(events("broker_started")), timeout=20, interval=0.05)
        port = events("broker_started")[0]["port"]
        # An unchanged file: only the signal can make the broker read it again.
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: bool(events("users_reloaded")), timeout=RELOAD_WAIT, interval=0.05)
        assert events("reloading_users")[0]["signal"] == "SIGHUP"
        assert events("users_reloaded")[0]["users"] == 1
        with WireClient(("127.0.0.1", port), timeout=5.0) as client:
            assert isinstance(client.register("hup"), Registered)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0


def test_a_newly_revoked_user_loses_every_session_it_has_at_reload(
    live: Callable[..., Broker], users_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    """Sessions opened after the time in the file but before the broker read it were opened
    with the old password too: they end as well."""
    broker = live()
    assert broker.address is not None
    client = WireClient(broker.address, timeout=5.0)
    registered(client.register("late"))
    doc = json.loads(users_path.read_text())
    doc["version"] = 2
    doc["users"]["alice"]["sessions_valid_after"] = "2000-01-01T00:00:00Z"
    seen = _count(caplog_info, "users_reloaded")
    tmp = users_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, users_path)
    _await_log(caplog_info, "users_reloaded", seen)
    frames = client.frames_until_closed(timeout=5)
    client.close()
    assert len(frames) == 1, frames
    assert_error(frames[0], "session_ended", None)
    # Sessions opened after the reload stay.
    assert isinstance(_login(broker, "alice", "secret", "after"), Registered)
    time.sleep(1.5)  # another look at the unchanged file ends nothing
    assert broker.stats()["sessions"] == 1


def test_a_prefix_change_ends_the_sessions_whose_id_it_no_longer_allows(
    live: Callable[..., Broker], users_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = live()
    assert broker.address is not None
    kept = WireClient(broker.address, timeout=5.0)
    registered(kept.register("sensor-1"))
    ended = WireClient(broker.address, timeout=5.0)
    registered(ended.register("pump-1"))

    seen = _count(caplog_info, "users_reloaded")
    add_user(users_path, "alice", "secret", cost=int(COST), replace=True,
             client_id_prefixes=["sensor-"])  # fmt: skip
    _await_log(caplog_info, "users_reloaded", seen)

    frames = ended.frames_until_closed(timeout=5)
    assert len(frames) == 1, frames
    assert_error(frames[0], "session_ended", None)
    wait_for(lambda: broker.stats()["sessions"] == 1)
    kept.send(Ping(req=7))
    assert kept.recv() == Pong(req=7)  # the allowed one goes on
