"""`tether pub` and `tether sub` end to end: real subprocesses against a real broker."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.admin_users import ROOT, ROOT_PASSWORD, users_with_admin
from tests.test_client_chaos import ChaosProxy, wait_until
from tests.test_client_restart import cli_env, serve_broker, tether
from tether.broker.server import Broker
from tether.client import Client, SessionLost
from tether.protocol import DEFAULT_MAX_FRAME


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's users and an admin, root (only admins may ask `stats`)."""
    return users_with_admin(tmp_path_factory.mktemp("users") / "users.json")


@pytest.fixture
def port(broker: Broker) -> str:
    assert broker.address is not None
    return str(broker.address[1])


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


# --- issue 9 ------------------------------------------------------------------------------


def pub_fails(port: str, *args: str) -> str:
    """Run a `tether pub` that must fail; its stderr."""
    done = subprocess.run(
        tether("pub", *args, "--username", "alice", "--port", port),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=20,
        check=False,
    )
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.mark.parametrize("confirm", [False, True], ids=["fire-and-forget", "confirm"])
@pytest.mark.parametrize("size", [DEFAULT_MAX_FRAME, 2 * DEFAULT_MAX_FRAME], ids=["1MiB", "2MiB"])
def test_pub_refuses_a_message_too_large_for_the_broker_and_sends_nothing(
    broker: Broker, port: str, tmp_path: Path, confirm: bool, size: int
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * size)  # 1 MiB is the limit itself: its frame is larger
    err = pub_fails(port, "t", "--file", str(big), *(["--confirm"] if confirm else []))
    # One line: the size, the limit and what to do.
    [line] = err.strip().splitlines()
    assert line.startswith("tether: error: ")
    assert str(DEFAULT_MAX_FRAME) in line and "--max-frame" in line
    assert any(str(n) in line for n in range(size, size + 200)), line  # the frame's size
    stats = broker.stats()
    # Nothing published, one connection (no reconnect loop), no session left behind.
    assert (stats["published"], stats["accepted"]) == (0, 1)
    wait_until(lambda: broker.stats()["sessions"] == 0, 5, lambda: "the session to end")


def test_pub_lines_stops_at_the_first_line_too_large(broker: Broker, port: str) -> None:
    done = subprocess.run(
        tether("pub", "t", "--lines", "--username", "alice", "--port", port),
        input=b"small\n" + b"x" * (2 * DEFAULT_MAX_FRAME) + b"\nnever\n",
        capture_output=True,
        env=cli_env(),
        timeout=20,
        check=False,
    )
    assert done.returncode == 1
    [line] = done.stderr.decode().strip().splitlines()
    assert line.startswith("tether: error: line 2 of 3: ")
    assert "line 1 was" in line
    wait_until(lambda: broker.stats()["published"] == 1, 5, lambda: "line 1 published")


