"""Issue 12, per-user rules at registration: `--max-sessions-per-user` (a fresh register over it
is `quota_exceeded`, non-fatal; a takeover of the user's own client id is not a new session),
and a failed resume, logged with why (never the token) and counted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from tests.helpers import Dial, assert_error, registered, resume_frame
from tests.wire import wait_for
from tether.broker.config import BrokerConfig
from tether.broker.messages import GetMetrics, GetSession
from tether.broker.server import Broker
from tether.broker.users import UserStore
from tether.protocol import Ok, Ping, Register, Unregister


def session_metrics(broker: Broker) -> dict[str, int]:
    return cast("dict[str, int]", broker._refs["sessions"].ask(GetMetrics(), timeout=10))


def view(broker: Broker, client_id: str) -> Any:
    return broker._refs["sessions"].ask(GetSession(client_id), timeout=10)


def test_a_fresh_register_over_the_users_quota_is_refused_and_a_takeover_is_not(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(max_sessions_per_user=2)
    one, two = dial(broker), dial(broker)
    registered(one.register("c-1"))
    registered(two.register("c-2"))
    two.close()  # away sessions count too: they can be resumed
    wait_for(lambda: view(broker, "c-2").status == "away")
    third = dial(broker)
    error = assert_error(third.register("c-3"), "quota_exceeded", 1)
    assert "2 sessions" in error.message
    third.send(Ping(req=2))  # non-fatal: the connection stays, unregistered
    assert_error(third.recv(), "not_registered", 2)
    # Another user has a quota of their own.
    registered(third.register("b-1", username="bob", password="hunter2"))
    # A takeover of the user's own client id replaces a session: not refused.
    again = dial(broker)
    registered(again.register("c-2", takeover=True))
    # Ending one makes room.
    one.send(Unregister(req=one.next_req()))
    assert isinstance(one.recv(), Ok)
    wait_for(lambda: view(broker, "c-1") is None)
    registered(dial(broker).register("c-3"))
    seen = session_metrics(broker)
    assert seen["sessions_quota_refused"] == 1
    assert seen["registrations_new"] == 4 and seen["registrations_taken_over"] == 1


def test_sessions_loaded_from_the_store_count_against_the_quota(
    users_file: Path, tmp_path: Path, dial: Dial
) -> None:
    config = BrokerConfig(
        port=0, users_path=users_file, data_dir=tmp_path / "data", max_sessions_per_user=1
    )
    first = Broker(config, users=UserStore.load(users_file))
    first.start()
    try:
        registered(dial(first).register("c-1"))
    finally:
        first.stop()
    second = Broker(config, users=UserStore.load(users_file))
    second.start()
    try:
        assert_error(dial(second).register("c-2"), "quota_exceeded", 1)
    finally:
        second.stop()


def test_an_unlimited_quota_refuses_nothing(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker()  # max_sessions_per_user=0, the default
    client = dial(broker)
    for n in range(5):
        registered(client.register(f"u-{n}"))
        client.close()
        client = dial(broker)
    assert session_metrics(broker)["sessions_quota_refused"] == 0


def test_a_failed_resume_is_logged_with_why_and_counted_never_with_the_token(
    broker: Broker, dial: Dial, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    owner = dial(broker)
    reg = registered(owner.register("dev"))
    owner.close()
    client = dial(broker)
    attempts = [
        (Register(req=1, client_id="dev", username="alice", session_id="nope", resume_token="t1"),
         "no_such_session"),
        (Register(req=2, client_id="other", username="alice", session_id=reg.session_id,
                  resume_token=reg.resume_token), "wrong_client_or_user"),
        (Register(req=3, client_id="dev", username="alice", session_id=reg.session_id,
                  resume_token="not-the-token"), "wrong_token"),
    ]  # fmt: skip
    for frame, _why in attempts:
        client.send(frame)
        assert_error(client.recv(), "unknown_session", frame.req)
    lines = [r.getMessage() for r in caplog.records if "'resume_failed'" in r.getMessage()]
    assert len(lines) == 3
    for line, (frame, why) in zip(lines, attempts, strict=True):
        assert f"why='{why}'" in line
        assert f"client_id='{frame.client_id}'" in line and "username='alice'" in line
        assert f"session_id='{frame.session_id}'" in line and "peer='127.0.0.1:" in line
        assert cast("str", frame.resume_token) not in line
    assert session_metrics(broker)["registrations_unknown_session"] == 3
    # The session itself is untouched: the right token still resumes it.
    client.send(resume_frame(4, "dev", reg))
    assert registered(client.recv()).resumed is True
