"""`tether serve` with TLS as a real process: a renewed certificate reloaded on SIGHUP (new
connections and the HTTPS endpoint see it, an open connection keeps working), and the
one-line start-up refusals (exit status 2)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from bench.certs import CertAuthority
from tests.helpers import registered
from tests.tls_helpers import TlsWireClient, client_context, served_certificate
from tests.wire import wait_for
from tether.broker.users import add_user
from tether.protocol import Ok, Subscribe

WAIT = 20.0


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    add_user(path, "alice", "secret", cost=4)
    return path


def _serve(tmp_path: Path, users: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tether", "serve", "--port", "0", "--in-memory",
         "--users", str(users), "--log-format", "json", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


class Lines:
    """The broker's JSON log lines, read on a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[dict[str, Any]] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                continue

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait(self, name: str, count: int = 1) -> dict[str, Any]:
        wait_for(lambda: len(self.events(name)) >= count, timeout=WAIT, interval=0.05)
        return self.events(name)[count - 1]


def _https_serial(port: int, context: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_a_renewed_certificate(
    tmp_path: Path, users: Path, processes: list[subprocess.Popen[Any]]
) -> None:
    ca = CertAuthority(tmp_path / "ca")
    files = ca.server()
    proc = _serve(
        tmp_path, users, "--tls-cert", str(files.cert), "--tls-key", str(files.key),
        "--http", "127.0.0.1:0",
    )  # fmt: skip
    processes.append(proc)
    log = Lines(proc)
    started = log.wait("broker_started")
    port, http_port = started["port"], int(started["http"].rsplit(":", 1)[1])
    assert started["http"].startswith("https://")
    context = client_context(ca.cert_path)

    def serial(client: TlsWireClient) -> int:
        return x509.load_der_x509_certificate(served_certificate(client)).serial_number

    with TlsWireClient(("127.0.0.1", port), context) as old:
        registered(old.register("old"))
        first = serial(old)
        assert _https_serial(http_port, context) == first
        renewed = ca.server()  # new key, serial and notAfter, written over the old files
        proc.send_signal(signal.SIGHUP)
        reloaded = log.wait("tls_reloaded")
        renewed_serial = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number
        assert int(reloaded["serial"], 16) == renewed_serial != first
        assert reloaded["not_after"] and reloaded["subject"] == "commonName=localhost"
        assert log.events("tls_reload_failed") == []
        with TlsWireClient(("127.0.0.1", port), context) as new:
            assert serial(new) == renewed_serial
            registered(new.register("new"))
        assert _https_serial(http_port, context) == renewed_serial
        # The connection opened before the reload keeps its session and its certificate.
        old.send(Subscribe(req=old.next_req(), topic="t"))
        assert old.recv() == Ok(req=old._req)
        assert serial(old) == first
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT) == 0


def _refused(tmp_path: Path, users: Path, *args: str) -> str:
    proc = _serve(tmp_path, users, *args)
    try:
        _out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_an_open_key_file_is_refused_at_start(tmp_path: Path, users: Path) -> None:
    files = CertAuthority(tmp_path / "ca").server()
    os.chmod(files.key, 0o644)
    line = _refused(tmp_path, users, "--tls-cert", str(files.cert), "--tls-key", str(files.key))
    assert f"chmod 600 {files.key}" in line and "0644" in line


def test_a_key_of_another_certificate_is_refused_at_start(tmp_path: Path, users: Path) -> None:
    ca = CertAuthority(tmp_path / "ca")
    files, other = ca.server(), ca.issue("other", common_name="other")
    line = _refused(tmp_path, users, "--tls-cert", str(files.cert), "--tls-key", str(other.key))
    assert str(files.cert) in line and "mismatch" in line.lower()


def test_require_tls_with_a_plaintext_port_is_refused(tmp_path: Path, users: Path) -> None:
    files = CertAuthority(tmp_path / "ca").server()
    line = _refused(
        tmp_path, users, "--tls-cert", str(files.cert), "--tls-key", str(files.key),
        "--tls-port", "0", "--require-tls",
    )  # fmt: skip
    assert "--require-tls" in line
