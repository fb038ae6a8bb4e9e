"""`tether user add/list` through main() and once as a real process; `serve` argument handling."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tether import __version__
from tether.broker.config import BrokerConfig
from tether.broker.passwords import verify_password
from tether.broker.server import StartupError
from tether.broker.users import UserStore
from tether.cli import main

COST = "4"


def _stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))  # StringIO.isatty() is False


def _add(monkeypatch: pytest.MonkeyPatch, path: Path, name: str, stdin: str, *extra: str) -> int:
    _stdin(monkeypatch, stdin)
    return main(["user", "add", name, "--users", str(path), "--cost", COST, *extra])


def _stored(path: Path, name: str) -> str:
    stored = UserStore.load(path).lookup(name)
    assert stored is not None
    return stored


@pytest.mark.parametrize(
    ("stdin", "password"),
    [
        ("s3cret\n", "s3cret"),
        ("s3cret\r\n", "s3cret"),
        ("s3cret", "s3cret"),
        ("s3cret\n\n", "s3cret\n"),  # only ONE newline is dropped
        ("s3cret\r\n\r\n", "s3cret\r\n"),
        ("  s3cret \n", "  s3cret "),  # other whitespace is part of the password
        ("multi\nline\n", "multi\nline"),
    ],
)
def test_password_from_stdin_drops_one_trailing_newline(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    stdin: str,
    password: str,
) -> None:
    path = tmp_path / "users.json"
    assert _add(monkeypatch, path, "alice", stdin) == 0
    stored = _stored(path, "alice")
    assert verify_password(password, stored)
    if stdin != password:  # the raw input, newline and all, is not the password
        assert not verify_password(stdin, stored)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alice" in err  # one-line confirmation on stderr


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_empty_password_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, stdin: str
) -> None:
    path = tmp_path / "users.json"
    assert _add(monkeypatch, path, "alice", stdin) == 1
    assert "empty password" in capsys.readouterr().err
    assert not path.exists()


def test_existing_user_is_an_error_that_suggests_replace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    assert _add(monkeypatch, path, "alice", "one\n") == 0
    capsys.readouterr()
    assert _add(monkeypatch, path, "alice", "two\n") == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--replace" in err and "Traceback" not in err
    assert verify_password("one", _stored(path, "alice"))

    assert _add(monkeypatch, path, "alice", "two\n", "--replace") == 0
    assert "changed the password" in capsys.readouterr().err
    assert verify_password("two", _stored(path, "alice"))


def test_bad_name_and_malformed_file_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    assert _add(monkeypatch, path, "bad\tname", "pw\n") == 1
    assert "control characters" in capsys.readouterr().err
    path.write_text("{oops")
    assert _add(monkeypatch, path, "alice", "pw\n") == 1
    err = capsys.readouterr().err
    assert str(path) in err and "malformed" in err and err.count("\n") == 1


def test_tty_prompts_twice_and_needs_a_match(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["first", "second", "same", "same"])
    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    path = tmp_path / "users.json"
    args = ["user", "add", "alice", "--users", str(path), "--cost", COST]
    assert main(args) == 1
    assert "do not match" in capsys.readouterr().err
    assert main(args) == 0
    assert verify_password("same", _stored(path, "alice"))


def test_cost_outside_bcrypt_range_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["user", "add", "alice", "--users", str(tmp_path / "u.json"), "--cost", "3"])
    assert info.value.code == 2


def test_user_list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    assert main(["user", "list", "--users", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no users file" in out.err
    _add(monkeypatch, path, "bob", "pw\n")
    _add(monkeypatch, path, "alice", "pw\n")
    capsys.readouterr()
    assert main(["user", "list", "--users", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["alice", "bob"]


def test_user_add_admin_is_listed_and_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    _add(monkeypatch, path, "ops", "pw\n", "--admin")
    _add(monkeypatch, path, "dev", "pw\n")
    _add(monkeypatch, path, "ops", "pw2\n", "--replace")  # keeps the mark
    capsys.readouterr()
    assert main(["user", "list", "--users", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[::2] for line in lines] == [["dev"], ["ops", "admin"]]
    _add(monkeypatch, path, "ops", "pw3\n", "--replace", "--no-admin")
    assert not UserStore.load(path).is_admin("ops")


def test_python_dash_m_tether_user_add(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether",
            "user",
            "add",
            "admin",
            "--users",
            str(path),
            "--cost",
            COST,
        ],
        input="from-a-pipe\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "added user 'admin'" in result.stderr
    assert verify_password("from-a-pipe", _stored(path, "admin"))


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Stand in for tether.broker.server, and undo the logging set-up `serve` does."""
    calls: list[Any] = []

    def serve(config: Any) -> int:
        calls.append(config)
        return 0

    module = types.ModuleType("tether.broker.server")
    module.serve = serve  # type: ignore[attr-defined]
    module.StartupError = StartupError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tether.broker.server", module)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield calls
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_serve_builds_the_config_and_warns_without_users_file(
    fake_server: list[Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    argv = ["serve", "--port", "0", "--users", str(path), "--session-expiry", "1.5"]
    assert main([*argv, "--queue-limit", "7", "--max-frame", "4096"]) == 0
    [config] = fake_server
    assert (config.host, config.port, config.users_path) == ("127.0.0.1", 0, path)
    assert (config.session_expiry, config.queue_limit, config.max_frame) == (1.5, 7, 4096)
    assert config.register_timeout == 10.0
    assert config.log_format == "json"  # stdout is not a terminal under pytest
    [warning] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert warning["level"] == "warning"
    assert "user add" in warning["hint"]


def test_serve_limit_options_reach_the_config(
    fake_server: list[Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["serve", "--users", str(tmp_path / "users.json"), "--max-register-bytes", "32KiB"]
    argv += ["--session-queue-bytes", "1.5M", "--memory-budget", "2GiB", "--auth-workers", "3"]
    argv += ["--max-sessions-per-user", "0", "--max-subscriptions", "50"]
    assert main(argv) == 0
    [config] = fake_server
    assert config.max_register_bytes == 32 * 1024
    assert config.session_queue_bytes == int(1.5 * 1024 * 1024)
    assert config.memory_budget == 2 << 30
    assert (config.auth_workers, config.max_subscriptions) == (3, 50)
    assert config.max_sessions_per_user == 0
    assert config.store_budget == 10 << 30 and config.auth_queue == 1000


@pytest.mark.parametrize("bad", ["0", "-5", "lots", "12XB", "KiB", ""])
def test_serve_refuses_a_bad_size(bad: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--users", str(tmp_path / "u.json"), "--max-metadata", bad])
    assert info.value.code == 2


def test_serve_refuses_a_malformed_users_file(
    fake_server: list[Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    path.write_text("[]")
    # Every start-up refusal of serve: one line, status 2 (issue 9).
    assert main(["serve", "--users", str(path), "--log-format", "console"]) == 2
    assert fake_server == []
    assert "malformed" in capsys.readouterr().err


def test_serve_defaults_are_the_broker_configs(
    fake_server: list[Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    assert main(["serve", "--users", str(path)]) == 0
    assert fake_server == [BrokerConfig(users_path=path, log_format="json")]


def test_serve_store_options(fake_server: list[Any], tmp_path: Path) -> None:
    users = ["--users", str(tmp_path / "users.json")]
    assert main(["serve", *users, "--data-dir", str(tmp_path / "d"), "--sync", "normal"]) == 0
    assert main(["serve", *users, "--in-memory"]) == 0
    durable, memory = fake_server
    assert (durable.data_dir, durable.sync) == (tmp_path / "d", "normal")
    assert (memory.data_dir, memory.sync) == (None, "full")


@pytest.mark.parametrize(
    "argv",
    [
        ["--in-memory", "--data-dir", "x"],
        ["--sync", "off"],
    ],
)
def test_serve_refuses_conflicting_or_unknown_store_options(
    fake_server: list[Any], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", *argv])
    assert info.value.code == 2
    assert fake_server == []
    err = capsys.readouterr().err
    assert "not allowed with" in err or "invalid choice" in err


def test_serve_help_says_what_each_sync_promises(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data-dir DIR" in text and "--in-memory" in text
    assert "power loss" in text and "crash of the broker process" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"tether {__version__}\n"


def _serve(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    users = tmp_path / "users.json"
    return subprocess.run(
        [sys.executable, "-m", "tether", "serve", "--users", str(users), *args],
        cwd=tmp_path,  # the default data directory is relative: keep it out of the checkout
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()  # one line: no traceback
    assert line.startswith("tether: error: ")
    for word in words:
        assert word in line


def test_serve_on_a_port_in_use_is_one_line_and_status_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--log-format", "json", tmp_path=tmp_path)
    _one_line_refusal(result, f"127.0.0.1:{port}", "in use", "--port")


def test_serve_on_an_unknown_host_is_one_line_and_status_2(tmp_path: Path) -> None:
    result = _serve("--host", "nonexistent.invalid", "--log-format", "json", tmp_path=tmp_path)
    _one_line_refusal(result, "nonexistent.invalid", "--host")


def test_serve_with_a_hash_that_is_not_bcrypt_is_one_line_and_status_2(tmp_path: Path) -> None:
    (tmp_path / "users.json").write_text(
        '{"version": 1, "users": {"eve": {"hash": "plain", "created": "x"}}}'
    )
    result = _serve("--port", "0", tmp_path=tmp_path)
    _one_line_refusal(result, "'eve'", "bcrypt")


def test_serve_with_a_newer_users_file_version_is_one_line_and_status_2(tmp_path: Path) -> None:
    (tmp_path / "users.json").write_text('{"version": 99, "users": {}}')
    result = _serve("--port", "0", tmp_path=tmp_path)
    _one_line_refusal(result, "version 99", "newer")


def test_user_add_into_a_missing_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "users.json"
    result = subprocess.run(
        [sys.executable, "-m", "tether", "user", "add", "admin", "--users", str(path)],
        input="pw\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result
    [line] = result.stderr.splitlines()
    assert "does not exist" in line and "mkdir -p" in line and str(path.parent) in line
    assert not path.parent.exists()


def test_user_remove(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    _add(monkeypatch, path, "alice", "pw\n")
    _add(monkeypatch, path, "bob", "pw\n")
    capsys.readouterr()
    assert main(["user", "remove", "alice", "--users", str(path)]) == 0
    assert "removed user 'alice'" in capsys.readouterr().err
    assert UserStore.load(path).names() == ["bob"]
    assert main(["user", "remove", "alice", "--users", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no user 'alice'" in err and err.count("\n") == 1


def test_user_add_end_sessions_needs_replace_and_marks_the_user(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    _add(monkeypatch, path, "alice", "pw\n")
    capsys.readouterr()
    assert _add(monkeypatch, path, "alice", "new\n", "--end-sessions") == 1
    assert "--replace" in capsys.readouterr().err
    assert _add(monkeypatch, path, "alice", "new\n", "--replace", "--end-sessions") == 0
    assert "ended their sessions" in capsys.readouterr().err
    record = UserStore.load(path).get("alice")
    assert record is not None and record.sessions_valid_after is not None
    assert verify_password("new", record.hash)
    assert json.loads(path.read_text())["version"] == 2
