"""Processes that die: a subscriber killed and restarted with its state file, and a broker
restarted under a connected client. Real subprocesses (`python -m tether ...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.test_client_chaos import FAST, wait_until
from tether.broker.server import Broker
from tether.client import Client, SessionLost

REPO = Path(__file__).resolve().parent.parent


def cli_env(password: str = "secret") -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TETHER_PASSWORD": password}


def tether(*args: str) -> list[str]:
    return [sys.executable, "-m", "tether", *args]


def payloads(path: Path) -> list[int]:
    """The payloads a `tether sub --json` printed (a line torn by SIGKILL is skipped)."""
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(int(json.loads(line)["payload"]))
        except ValueError:
            continue
    return found


def test_a_killed_subscriber_restarted_with_its_state_file_loses_nothing(
    broker: Broker, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    n = 3000
    assert broker.address is not None
    port = str(broker.address[1])
    state = tmp_path / "sub.state"
    outs = [tmp_path / "out1.jsonl", tmp_path / "out2.jsonl"]
    sub_cmd = tether(
        "sub", "meter", "--json", "--state", str(state), "--client-id", "meter-reader",
        "--username", "alice", "--port", port,
    )  # fmt: skip

    def start(out: Path) -> subprocess.Popen[bytes]:
        with out.open("wb") as f:
            proc = subprocess.Popen(sub_cmd, stdout=f, stderr=subprocess.PIPE, env=cli_env())
        processes.append(proc)
        return proc

    first = start(outs[0])
    wait_until(lambda: broker.stats()["topics"] == 1, 15, lambda: "the subscription")

    def publish() -> None:
        with Client(client_id="meter", username="bob", password="hunter2", port=int(port)) as p:
            for i in range(n):
                p.publish("meter", b"%d" % i)
                if i % 50 == 49:
                    time.sleep(0.03)
            p.publish("meter", b"%d" % n, confirm=True)

    publisher = threading.Thread(target=publish)
    publisher.start()
    wait_until(lambda: len(payloads(outs[0])) >= n // 4, 15, lambda: "the first messages")
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    time.sleep(0.3)  # messages queue for the session meanwhile
    second = start(outs[1])
    try:
        wait_until(
            lambda: n in payloads(outs[1]),
            20,
            lambda: f"the last message; stderr: {second.stderr.read1().decode()}",  # type: ignore[union-attr]
        )
    finally:
        publisher.join()
    second.send_signal(signal.SIGINT)
    second.wait(5)
    before, after = payloads(outs[0]), payloads(outs[1])
    assert before == list(range(len(before)))
    # The restarted process goes on where the state file says the first one was; what the
    # first handled after its last state write (at most one batch) it sees again.
    assert after, "the restarted subscriber got nothing"
    resumed_at = after[0]
    assert resumed_at <= len(before), f"lost {resumed_at - len(before)} messages"
    assert after == list(range(resumed_at, n + 1))


def serve_broker(
    users: Path, port: int, processes: list[subprocess.Popen[bytes]], *store: str
) -> int:
    """Start `tether serve` (`store`: `--in-memory`, or `--data-dir DIR`); returns its port."""
    proc = subprocess.Popen(
        tether("serve", "--port", str(port), "--users", str(users), "--log-format", "json", *store),
        stdout=subprocess.PIPE,
        env=cli_env(),
    )
    processes.append(proc)
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "listening":
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it drained
            return int(event["port"])
    raise AssertionError(f"the broker did not start (status {proc.wait(10)})")


def test_a_subscriber_survives_an_in_memory_broker_being_restarted(
    users_file: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    port = serve_broker(users_file, 0, processes, "--in-memory")
    lost: list[SessionLost] = []
    got: list[bytes] = []
    options = {"username": "alice", "password": "secret", "port": port, **FAST}
    with Client(client_id="survivor", on_session_lost=lost.append, **options) as sub:  # type: ignore[arg-type]
        sub.subscribe("t", lambda m: got.append(m.payload))
        processes[0].send_signal(signal.SIGTERM)
        processes[0].wait(10)
        wait_until(lambda: not sub.connected, 5, lambda: "the connection loss")
        # A new in-memory broker process knows no sessions.
        serve_broker(users_file, port, processes, "--in-memory")
        wait_until(lambda: bool(lost) and sub.connected, 10, lambda: "a new session")
        with Client(client_id="pub", **options) as pub:  # type: ignore[arg-type]
            deadline = time.monotonic() + 5
            # The re-subscription may still be on its way: publish until it arrives.
            while not got and time.monotonic() < deadline:
                pub.publish("t", b"again", confirm=True)
                time.sleep(0.05)
    assert got and set(got) == {b"again"}
    assert "session" in str(lost[0])


def test_a_subscriber_resumes_its_session_on_a_restarted_durable_broker(
    users_file: Path, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    data = str(tmp_path / "data")
    port = serve_broker(users_file, 0, processes, "--data-dir", data)
    lost: list[SessionLost] = []
    got: list[bytes] = []
    options = {"username": "alice", "password": "secret", "port": port, **FAST}
    with Client(client_id="survivor", on_session_lost=lost.append, **options) as sub:  # type: ignore[arg-type]
        sub.subscribe("t", lambda m: got.append(m.payload))
        with Client(client_id="pub", **options) as pub:  # type: ignore[arg-type]
            pub.publish("t", b"before", confirm=True)
            wait_until(lambda: got == [b"before"], 5, lambda: "the first message")
            processes[0].send_signal(signal.SIGTERM)
            processes[0].wait(10)
            wait_until(lambda: not sub.connected, 5, lambda: "the connection loss")
            serve_broker(users_file, port, processes, "--data-dir", data)
            # Both clients resume; the publisher's confirmed message reaches the subscriber
            # on the session it had, with no re-subscription.
            pub.publish("t", b"after", confirm=True)
        wait_until(lambda: got == [b"before", b"after"], 10, lambda: f"both messages: {got}")
    assert lost == []
