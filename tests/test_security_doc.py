"""docs/security.md's commands, run as printed: the `openssl` blocks make a CA, a broker
certificate and a client certificate in an empty directory, and a broker started with them
(`--tls-client-ca --tls-cert-username cn`) takes the doc's `tether pub`; then the fleet
example's users get exactly the grants the doc says. Only the port is replaced (8883 may be
taken), as tests/test_docs.py does for the README.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_docs import blocks

REPO = Path(__file__).resolve().parent.parent
SECURITY = REPO / "docs" / "security.md"
DOC_PORT = "8883"

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is not on PATH: the doc's commands need it"
)


def shell_env() -> dict[str, str]:
    """A shell where `tether` is this venv's (as for a user with .venv/bin on PATH)."""
    bin_dir = str(Path(sys.executable).parent)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    env["PYTHONPATH"] = pythonpath
    env.pop("TETHER_PASSWORD", None)
    return env


def commands(code: str) -> list[str]:
    """The commands of a shell block: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", "", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def run(command: str, cwd: Path, *, port: int, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command.replace(DOC_PORT, str(port))],
        cwd=cwd,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if ok:
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(command: str, cwd: Path, port: int) -> subprocess.Popen[str]:
    argv = command.replace(DOC_PORT, str(port)).split()
    assert argv[:2] == ["tether", "serve"]
    argv += ["--in-memory", "--log-format", "json"]  # nothing left behind; lines to read
    log = (cwd / f"broker-{port}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", *argv[1:]],
        cwd=cwd,
        env=shell_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, (cwd / f"broker-{port}.log").read_text()
            assert time.monotonic() < deadline, "the broker did not listen"
            time.sleep(0.05)


@pytest.fixture
def made(tmp_path: Path) -> Iterator[Path]:
    """The doc's two openssl blocks, run in an empty directory."""
    ca_and_server, client = blocks(SECURITY, "sh")[:2]
    for code in (ca_and_server, client):
        for command in commands(code):
            run(command, tmp_path, port=0)
    yield tmp_path


def test_the_doc_openssl_blocks_make_what_a_broker_and_client_accept(made: Path) -> None:
    for key in ("ca.key", "server.key", "sensor-7.key"):
        assert stat.S_IMODE((made / key).stat().st_mode) == 0o600, key
    check = run("openssl verify -CAfile ca.pem server.pem sensor-7.pem", made, port=0)
    assert check.stdout.count(": OK") == 2
    names = run("openssl x509 -in server.pem -noout -ext subjectAltName", made, port=0).stdout
    assert "DNS:localhost" in names and "IP Address:127.0.0.1" in names
    add_user, serve_line = commands(blocks(SECURITY, "sh")[2])
    (pub,) = commands(blocks(SECURITY, "sh")[3])
    port = free_port()
    run(add_user, made, port=port)
    broker = serve(serve_line, made, port)
    try:
        published = run(pub, made, port=port)
        assert published.returncode == 0
        # The same publish without the certificate fails the handshake.
        no_cert = pub.split(" --tls-cert ")[0] + " --username sensor-7 --client-id sensor-7"
        refused = run(f"TETHER_PASSWORD=x {no_cert}", made, port=port, ok=False)
        assert refused.returncode != 0
    finally:
        broker.terminate()
        broker.wait(15)
    log = (made / f"broker-{port}.log").read_text()
    assert '"username": "sensor-7"' in log and '"event": "session_registered"' in log
    assert "tls_handshake_failed" in log


def test_the_fleet_example_grants_what_the_doc_says(made: Path) -> None:
    fleet = next(code for code in blocks(SECURITY, "") if "user add operator" in code)
    # The operator's certificate, made as the doc makes the device's.
    client = blocks(SECURITY, "sh")[1]
    for command in commands(client.replace("sensor-7", "operator")):
        run(command, made, port=0)
    for command in commands(fleet):
        run(command.replace("users.json", "fleet.json"), made, port=0)
    port = free_port()
    mtls = blocks(SECURITY, "sh")[2]
    serve_line = commands(mtls)[1].replace("users.json", "fleet.json")
    broker = serve(serve_line, made, port)
    tls = f"--port {port} --tls-ca ca.pem"
    device = f"{tls} --tls-cert sensor-7.pem --tls-key sensor-7.key --username sensor-7"
    operator = f"{tls} --tls-cert operator.pem --tls-key operator.key --username operator"
    try:
        out = made / "operator.out"
        with out.open("w") as f:
            reader = subprocess.Popen(
                f"tether sub fleet/sensor-7/telemetry --count 1 --client-id ops {operator}",
                shell=True,
                cwd=made,
                env=shell_env(),
                stdout=f,
                stderr=subprocess.PIPE,
                text=True,
            )
        pub = "tether pub --confirm --client-id sensor-7"
        # Published until the reader has one (a publish before its subscribe reaches nobody).
        deadline = time.monotonic() + 30
        while reader.poll() is None:
            assert time.monotonic() < deadline, "the operator got no telemetry"
            run(f"{pub} {device} fleet/sensor-7/telemetry 21.5", made, port=port)
            with contextlib.suppress(subprocess.TimeoutExpired):
                reader.wait(0.5)
        assert reader.returncode == 0
        assert out.read_text().split() == ["21.5"]
        for topic in ("fleet/sensor-7/commands", "fleet/sensor-9/telemetry"):
            denied = run(f"{pub} {device} {topic} x", made, port=port, ok=False)
            assert denied.returncode == 1 and "not_authorized" in denied.stderr, denied.stderr
        ops = f"tether pub --confirm --client-id ops {operator}"
        run(f"{ops} fleet/sensor-7/commands reboot", made, port=port)
        denied = run(f"{ops} fleet/sensor-7/telemetry x", made, port=port, ok=False)
        assert "not_authorized" in denied.stderr
    finally:
        broker.terminate()
        broker.wait(15)
