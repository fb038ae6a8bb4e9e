"""The scripts in examples/ run as a user runs them: subprocesses against a real broker."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_client_chaos import wait_until
from tests.test_client_restart import REPO, cli_env
from tether.broker.server import Broker
from tether.client import Client, Message

EXAMPLES = REPO / "examples"


class Script:
    """A running example whose stdout lines are read as they come."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout: float = 15.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s") from None
        if line is None:
            assert self.proc.stderr is not None
            raise AssertionError(f"the script ended: {self.proc.stderr.read()}")
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    started: list[Script] = []
    yield started
    for script in started:
        script.stop()


def env_for(broker: Broker) -> dict[str, str]:
    assert broker.address is not None
    return {
        **cli_env("secret"),
        "TETHER_PORT": str(broker.address[1]),
        "TETHER_USERNAME": "alice",
    }


def run(broker: Broker, tmp_path: Path, scripts: list[Script], *args: str) -> Script:
    script = Script([str(EXAMPLES / args[0]), *args[1:]], env_for(broker), tmp_path)
    scripts.append(script)
    return script


def recorded(state: Path) -> object:
    try:
        return json.loads(state.read_text())["last_seq"]
    except (OSError, ValueError):
        return None


def client(broker: Broker, client_id: str) -> Client:
    assert broker.address is not None
    return Client(
        client_id=client_id, username="alice", password="secret", port=broker.address[1]
    ).connect()


def test_device_sends_telemetry_with_metadata_and_obeys_commands(
    broker: Broker, tmp_path: Path, scripts: list[Script]
) -> None:
    readings: queue.Queue[Message] = queue.Queue()
    with client(broker, "fleet-manager") as manager:
        manager.subscribe("fleet/telemetry", readings.put)
        device = run(broker, tmp_path, scripts, "device.py", "sensor-7", "--interval", "0.2")
        assert device.line().startswith("sensor-7: online as session ")
        first = json.loads(readings.get(timeout=15).payload)
        assert first["device"] == "sensor-7" and first["n"] == 1
        manager.publish("fleet/sensor-7/commands", json.dumps({"interval": 0.05}), confirm=True)
        assert device.line() == "sensor-7: command {'interval': 0.05} (seq 1)"
        seen = [json.loads(readings.get(timeout=15).payload)["n"] for _ in range(5)]
        assert seen == list(range(2, 7))  # in order, none missing
    # A restarted device resumes its session from this file.
    assert json.loads((tmp_path / ".sensor-7.state").read_text())["client_id"] == "sensor-7"


def test_module_answers_requests_and_reports_bad_ones(
    broker: Broker, tmp_path: Path, scripts: list[Script]
) -> None:
    module = run(broker, tmp_path, scripts, "module.py", "serve", "calc")
    assert module.line() == "module calc: serving add, mul, upper"

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(EXAMPLES / "module.py"), "call", "calc", *args],
            capture_output=True,
            text=True,
            env=env_for(broker),
            cwd=tmp_path,
            timeout=30,
            check=False,
        )

    added = call("add", "2", "3")
    assert (added.returncode, added.stdout) == (0, "5\n"), added.stderr
    shouted = call("upper", "quiet")
    assert shouted.stdout == "QUIET\n", shouted.stderr
    unknown = call("divide", "1", "0")
    assert unknown.returncode == 1
    assert unknown.stdout.startswith("error: unknown op")
    # One-shot callers unregister: only the module's session is left.
    assert broker.stats()["sessions"] == 1


def test_resilient_subscriber_killed_and_restarted_loses_and_repeats_nothing(
    broker: Broker, tmp_path: Path, scripts: list[Script]
) -> None:
    args = ("resilient_subscriber.py", "alerts", "--client-id", "watcher")
    with client(broker, "publisher") as publisher:
        first = run(broker, tmp_path, scripts, *args)
        assert first.line() == "listening on alerts; Ctrl-C to stop"
        for n in range(1, 4):
            publisher.publish("alerts", f"alert {n}", confirm=True)
        assert [first.line() for _ in range(3)] == [f"alerts #{n}: alert {n}" for n in (1, 2, 3)]
        # Killed once it recorded its work (killed between printing a message and recording
        # it, it would show that one again: at-least-once, as documented).
        state = tmp_path / ".resilient-subscriber.state"
        wait_until(lambda: recorded(state) == {"alerts": 3}, 15, lambda: f"{state} to say 3")
        first.stop()  # SIGKILL: no goodbye
        for n in range(4, 6):
            publisher.publish("alerts", f"alert {n}", confirm=True)
        second = run(broker, tmp_path, scripts, *args)
        got = [second.line() for _ in range(3)]
    # The queued messages may come before the "listening" line. Those the killed process had
    # not acked come again, flagged, and the state file makes the client drop them; one sent
    # to the dead connection before the broker noticed comes flagged too, but shown once.
    got.remove("listening on alerts; Ctrl-C to stop")
    assert [line.replace(" (redelivered)", "") for line in got] == [
        "alerts #4: alert 4",
        "alerts #5: alert 5",
    ]
    with pytest.raises(queue.Empty):
        second.lines.get(timeout=0.5)


def test_the_readme_example_runs_as_printed(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (REPO / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) == 6  # five lines and a blank one
    assert broker.address is not None
    # The README talks to scripts/run's broker and admin user; this one is the test broker.
    code = code.replace('username="admin"', 'username="alice"')
    code = code.replace('"PASSWORD FROM scripts/run"', f'"secret", port={broker.address[1]}')
    exec(compile(code, "README.md", "exec"), {})
    # (the in-process broker logs to stdout too)
    assert "hello" in capsys.readouterr().out.splitlines()
