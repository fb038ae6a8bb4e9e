"""The `stats` extension frame and the `tether stats` command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from tests.conftest import PASSWORDS
from tests.wire import WireClient
from tether.broker.server import Broker
from tether.protocol import Ok, Publish, Registered, Stats, StatsResult, Subscribe


def test_stats_frame_answers_counters(broker: Broker, connect: Callable[[], WireClient]) -> None:
    client = connect()
    assert isinstance(client.register("dev"), Registered)
    client.send(Subscribe(req=2, topic="t"), Publish(topic="t", payload=b"x", req=3))
    assert client.recv() == Ok(req=2)
    assert client.recv() == Ok(req=3)
    client.recv()  # the delivery of its own publish
    client.send(Stats(req=4))
    answer = client.recv()
    assert isinstance(answer, StatsResult)
    assert answer.req == 4
    assert answer.stats["sessions"] == 1
    assert answer.stats["connected"] == 1
    assert answer.stats["published"] == 1
    assert answer.stats["delivered"] == 1
    assert answer.stats["bcrypt_hashes"] >= 1


def test_stats_before_register_is_not_registered(connect: Callable[[], WireClient]) -> None:
    client = connect()
    client.send(Stats(req=9))
    answer = client.recv()
    assert getattr(answer, "code", None) == "not_registered"


def test_tether_stats_command_prints_json(broker: Broker) -> None:
    assert broker.address is not None
    host, port = broker.address
    env = dict(os.environ, TETHER_PASSWORD=PASSWORDS["alice"])
    done = subprocess.run(
        [sys.executable, "-m", "tether", "stats", "--host", host, "--port", str(port),
         "--username", "alice"],
        env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"bcrypt_hashes"' in done.stdout
    # Its throwaway session was ended, not left to linger.
    assert broker.stats()["sessions"] == 0


def test_tether_stats_wrong_password_is_a_clear_error(broker: Broker) -> None:
    assert broker.address is not None
    host, port = broker.address
    env = dict(os.environ, TETHER_PASSWORD="wrong")
    done = subprocess.run(
        [sys.executable, "-m", "tether", "stats", "--host", host, "--port", str(port),
         "--username", "alice"],
        env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 1
    assert "auth_failed" in done.stderr
