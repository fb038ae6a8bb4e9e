"""TLS in the client library and the client commands (docs/client.md, "TLS"): the blocking and
the asyncio client against a real broker serving TLS and mutual TLS, with certificates made
by bench/certs.py; each certificate failure a `TlsError` with its reason, raised once (the
broker's accept counter shows the client dialled one time); logins by certificate without a
password; `tether pub` and `tether stats` over TLS as subprocesses."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from bench.certs import CertAuthority, CertFiles
from tests.test_client_chaos import ChaosProxy, wait_until
from tests.test_client_restart import cli_env, tether
from tether.broker.admin_tokens import append_token, new_token
from tether.broker.server import Broker
from tether.cli import main
from tether.client import (
    AsyncClient,
    AuthFailed,
    Client,
    ClientMachine,
    ConnectionFailed,
    MachineConfig,
    Message,
    Reconnected,
    TlsError,
    TlsReason,
)
from tether.client import cli as client_cli
from tether.client.admin import AdminClient, AdminError, TlsFailed
from tether.client.tls import TlsStream

Start = Callable[..., Broker]


@dataclass(frozen=True)
class Certs:
    ca: CertAuthority
    server: CertFiles
    expired: CertFiles
    alice: CertFiles  # a client certificate, common name alice (a user in conftest's file)
    other_ca: CertAuthority  # a CA nobody trusts
    stranger: CertFiles  # a client certificate for alice, from the other CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = CertAuthority(directory)
    other = CertAuthority(directory / "other", "Other CA")
    now = dt.datetime.now(dt.UTC)
    return Certs(
        ca=ca,
        server=ca.server(),
        expired=ca.server(
            "expired", not_before=now - dt.timedelta(days=3), not_after=now - dt.timedelta(days=1)
        ),
        alice=ca.client("alice"),
        other_ca=other,
        stranger=other.client("alice"),
    )


def tls_broker(
    start_broker: Start, certs: Certs, server: CertFiles | None = None, **more: Any
) -> Broker:
    server = server or certs.server
    return start_broker(tls_cert=server.cert, tls_key=server.key, **more)


def port_of(broker: Broker) -> int:
    assert broker.address is not None
    return broker.address[1]


def options_for(port: int, client_id: str, **more: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "client_id": client_id,
        "username": "alice",
        "password": "secret",
        "host": "127.0.0.1",
        "port": port,
        "connect_timeout": 10,
    }
    return base | more


def options(broker: Broker, client_id: str, **more: Any) -> dict[str, Any]:
    return options_for(port_of(broker), client_id, **more)


def round_trip(client: Client, topic: str = "tls/t") -> bytes:
    inbox = client.subscribe(topic)
    client.publish(topic, "over tls", confirm=True)
    message = inbox.get(10)
    assert message is not None
    return message.payload


async def round_trip_async(client: AsyncClient, topic: str = "tls/a") -> bytes:
    inbox = await client.subscribe(topic)
    await client.publish(topic, "over tls", confirm=True)
    message = await inbox.get(10)
    assert message is not None
    return message.payload


# --- over TLS ---------------------------------------------------------------------------------


def test_sync_client_publishes_and_receives_over_tls(start_broker: Start, certs: Certs) -> None:
    broker = tls_broker(start_broker, certs)
    with Client(**options(broker, "tls-sync", ca=certs.ca.cert_path)) as client:
        assert round_trip(client) == b"over tls"
        # Many frames both ways at once: the reader and the writer share one TLS stream.
        inbox = client.subscribe("tls/many")
        for n in range(300):
            client.publish("tls/many", f"{n:04d}" * 100)
        got = [inbox.get(10) for _ in range(300)]
        assert [m.payload[:4] for m in got if m is not None] == [
            f"{n:04d}".encode() for n in range(300)
        ]


def test_async_client_publishes_and_receives_over_tls(start_broker: Start, certs: Certs) -> None:
    broker = tls_broker(start_broker, certs)

    async def main() -> bytes:
        async with AsyncClient(**options(broker, "tls-aio", ca=certs.ca.cert_path)) as client:
            return await round_trip_async(client)

    assert asyncio.run(main()) == b"over tls"


def test_an_ssl_context_of_the_application_is_used_as_is(start_broker: Start, certs: Certs) -> None:
    broker = tls_broker(start_broker, certs)
    context = ssl.create_default_context(cafile=str(certs.ca.cert_path))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # (so it shows it was this one)
    with Client(**options(broker, "tls-ctx", tls=context, host="localhost")) as client:
        assert round_trip(client) == b"over tls"
        stream = client._sock
        assert isinstance(stream, TlsStream) and stream.version == "TLSv1.2"


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_tls_client_with_a_session_rides_out_cuts_and_closed_handshakes(
    start_broker: Start, certs: Certs, front: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Once it had a session, connections cut, and connections closed during or right after
    the handshake (as a broker over its pending bound does), are retried: the client resumes
    its session over TLS and gets what was published meanwhile."""
    caplog.set_level(logging.INFO, logger="tether.client")
    broker = tls_broker(start_broker, certs)
    assert broker.address is not None
    relay = ChaosProxy(broker.address, cut_bytes=None, cut_seconds=None)
    back = threading.Event()
    reconnected: list[Reconnected] = []

    def on_reconnected(event: Reconnected) -> None:
        reconnected.append(event)
        back.set()

    mine = options_for(
        relay.address[1],
        f"rides-{front}",
        ca=certs.ca.cert_path,
        backoff_base=0.01,
        backoff_cap=0.05,
        on_reconnected=on_reconnected,
    )
    other = options(broker, f"rides-{front}-pub", ca=certs.ca.cert_path)
    try:
        with Client(**other) as publisher:

            def attempts() -> int:
                return sum("connect_failed" in r.getMessage() for r in caplog.records)

            def outage() -> None:
                relay.set_down(True)  # cut, and new connections closed at accept
                wait_until(lambda: attempts() >= 3, 10, lambda: "attempts while down")
                publisher.publish("rides/t", "while away", confirm=True)
                relay.set_down(False)

            if front == "sync":
                with Client(**mine) as client:
                    inbox = client.subscribe("rides/t")
                    outage()
                    assert back.wait(10)
                    message = inbox.get(10)
            else:

                async def main() -> Message | None:
                    async with AsyncClient(**mine) as client:
                        inbox = await client.subscribe("rides/t")
                        await asyncio.to_thread(outage)
                        assert await asyncio.to_thread(back.wait, 10)
                        return await inbox.get(10)

                message = asyncio.run(main())
    finally:
        relay.close()
    assert message is not None and message.payload == b"while away"
    assert reconnected and reconnected[0].resumed


