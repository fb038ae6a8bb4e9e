"""Admin tokens: `tether token new` (the token alone on stdout, only its hash in the file, mode
0600), the token file as the broker reads it, and a real `tether serve --http ...` process
answering /health and the API with such a token."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.test_client_restart import cli_env, tether
from tether.broker.admin_tokens import TokenFile, append_token, hash_token, new_token, token_id
from tether.files import write_atomic


def token_new(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tether("token", "new", "--file", str(path)),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )


def test_token_new_prints_only_the_token_and_keeps_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "admin-tokens"
    first = token_new(path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 1 and first.stdout == lines[0] + "\n"
    token = lines[0]
    assert len(token) >= 43 and token.isascii() and " " not in token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == hashlib.sha256(token.encode()).hexdigest() + "\n"
    assert token not in path.read_text()
    second = token_new(path)
    assert second.returncode == 0
    other = second.stdout.strip()
    assert other != token
    assert path.read_text().splitlines() == [hash_token(token), hash_token(other)]


def test_token_new_does_not_create_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "admin-tokens"
    result = token_new(path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "does not exist" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not path.parent.exists()


def test_the_token_file_accepts_listed_tokens_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token, other = new_token(), new_token()
    append_token(path, token)
    tokens = TokenFile(path)
    assert tokens.check(token) == token_id(hash_token(token))
    assert len(token_id(hash_token(token))) == 12
    assert tokens.check(other) is None
    assert tokens.check("") is None
    assert tokens.check(hash_token(token)) is None  # the hash itself is not a token


def test_the_token_file_skips_comments_and_bad_lines_without_logging_them(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = new_token()
    pasted = new_token()  # a clear token pasted into the file by mistake
    write_atomic(path, f"# ops team\n\n{pasted}\n  {hash_token(token).upper()}  \n".encode())
    with capture_logs() as logs:
        tokens = TokenFile(path)
        assert tokens.check(token) is not None
        assert tokens.check(pasted) is None
    [bad] = [e for e in logs if e["event"] == "admin_tokens_bad_line"]
    assert bad["line"] == 3
    assert pasted not in repr(logs)


def test_the_token_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    tokens = TokenFile(path)
    token = new_token()
    assert tokens.check(token) is None  # no file: nothing accepted
    append_token(path, token)
    with capture_logs() as logs:
        assert tokens.check(token) is not None
        assert tokens.check(token) is not None
    assert [e["event"] for e in logs].count("admin_tokens_loaded") == 1
    path.unlink()
    assert tokens.check(token) is None


# --- a real process -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_tether_serve_with_http_answers_health_metrics_and_the_api(
    users_file: Path, tmp_path: Path, processes: list[subprocess.Popen[Any]]
) -> None:
    tokens = tmp_path / "admin-tokens"
    made = token_new(tokens)
    token = made.stdout.strip()
    port = free_port()
    proc = subprocess.Popen(
        tether(
            "serve",
            "--port",
            "0",
            "--users",
            str(users_file),
            "--in-memory",
            "--log-format",
            "json",
            "--http",
            f"127.0.0.1:{port}",
            "--admin-token-file",
            str(tokens),
        ),
        stdout=subprocess.PIPE,
        env=cli_env(),
    )
    processes.append(proc)
    assert proc.stdout is not None
    events: dict[str, dict[str, Any]] = {}
    for line in proc.stdout:
        event = json.loads(line)
        events[event["event"]] = event
        if event["event"] == "broker_started":
            break
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it drained
    assert events["http_listening"]["port"] == port
    assert events["broker_started"]["http"] == f"http://127.0.0.1:{port}"
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(base + "/health", timeout=10) as reply:
        assert json.loads(reply.read())["status"] == "ok"
    with urllib.request.urlopen(base + "/metrics", timeout=10) as reply:
        assert b"tether_connections_open" in reply.read()
    request = urllib.request.Request(
        base + "/api/sessions", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert json.loads(reply.read()) == {"sessions": [], "next": None}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_tether_serve_refuses_an_http_address_in_use(
    users_file: Path, processes: list[subprocess.Popen[Any]]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            tether(
                "serve",
                "--port",
                "0",
                "--users",
                str(users_file),
                "--in-memory",
                "--log-format",
                "json",
                "--http",
                f"127.0.0.1:{port}",
            ),
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=60,
        )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("tether: error: cannot serve HTTP on 127.0.0.1:") and "--http" in line


@pytest.mark.parametrize("bad", ["7879", "host:", ":80", "host:99999", "host:port"])
def test_serve_refuses_a_malformed_http_option(bad: str, users_file: Path) -> None:
    result = subprocess.run(
        tether("serve", "--users", str(users_file), "--in-memory", "--http", bad),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert result.returncode == 2 and "--http" in result.stderr


def test_the_file_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        append_token(tmp_path / "tokens", new_token())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tokens").stat().st_mode) == 0o600
