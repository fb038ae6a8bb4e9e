"""`tether pub` and `tether sub` end to end: real subprocesses against a real broker."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_client_chaos import wait_until
from tests.test_client_restart import cli_env, tether
from tether.broker.server import Broker


@pytest.fixture
def port(broker: Broker) -> str:
    assert broker.address is not None
    return str(broker.address[1])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def pub(port: str, *args: str, stdin: bytes | None = None, password: str = "secret") -> str:
    done = subprocess.run(
        tether("pub", *args, "--username", "alice", "--port", port),
        input=stdin,
        capture_output=True,
        env=cli_env(password),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def sub(
    processes: list[subprocess.Popen[str]], broker: Broker, port: str, *args: str
) -> subprocess.Popen[str]:
    topics_before = broker.stats()["topics"]
    proc = subprocess.Popen(
        tether("sub", *args, "--username", "alice", "--port", port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    processes.append(proc)
    wait_until(
        lambda: broker.stats()["topics"] > topics_before or proc.poll() is not None,
        15,
        lambda: "the subscription",
    )
    return proc


def finish(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return out.splitlines()


def test_pub_from_argument_file_and_stdin_lines_reaches_sub(
    broker: Broker, port: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    listener = sub(processes, broker, port, "news", "alerts", "-v", "--count", "5")
    pub(port, "news", "hello world")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00\xffbinary")
    pub(port, "alerts", "--file", str(payload), "--confirm")
    pub(port, "news", "--lines", "--confirm", stdin=b"one\r\ntwo\nthree\n")
    assert finish(listener) == [
        "news 1 hello world",
        "alerts 1 00ff62696e617279",
        "news 2 one",
        "news 3 two",
        "news 4 three",
    ]


def test_sub_json_prints_one_object_per_line(
    broker: Broker, port: str, processes: list[subprocess.Popen[str]]
) -> None:
    listener = sub(processes, broker, port, "raw", "--json", "--count", "2")
    pub(port, "raw", "--confirm", stdin="grüße".encode())
    pub(port, "raw", "--confirm", stdin=b"\xc3")
    lines = [json.loads(line) for line in finish(listener)]
    assert lines == [
        {"topic": "raw", "seq": 1, "payload": "grüße", "encoding": "utf-8"},
        {"topic": "raw", "seq": 2, "payload": "c3", "encoding": "hex"},
    ]


def test_sub_with_state_resumes_and_gets_what_was_published_meanwhile(
    broker: Broker, port: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    state = str(tmp_path / "sub.state")
    listener = sub(
        processes, broker, port, "jobs", "--state", state, "--client-id", "w1", "--count", "1"
    )
    pub(port, "jobs", "first", "--confirm")
    assert finish(listener) == ["first"]
    # Nobody listens now; the session keeps the messages.
    pub(port, "jobs", "--lines", "--confirm", stdin=b"second\nthird\n")
    again = subprocess.run(
        tether(
            "sub", "jobs", "--state", state, "--count", "2", "--username", "alice", "--port", port
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=30,
        check=False,
    )  # the client id comes from the state file
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["second", "third"]


def test_errors_are_one_line_without_traceback(broker: Broker, port: str) -> None:
    wrong = subprocess.run(
        tether("pub", "t", "x", "--username", "alice", "--port", port),
        capture_output=True,
        text=True,
        env=cli_env("not-the-password"),
        timeout=30,
        check=False,
    )
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1].startswith("tether: error: the broker refused")
    assert "Traceback" not in wrong.stderr
    reserved = subprocess.run(
        tether("pub", "$sys", "x", "--port", port),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=30,
        check=False,
    )
    assert reserved.returncode == 1 and "reserved for the broker" in reserved.stderr
    no_state_id = subprocess.run(
        tether("sub", "t", "--state", "/nonexistent/x.state", "--port", port),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=30,
        check=False,
    )
    assert no_state_id.returncode == 1 and "--client-id" in no_state_id.stderr


def test_password_comes_from_a_file(broker: Broker, port: str, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("secret\n")
    env = cli_env()
    del env["TETHER_PASSWORD"]
    done = subprocess.run(
        tether(
            "pub", "t", "x", "--username", "alice", "--port", port, "--password-file", str(secret)
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