# --- failures: typed, and never retried ------------------------------------------------------


def sentinel_context(cert: CertFiles | None = None) -> ssl.SSLContext:
    """A context that trusts any broker (even one with an expired certificate): the client
    that, after a failed one, shows how many connections the broker counted."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


def fails_once(
    broker: Broker, front: str, client_id: str, *, sentinel: CertFiles | None = None, **more: Any
) -> TlsError:
    """Connect with `more` (patient: connect_timeout 30 s) and return the TlsError it raised;
    and check the client dialled once: after it, a good client's connection is the only
    other one a counting relay in front of the broker saw (a client retrying in the
    background would add more)."""
    assert broker.address is not None
    relay = ChaosProxy(broker.address, cut_bytes=None, cut_seconds=None)
    try:
        error = _fails(relay, front, client_id, sentinel, more)
    finally:
        relay.close()
    assert relay.connections == 2
    return error


def _fails(
    relay: ChaosProxy, front: str, client_id: str, sentinel: CertFiles | None, more: Any
) -> TlsError:
    port = relay.address[1]
    bad = {**options_for(port, client_id), "connect_timeout": 30, **more}
    good = {**options_for(port, f"{client_id}-ok"), "tls": sentinel_context(sentinel)}
    if front == "sync":
        client = Client(**bad)
        with pytest.raises(TlsError) as caught:
            client.connect()
        assert client.closed and client.error is caught.value
        with Client(**good) as ok:
            assert round_trip(ok) == b"over tls"
    else:

        async def main() -> pytest.ExceptionInfo[TlsError]:
            client = AsyncClient(**bad)
            with pytest.raises(TlsError) as caught:
                await client.connect()
            assert client.closed
            async with AsyncClient(**good) as ok:
                assert await round_trip_async(ok) == b"over tls"
            return caught

        caught = asyncio.run(main())
    return caught.value


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_wrong_ca_fails_once_naming_the_verify_failure(
    start_broker: Start, certs: Certs, front: str
) -> None:
    broker = tls_broker(start_broker, certs)
    error = fails_once(broker, front, f"wrong-ca-{front}", ca=certs.other_ca.cert_path)
    assert error.reason is TlsReason.UNKNOWN_CA
    assert "certificate verify failed" in str(error) and "--tls-ca" in str(error)


@pytest.mark.parametrize("front", ["sync", "async"])
def test_an_expired_broker_certificate_fails_once(
    start_broker: Start, certs: Certs, front: str
) -> None:
    broker = tls_broker(start_broker, certs, certs.expired)
    error = fails_once(broker, front, f"expired-{front}", ca=certs.ca.cert_path)
    assert error.reason is TlsReason.EXPIRED and "expired" in str(error)


def test_a_certificate_for_another_name_fails_as_a_hostname_mismatch(
    start_broker: Start, certs: Certs
) -> None:
    broker = tls_broker(start_broker, certs)
    error = fails_once(
        broker, "sync", "wrong-name", ca=certs.ca.cert_path, server_hostname="broker.example.com"
    )
    assert error.reason is TlsReason.HOSTNAME_MISMATCH and "broker.example.com" in str(error)


@pytest.mark.parametrize("front", ["sync", "async"])
def test_mutual_tls_without_a_client_certificate_fails_once(
    start_broker: Start, certs: Certs, front: str
) -> None:
    broker = tls_broker(start_broker, certs, tls_client_ca=certs.ca.cert_path)
    # The good client after it presents a certificate (and the password: no cert-username).
    error = fails_once(broker, front, f"mtls-{front}", sentinel=certs.alice, ca=certs.ca.cert_path)
    assert error.reason is TlsReason.CERTIFICATE_REQUIRED
    assert "client certificate" in str(error) and "--tls-cert" in str(error)


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_client_certificate_from_another_ca_is_refused_once(
    start_broker: Start, certs: Certs, front: str
) -> None:
    broker = tls_broker(start_broker, certs, tls_client_ca=certs.ca.cert_path)
    error = fails_once(
        broker,
        front,
        f"stranger-{front}",
        sentinel=certs.alice,
        ca=certs.ca.cert_path,
        cert=certs.stranger.cert,
        key=certs.stranger.key,
    )
    assert error.reason is TlsReason.CERTIFICATE_REFUSED


def test_a_tls_client_on_a_plaintext_port_is_told_so_at_once(
    start_broker: Start, certs: Certs
) -> None:
    broker = start_broker()
    client = Client(**options(broker, "not-tls", ca=certs.ca.cert_path, connect_timeout=30))
    with pytest.raises(TlsError) as caught:
        client.connect()
    assert caught.value.reason is TlsReason.NOT_TLS and "does not speak TLS" in str(caught.value)


def test_a_plaintext_client_on_a_tls_port_is_pointed_at_tls(
    start_broker: Start, certs: Certs
) -> None:
    # The TLS listener closes it without a word: the client's last word says where to look.
    broker = tls_broker(start_broker, certs)
    client = Client(**options(broker, "plain", connect_timeout=1.5))
    with pytest.raises(ConnectionFailed) as caught:
        client.connect()
    assert "does not serve TLS there" in str(caught.value) and "--tls-ca" in str(caught.value)


# --- logins by certificate ---------------------------------------------------------------------


def test_a_certificate_login_sends_no_password(start_broker: Start, certs: Certs) -> None:
    broker = tls_broker(
        start_broker, certs, tls_client_ca=certs.ca.cert_path, tls_cert_username="cn"
    )
    cert = {"ca": certs.ca.cert_path, "cert": certs.alice.cert, "key": certs.alice.key}
    with Client(**options(broker, "by-cert", password=None, **cert)) as client:
        assert round_trip(client) == b"over tls"

    async def main() -> bytes:
        async with AsyncClient(**options(broker, "by-cert-aio", password=None, **cert)) as c:
            return await round_trip_async(c)

    assert asyncio.run(main()) == b"over tls"
    # The certificate names alice: another username is refused, as a login.
    with pytest.raises(AuthFailed):
        Client(**options(broker, "as-bob", username="bob", password=None, **cert)).connect()


def test_a_fresh_register_without_a_password_has_no_password_key() -> None:
    machine = ClientMachine(MachineConfig(client_id="c", username="alice", password=None))
    machine.connection_made()
    body = msgpack.unpackb(machine.data_to_send()[4:])
    assert body["type"] == "register" and "password" not in body


# --- local files and options --------------------------------------------------------------------


def test_bad_local_files_are_a_tls_error_before_dialling(certs: Certs, tmp_path: Path) -> None:
    base = {"client_id": "files", "username": "alice", "password": "secret", "port": 1}
    with pytest.raises(TlsError) as caught:
        Client(**base, ca=tmp_path / "missing.pem")
    assert caught.value.reason is TlsReason.LOCAL_FILES and "missing.pem" in str(caught.value)
    with pytest.raises(TlsError) as caught:
        AsyncClient(**base, cert=certs.alice.cert, key=certs.stranger.key)
    assert "does not belong to the certificate" in str(caught.value)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(TlsError, match="no usable certificate"):
        Client(**base, ca=not_pem)


def test_tls_options_that_contradict_each_other_are_refused(certs: Certs) -> None:
    base = {"client_id": "o", "username": "alice", "password": "secret"}
    with pytest.raises(ValueError, match="tls=False"):
        Client(**base, tls=False, ca=certs.ca.cert_path)
    with pytest.raises(ValueError, match="used as is"):
        Client(**base, tls=ssl.create_default_context(), ca=certs.ca.cert_path)
    with pytest.raises(ValueError, match="key without"):
        Client(**base, key=certs.alice.key)
    assert Client(**base, ca=certs.ca.cert_path).options.uses_tls  # ca implies tls


# --- the commands -----------------------------------------------------------------------------


def run_cli(*args: str, password: str | None = "secret") -> subprocess.CompletedProcess[str]:
    env = cli_env(password or "")
    if password is None:
        del env["TETHER_PASSWORD"]
    return subprocess.run(
        tether(*args), capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_tether_pub_over_mutual_tls_by_certificate(start_broker: Start, certs: Certs) -> None:
    broker = tls_broker(
        start_broker, certs, tls_client_ca=certs.ca.cert_path, tls_cert_username="cn"
    )
    tls = ["--tls-ca", str(certs.ca.cert_path), "--tls-cert", str(certs.alice.cert)]
    tls += ["--tls-key", str(certs.alice.key)]
    cert = {"ca": certs.ca.cert_path, "cert": certs.alice.cert, "key": certs.alice.key}
    with Client(**options(broker, "cli-reader", password=None, **cert)) as reader:
        inbox = reader.subscribe("cli/tls")
        # No password anywhere (no file, no variable, no terminal): the certificate logs in.
        done = run_cli(
            "pub", "cli/tls", "hello", "--confirm", "--username", "alice",
            "--port", str(port_of(broker)), *tls, password=None,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        message = inbox.get(10)
        assert message is not None and message.payload == b"hello"

    wrong = run_cli(
        "pub", "cli/tls", "nope", "--port", str(port_of(broker)),
        "--tls-ca", str(certs.other_ca.cert_path),
    )  # fmt: skip
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1 and "certificate verify failed" in wrong.stderr


@pytest.fixture
def https_broker(start_broker: Start, certs: Certs, tmp_path: Path) -> tuple[Broker, str]:
    tokens = tmp_path / "admin-tokens"
    token = new_token()
    append_token(tokens, token)
    broker = tls_broker(start_broker, certs, http=("127.0.0.1", 0), admin_token_file=tokens)
    return broker, token


def test_tether_stats_over_https_with_the_ca(
    https_broker: tuple[Broker, str], certs: Certs
) -> None:
    broker, token = https_broker
    assert broker.http_address is not None
    url = f"https://localhost:{broker.http_address[1]}"
    env = {**cli_env(), "TETHER_ADMIN_TOKEN": token}

    def stats(*more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            tether("stats", "--http", url, *more),
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip

    done = stats("--tls-ca", str(certs.ca.cert_path))
    assert done.returncode == 0, done.stderr
    assert "sessions" in json.loads(done.stdout)

    refused = stats("--tls-ca", str(certs.other_ca.cert_path))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "certificate verify failed" in refused.stderr


def test_admin_client_over_https_refuses_a_ca_for_plain_http_and_maps_tls_failures(
    https_broker: tuple[Broker, str], certs: Certs
) -> None:
    broker, token = https_broker
    assert broker.http_address is not None
    port = broker.http_address[1]
    with pytest.raises(AdminError, match="is plain HTTP"):
        AdminClient(f"http://127.0.0.1:{port}", token, ca=certs.ca.cert_path)
    assert (
        "sessions" in AdminClient(f"https://127.0.0.1:{port}", token, ca=certs.ca.cert_path).stats()
    )
    with pytest.raises(TlsFailed, match="certificate verify failed"):
        AdminClient(f"https://127.0.0.1:{port}", token, ca=certs.other_ca.cert_path).stats()
    with pytest.raises(TlsFailed, match="cannot read the CA file"):
        AdminClient(f"https://127.0.0.1:{port}", token, ca=certs.ca.directory / "missing.pem")


def test_tls_flags_that_cannot_work_are_one_line_errors(
    certs: Certs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (In this process: nothing is dialled, each fails before.) The command would configure
    # structlog for its stderr, for good: later tests read the logs through caplog.
    monkeypatch.setattr(client_cli, "_client_log_to_stderr", lambda *_args: None)
    monkeypatch.setenv("TETHER_PASSWORD", "secret")
    assert main(["pub", "t", "m", "--tls-key", str(certs.alice.key)]) == 1
    assert "--tls-key needs --tls-cert" in capsys.readouterr().err
    missing = tmp_path / "missing-ca.pem"
    assert main(["pub", "t", "m", "--port", "1", "--tls-ca", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the CA file" in err