class Watched:
    """A running `tether` command whose stdout and stderr lines are read as they come."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.err_seen: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
        assert stream is not None
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def stdout_line(self, timeout: float = 15.0) -> str:
        try:
            line = self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s; stderr: {self.err_seen}") from None
        assert line is not None, f"the command ended; stderr: {self.err_seen}"
        return line

    def stderr_line(self, wanted: Callable[[str], bool], timeout: float = 15.0) -> str:
        """The next stderr line that `wanted` accepts (others are kept in err_seen)."""
        while True:
            try:
                line = self.err.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no such line within {timeout} s: {self.err_seen}") from None
            assert line is not None, f"the command ended; stderr: {self.err_seen}"
            self.err_seen.append(line)
            if wanted(line):
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def watched() -> Iterator[list[Watched]]:
    started: list[Watched] = []
    yield started
    for command in started:
        command.stop()


def watch_sub(
    watched: list[Watched], broker: Broker, port: str, *args: str, subscriptions: int = 1
) -> Watched:
    """A `tether sub`, once the broker has its subscription."""
    before = broker.stats()["topics"]
    command = Watched(tether("sub", *args, "--username", "alice", "--port", port))
    watched.append(command)
    wait_until(
        lambda: (
            broker.stats()["topics"] >= before + subscriptions or command.proc.poll() is not None
        ),
        15,
        lambda: "the subscription",
    )
    return command


@pytest.fixture
def proxy(broker: Broker) -> Iterator[ChaosProxy]:
    """A proxy to the broker that can be taken down (and never cuts on its own)."""
    assert broker.address is not None
    made = ChaosProxy(broker.address, cut_bytes=None, cut_seconds=None)
    yield made
    made.close()


def test_sub_says_when_the_connection_is_lost_and_when_the_session_is_resumed(
    broker: Broker, port: str, proxy: ChaosProxy, watched: list[Watched]
) -> None:
    where = str(proxy.address[1])
    listener = watch_sub(watched, broker, where, "news")
    proxy.set_down(True)
    lost = listener.stderr_line(lambda line: "lost" in line)
    assert lost.startswith(f"tether: lost the connection to 127.0.0.1:{where}")
    wait_until(lambda: broker.stats()["connected"] == 0, 5, lambda: "the broker to notice")
    pub(port, "news", "--lines", "--confirm", stdin=b"one\ntwo\n")
    proxy.set_down(False)
    back = listener.stderr_line(lambda line: "reconnected" in line)
    assert (
        back
        == f"tether: reconnected to 127.0.0.1:{where}: session resumed, 2 queued messages to come"
    )
    assert [listener.stdout_line(), listener.stdout_line()] == ["one", "two"]
    # One line each way, nothing else (no retry noise while the broker was unreachable).
    assert listener.err_seen == [lost, back]


def test_sub_interrupted_while_the_broker_is_away_ends_within_bounds(
    broker: Broker, proxy: ChaosProxy, watched: list[Watched]
) -> None:
    listener = watch_sub(watched, broker, str(proxy.address[1]), "news")
    proxy.set_down(True)
    listener.stderr_line(lambda line: "lost the connection" in line)
    started = time.monotonic()
    listener.proc.send_signal(signal.SIGTERM)
    assert listener.proc.wait(15) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 12  # UNREGISTER_TIMEOUT, and the close after it
    told = listener.stderr_line(lambda line: "could not end the session" in line)
    assert "lingers on the broker until it expires" in told


def test_sub_says_when_a_restarted_broker_gave_it_a_new_session(
    users_file: Path, watched: list[Watched], processes: list[subprocess.Popen[bytes]]
) -> None:
    # An --in-memory broker forgets its sessions when it stops.
    port = str(serve_broker(users_file, 0, processes, "--in-memory"))
    listener = Watched(tether("sub", "news", "--username", "alice", "--port", port))
    watched.append(listener)
    wait_until(lambda: topics(port) == 1, 15, lambda: "the subscription")
    processes[0].send_signal(signal.SIGTERM)
    processes[0].wait(10)
    lost = listener.stderr_line(lambda line: "lost" in line)
    assert lost.startswith(f"tether: lost the connection to 127.0.0.1:{port}")
    serve_broker(users_file, int(port), processes, "--in-memory")
    back = listener.stderr_line(lambda line: "reconnected" in line)
    assert back == (
        f"tether: reconnected to 127.0.0.1:{port} with a new session (the old one was "
        "gone): the messages queued for it are lost"
    )
    wait_until(lambda: topics(port) == 1, 15, lambda: "the subscription again")
    pub(port, "news", "again", "--confirm")
    assert listener.stdout_line() == "again"
    assert listener.err_seen == [lost, back]  # and no long warning besides


def test_sub_resumes_its_session_after_the_broker_was_killed(
    users_file: Path,
    tmp_path: Path,
    watched: list[Watched],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Issue 10 as it was found: a `tether sub --state` killed, two messages published with
    --confirm, the broker killed and restarted on its data directory: both arrive."""
    data = str(tmp_path / "data")
    port = str(serve_broker(users_file, 0, processes, "--data-dir", data))
    state = str(tmp_path / "sub.state")
    args = ("sub", "jobs", "--state", state, "--username", "alice", "--port", port)
    first = Watched(tether(*args, "--client-id", "worker"))
    watched.append(first)
    wait_until(lambda: topics(port) == 1, 15, lambda: "the subscription")
    first.proc.kill()
    first.proc.wait(10)
    pub(port, "jobs", "--lines", "--confirm", stdin=b"one\ntwo\n")
    processes[0].kill()
    processes[0].wait(10)
    serve_broker(users_file, int(port), processes, "--data-dir", data)
    second = Watched(tether(*args, "--count", "2"))
    watched.append(second)
    assert [second.stdout_line(), second.stdout_line()] == ["one", "two"]
    assert second.proc.wait(15) == 0, second.err_seen
    # A connected `tether sub` rides out a restart on the same session.
    third = Watched(tether(*args))
    watched.append(third)
    # Connected: the counter reader and this subscriber.
    wait_until(lambda: broker_stat(port, "connected") == 2, 15, lambda: "the subscriber")
    processes[1].kill()
    processes[1].wait(10)
    lost = third.stderr_line(lambda line: "lost" in line)
    serve_broker(users_file, int(port), processes, "--data-dir", data)
    back = third.stderr_line(lambda line: "reconnected" in line)
    assert back == (
        f"tether: reconnected to 127.0.0.1:{port}: session resumed, 0 queued messages to come"
    )
    pub(port, "jobs", "three", "--confirm")
    assert third.stdout_line() == "three"
    assert third.err_seen == [lost, back]


