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


def test_module_taken_over_exits_non_zero(
    broker: Broker, tmp_path: Path, scripts: list[Script]
) -> None:
    module = run(broker, tmp_path, scripts, "module.py", "serve", "calc")
    assert module.line() == "module calc: serving add, mul, upper"
    assert broker.address is not None
    Client(
        client_id="module-calc",
        takeover=True,
        username="alice",
        password="secret",
        port=broker.address[1],
    ).connect().unregister()
    assert module.proc.wait(15) == 1
    assert module.proc.stderr is not None
    err = module.proc.stderr.read()
    assert "module calc: stopped: another client took over" in err
    assert "Traceback" not in err


def test_a_second_module_of_the_same_name_is_refused_at_start(
    broker: Broker, tmp_path: Path, scripts: list[Script]
) -> None:
    first = run(broker, tmp_path, scripts, "module.py", "serve", "calc")
    assert first.line() == "module calc: serving add, mul, upper"
    second = run(broker, tmp_path, scripts, "module.py", "serve", "calc")  # same state file
    assert second.proc.wait(15) == 1
    assert second.proc.stderr is not None
    [line] = second.proc.stderr.read().strip().splitlines()
    assert line.startswith("module calc: the state file .module-calc.state is in use by process")
    # The first one was not disturbed: it still answers.
    added = subprocess.run(
        [sys.executable, str(EXAMPLES / "module.py"), "call", "calc", "add", "2", "3"],
        capture_output=True,
        text=True,
        env=env_for(broker),
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert (added.returncode, added.stdout) == (0, "5\n"), added.stderr
    assert first.proc.poll() is None


def usage_lines(example: Path) -> list[str]:
    """The command lines in an example's docstring."""
    doc = example.read_text().split('"""')[1]
    return [line.strip() for line in doc.splitlines() if "examples/" in line]


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("[!_]*.py")), ids=lambda path: path.name)
def test_examples_say_to_run_them_with_the_venvs_python(example: Path, tmp_path: Path) -> None:
    usage = usage_lines(example)
    assert usage, f"{example.name} shows no command line"
    for line in usage:
        assert f".venv/bin/python examples/{example.name}" in line, line
    # Run with a Python that does not have the project (no site-packages, no PYTHONPATH),
    # it says what to do in one line instead of a traceback.
    foreign = subprocess.run(
        [sys.executable, "-S", "-E", str(example), "x"],
        capture_output=True,
        text=True,
        env=env_for_foreign_python(),
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert foreign.returncode == 1
    [line] = foreign.stderr.strip().splitlines()
    assert f".venv/bin/python examples/{example.name}" in line


def env_for_foreign_python() -> dict[str, str]:
    env = {key: value for key, value in cli_env().items() if key != "PYTHONPATH"}
    env["TETHER_PASSWORD"] = "secret"
    return env