def topics(port: str) -> int:
    """The `topics` counter of the broker at `port` (asked over the wire)."""
    return broker_stat(port, "topics")


def broker_stat(port: str, key: str) -> int:
    """One counter of the broker at `port`, asked over the wire (by a session of its own, as
    an admin: only admins may ask `stats`)."""
    with Client(
        client_id="counter-reader", username=ROOT, password=ROOT_PASSWORD, port=int(port)
    ) as reader:
        count: int = reader.stats()[key]
        reader.unregister()
    return count


@pytest.mark.parametrize("end", ["count", "SIGINT", "SIGTERM"])
def test_sub_without_state_leaves_no_session_behind(
    broker: Broker, port: str, processes: list[subprocess.Popen[str]], end: str
) -> None:
    assert broker.stats()["sessions"] == 0
    listener = sub(processes, broker, port, "ghost", *(["--count", "1"] if end == "count" else []))
    assert broker.stats()["sessions"] == 1
    if end == "count":
        pub(port, "ghost", "boo", "--confirm")
    else:
        listener.send_signal(getattr(signal, end))
    out, err = listener.communicate(timeout=15)
    assert out.splitlines() == (["boo"] if end == "count" else [])
    expected = {"count": 0, "SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}
    assert listener.returncode == expected[end], err
    assert "Traceback" not in err
    wait_until(lambda: broker.stats()["sessions"] == 0, 5, lambda: "the session to end")
    # Messages published now are queued for nobody.
    pub(port, "ghost", "unheard", "--confirm")
    assert broker.stats()["queued"] == 0


def test_sub_with_state_keeps_its_session_when_interrupted(
    broker: Broker, port: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    state = str(tmp_path / "keep.state")
    listener = sub(processes, broker, port, "kept", "--state", state, "--client-id", "keeper")
    listener.send_signal(signal.SIGINT)
    listener.communicate(timeout=15)
    assert listener.returncode == 128 + signal.SIGINT
    pub(port, "kept", "while away", "--confirm")
    stats = broker.stats()
    assert (stats["sessions"], stats["queued"]) == (1, 1)


def test_pub_help_mentions_only_its_own_options() -> None:
    def help_of(command: str) -> str:
        done = subprocess.run(
            tether(command, "--help"), capture_output=True, text=True, env=cli_env(), timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "--state" not in help_of("pub")
    assert "--state" in help_of("sub")


def test_session_lost_says_what_the_client_knows_and_guesses_nothing() -> None:
    """After a broker restart a session is normally resumed; when it is not, the client
    cannot tell why, so the message lists the causes instead of blaming the expiry."""
    text = str(SessionLost("s-1", expiry=300))
    assert text.startswith("session s-1 is gone: the broker answered unknown_session")
    assert "(expired," not in text  # the old message's guess
    for cause in ("unregistered", "taken over", "expiry (300 s)", "--in-memory", "--data-dir"):
        assert cause in text
    assert str(SessionLost(None)).startswith("the session is gone")
