"""TLS and mutual TLS against real brokers (in this process) and real sockets: the listener,
refused handshakes that close only their own connection, `--tls-port` beside plaintext,
`--require-tls`, HTTPS, certificate logins, the plaintext warning, reloads and start-up
refusals. Certificates come from bench/certs.py (a private CA per module); clients are raw
`ssl`-wrapped sockets speaking the protocol package's frames (tests/tls_helpers.py).
`tether serve` as a process (SIGHUP, exit status): tests/test_tls_process.py.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from bench.certs import CertAuthority, CertFiles
from tests.helpers import assert_error, registered, resume_frame
from tests.tls_helpers import REFUSED, TlsWireClient, client_context, served_certificate
from tests.wire import WireClient, wait_for
from tether.broker.config import BrokerConfig
from tether.broker.messages import GetMetrics
from tether.broker.server import Broker, StartupError
from tether.broker.tls import SSL_READ_SIZE, PeerCertificate, broker_context, http_context
from tether.protocol import Deliver, Ok, Publish, Registered, Subscribe, encode

Start = Callable[..., Broker]


@dataclass(frozen=True)
class Pki:
    ca: CertAuthority
    server: CertFiles
    alice: CertFiles  # CN alice
    bob_by_san: CertFiles  # CN nobody, SAN DNS bob then email
    carol: CertFiles  # CN carol: not a user
    expired: CertFiles  # CN alice, expired yesterday
    foreign: CertFiles  # CN alice, signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(base / "ca")
    now = dt.datetime.now(dt.UTC)
    return Pki(
        ca=ca,
        server=ca.server(),
        alice=ca.client("alice"),
        bob_by_san=ca.issue(
            "bob-san", common_name="nobody", dns=("bob",), emails=("b@example.com",), client=True
        ),
        carol=ca.client("carol"),
        expired=ca.issue(
            "expired",
            common_name="alice",
            client=True,
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        ),
        foreign=CertAuthority(base / "other", name="Other CA").client("alice"),
    )


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event='{event}'" in r.getMessage()]


def _tls(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {"tls_cert": pki.server.cert, "tls_key": pki.server.key, **overrides}


def _mtls(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return _tls(pki, tls_client_ca=pki.ca.cert_path, **overrides)


def _metric(broker: Broker, actor: str, name: str) -> int:
    ref = broker.actor(actor)
    assert ref is not None
    return int(ref.ask(GetMetrics(), timeout=5)[name])


def _handshake_failures(broker: Broker) -> int:
    return _metric(broker, "listeners", "tls_handshake_failures")


def _password_checks(broker: Broker) -> int:
    return _metric(broker, "supervisor", "password_checks")


def _dial_tls(
    broker: Broker, pki: Pki, cert: CertFiles | None = None, *, address: Any = None
) -> TlsWireClient:
    where = address or broker.tls_address
    assert where is not None
    return TlsWireClient(where, client_context(pki.ca.cert_path, cert))


def _round_trip(client: WireClient, topic: str = "t") -> None:
    """Subscribe, publish and receive on one registered connection."""
    client.send(Subscribe(req=client.next_req(), topic=topic))
    assert client.recv() == Ok(req=client._req)
    client.send(Publish(req=client.next_req(), topic=topic, payload=b"over tls"))
    frames = client.recv_many(2)
    assert Ok(req=client._req) in frames
    delivered = [f for f in frames if isinstance(f, Deliver)]
    assert delivered and delivered[0].payload == b"over tls"


def _refused_handshake(broker: Broker, pki: Pki, cert: CertFiles | None) -> None:
    """The broker refuses this client's handshake: no register gets through."""
    try:
        client = _dial_tls(broker, pki, cert)
    except REFUSED:
        return  # refused during the handshake (TLS 1.2, or the alert came at once)
    with client, pytest.raises(REFUSED):
        # TLS 1.3: the client finished first; the broker's alert comes with the first read.
        client.register("refused")


# --- the listener --------------------------------------------------------------------------


def test_tls_register_publish_and_receive(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_tls(pki))
    assert broker.tls_address == broker.address  # `port` serves TLS
    with _dial_tls(broker, pki) as client:
        assert client.tls.version() in ("TLSv1.2", "TLSv1.3")
        registered(client.register("tls-1"))
        _round_trip(client)
        # A second TLS client gets what the first publishes.
        with _dial_tls(broker, pki) as other:
            registered(other.register("tls-2", username="bob", password="hunter2"))
            other.send(Subscribe(req=1, topic="news"))
            assert other.recv() == Ok(req=1)
            client.send(Publish(topic="news", payload=b"hello"))
            frame = other.recv()
            assert isinstance(frame, Deliver) and frame.payload == b"hello"


def test_frames_larger_than_the_ssl_read_size_cross_whole(start_broker: Start, pki: Pki) -> None:
    # The broker reads TLS SSL_READ_SIZE at a time (broker/tls.py, for memory): a frame many
    # times that size, and many frames in one write, still arrive whole and in order.
    broker = start_broker(**_tls(pki))
    big = bytes(range(256)) * 4000  # ~1 MB, 30 reads' worth
    assert len(big) > 20 * SSL_READ_SIZE
    with _dial_tls(broker, pki) as client:
        registered(client.register("big-1"))
        client.send(Subscribe(req=1, topic="big"))
        assert client.recv() == Ok(req=1)
        client.send(Publish(req=2, topic="big", payload=big))
        small = [Publish(topic="big", payload=b"%d" % n) for n in range(2000)]
        client.sock.sendall(b"".join(encode(frame) for frame in small))
        frames = client.recv_many(2 + len(small), timeout=30)
    delivered = [f.payload for f in frames if isinstance(f, Deliver)]
    assert Ok(req=2) in frames
    assert delivered == [big, *(b"%d" % n for n in range(2000))]


def test_server_contexts_demand_tls_1_2_and_the_client_ca(pki: Pki) -> None:
    config = BrokerConfig(**_mtls(pki))
    listener, http = broker_context(config), http_context(config)
    assert listener.minimum_version == http.minimum_version == ssl.TLSVersion.TLSv1_2
    assert listener.verify_mode == ssl.CERT_REQUIRED
    assert http.verify_mode == ssl.CERT_NONE  # the admin token authenticates there


def test_plaintext_client_on_the_tls_port_is_closed_and_nothing_else(
    start_broker: Start, pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = start_broker(**_tls(pki))
    assert broker.address is not None
    with _dial_tls(broker, pki) as good:
        registered(good.register("good"))
        for n in range(3):
            with WireClient(broker.address, timeout=5.0) as plain, pytest.raises(REFUSED):
                plain.register(f"plain-{n}")
        wait_for(lambda: _handshake_failures(broker) == 3)
        _round_trip(good)  # the TLS client never noticed
        # Logged once for the interval (not once per connection), with its reason.
        lines = _events(caplog_info, "tls_handshake_failed")
        assert len(lines) == 1 and "reason=" in lines[0], lines
        assert not any("Traceback" in r.getMessage() for r in caplog_info.records)


def test_a_silent_client_is_cut_at_the_handshake_timeout(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_tls(pki, register_timeout=0.3))
    assert broker.address is not None
    with _dial_tls(broker, pki) as good, socket.create_connection(broker.address) as silent:
        registered(good.register("good"))
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed by the broker, no handshake ever started
        wait_for(lambda: _handshake_failures(broker) == 1)
        _round_trip(good)


def test_the_register_read_limit_holds_over_tls(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_tls(pki, max_register_bytes=1024))
    with _dial_tls(broker, pki) as client:
        frame = client.register("big", metadata={"blob": "x" * 4096})
        assert_error(frame, "frame_too_large", None)


@pytest.mark.parametrize("case", ["expired", "foreign", "none"])
def test_mtls_refuses_a_bad_or_missing_client_certificate(
    start_broker: Start, pki: Pki, case: str, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = start_broker(**_mtls(pki))
    bad = {"expired": pki.expired, "foreign": pki.foreign, "none": None}[case]
    with _dial_tls(broker, pki, pki.alice) as good:
        registered(good.register("good"))
        _refused_handshake(broker, pki, bad)
        wait_for(lambda: _handshake_failures(broker) == 1)
        _round_trip(good)
    reason = _events(caplog_info, "tls_handshake_failed")[0]
    expected = {
        "expired": "expired",
        "foreign": "unable to get local issuer",
        "none": "CERTIFICATE",
    }[case]
    assert expected in reason, reason


def test_tls_port_beside_plaintext(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_tls(pki, tls_port=0))
    assert broker.address is not None and broker.tls_address is not None
    assert broker.address != broker.tls_address
    with WireClient(broker.address, timeout=5.0) as plain:
        registered(plain.register("plain"))
        _round_trip(plain, "p")
    with _dial_tls(broker, pki) as secure:
        registered(secure.register("secure"))
        _round_trip(secure, "s")
    with WireClient(broker.tls_address, timeout=5.0) as wrong, pytest.raises(REFUSED):
        wrong.register("plain-on-tls")
    # And TLS on the plaintext port does not get through either.
    with pytest.raises(REFUSED):
        _dial_tls(broker, pki, address=broker.address).close()


def test_require_tls_leaves_no_plaintext_listener(
    start_broker: Start, pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = start_broker(**_tls(pki, require_tls=True, host="0.0.0.0"))
    assert broker.address is not None and broker.tls_address == broker.address
    where = ("127.0.0.1", broker.address[1])
    with WireClient(where, timeout=5.0) as plain, pytest.raises(REFUSED):
        plain.register("plain")
    with _dial_tls(broker, pki, address=where) as secure:
        registered(secure.register("secure"))
    listening = _events(caplog_info, "listening")
    assert len(listening) == 1 and "tls=True" in listening[0], listening
    assert _events(caplog_info, "plaintext_exposed") == []


def test_plaintext_on_a_public_address_is_warned_about(
    start_broker: Start, caplog_info: pytest.LogCaptureFixture
) -> None:
    start_broker(host="127.0.0.1")
    assert _events(caplog_info, "plaintext_exposed") == []
    start_broker(host="0.0.0.0")
    (line,) = _events(caplog_info, "plaintext_exposed")
    assert "host='0.0.0.0'" in line and "--tls-cert" in line and "passwords" in line


def test_plaintext_http_on_a_public_address_is_warned_about(
    start_broker: Start, caplog_info: pytest.LogCaptureFixture
) -> None:
    start_broker(http=("0.0.0.0", 0))
    (line,) = _events(caplog_info, "plaintext_exposed")
    assert "HTTP" in line and "--tls-cert" in line


def test_https_health_with_the_ca(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_mtls(pki, http=("127.0.0.1", 0)))
    assert broker.http_address is not None and broker.http_scheme == "https"
    url = f"https://localhost:{broker.http_address[1]}/health"
    # No client certificate needed there: the admin token authenticates the API.
    context = client_context(pki.ca.cert_path)
    with urllib.request.urlopen(url, timeout=10, context=context) as reply:
        assert reply.status == 200
        assert json.loads(reply.read())["status"] == "ok"
    with pytest.raises(urllib.error.URLError):  # a client that does not trust the CA
        urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context())
    plain = f"http://127.0.0.1:{broker.http_address[1]}/health"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain, timeout=10)


# --- certificate logins --------------------------------------------------------------------


def test_cn_login_needs_no_password(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_mtls(pki, tls_cert_username="cn"))
    with _dial_tls(broker, pki, pki.alice) as client:
        reg = registered(client.register("cert-cn", password=None))
        _round_trip(client)
    # A password, if sent, is ignored: even a wrong one.
    with _dial_tls(broker, pki, pki.alice) as client:
        registered(client.register("cert-cn-2", password="not alice's"))
    # A resume is the token's business, as ever.
    with _dial_tls(broker, pki, pki.alice) as client:
        client.send(resume_frame(7, "cert-cn", reg))
        frame = client.recv()
        assert isinstance(frame, Registered) and frame.resumed
    assert _password_checks(broker) == 0
    assert _metric(broker, "supervisor", "certificate_logins") == 2


def test_san_login_takes_the_first_dns_email_or_uri_name(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_mtls(pki, tls_cert_username="san"))
    with _dial_tls(broker, pki, pki.bob_by_san) as client:
        registered(client.register("cert-san", username="bob", password=None))
    with _dial_tls(broker, pki, pki.bob_by_san) as client:
        # Its common name is not what san mode reads.
        assert_error(
            client.register("cert-san-2", username="nobody", password=None), "auth_failed", 1
        )


@pytest.mark.parametrize(
    ("cert", "username"),
    [("alice", "bob"), ("carol", "carol")],
    ids=["username-mismatch", "not-a-user"],
)
def test_cert_login_refusals(
    start_broker: Start, pki: Pki, cert: str, username: str, caplog_info: pytest.LogCaptureFixture
) -> None:
    broker = start_broker(**_mtls(pki, tls_cert_username="cn"))
    files = pki.alice if cert == "alice" else pki.carol
    with _dial_tls(broker, pki, files) as client:
        # Even with bob's right password: the certificate decides who this is.
        password = "hunter2" if username == "bob" else None
        assert_error(client.register("c", username=username, password=password), "auth_failed", 1)
        # The connection stays: a register as the certificate's user (if one) works.
        if cert == "alice":
            registered(client.register("c", username="alice", password=None))
    (line,) = _events(caplog_info, "auth_failed")
    assert f"certificate_name='{cert}'" in line and f"username='{username}'" in line
    assert broker.stats()["auth_failed"] == 1 and _password_checks(broker) == 0


def test_a_resume_needs_the_certificates_user_too(
    start_broker: Start, pki: Pki, dial: Callable[..., WireClient]
) -> None:
    # bob logs in by password on the plaintext port; a stolen resume token is no use to the
    # holder of another user's certificate on the TLS port.
    broker = start_broker(**_mtls(pki, tls_cert_username="cn", tls_port=0))
    bob = dial(broker)
    reg = registered(bob.register("bob-1", username="bob", password="hunter2"))
    bob.close()
    with _dial_tls(broker, pki, pki.alice) as thief:
        thief.send(resume_frame(3, "bob-1", reg, username="bob"))
        assert_error(thief.recv(), "auth_failed", 3)
        # Its own user's resume goes on as ever (and alice's token is hers).
        own = registered(thief.register("alice-1", username="alice", password=None))
    with _dial_tls(broker, pki, pki.alice) as back:
        back.send(resume_frame(4, "alice-1", own))
        frame = back.recv()
        assert isinstance(frame, Registered) and frame.resumed


def test_mtls_without_cert_username_checks_the_password_too(start_broker: Start, pki: Pki) -> None:
    broker = start_broker(**_mtls(pki))
    with _dial_tls(broker, pki, pki.alice) as client:
        assert_error(client.register("m", password="wrong"), "auth_failed", 1)
        frame = client.register("m", password=None)
        assert_error(frame, "auth_failed", 2)
        assert "password is required" in frame.message  # type: ignore[union-attr]
        registered(client.register("m", password="secret"))


def test_a_fresh_register_without_a_password_is_auth_failed(
    start_broker: Start, dial: Callable[..., WireClient]
) -> None:
    broker = start_broker()
    client = dial(broker)
    frame = assert_error(client.register("nopw", password=None), "auth_failed", 1)
    assert frame.message == "a password is required"
    registered(client.register("nopw"))  # the connection stays usable


def test_peer_certificate_names() -> None:
    peercert = {
        "subject": ((("organizationName", "Acme"),), (("commonName", "device-7"),)),
        "subjectAltName": (
            ("IP Address", "10.0.0.7"),
            ("email", "d7@example.com"),
            ("DNS", "d7.example.com"),
            ("URI", "spiffe://fleet/d7"),
        ),
    }
    cert = PeerCertificate.from_peercert(peercert)
    assert cert == PeerCertificate(
        "device-7", ("d7@example.com", "d7.example.com", "spiffe://fleet/d7")
    )
    assert cert.username("cn") == "device-7" and cert.username("san") == "d7@example.com"
    assert PeerCertificate.from_peercert({}) is None and PeerCertificate.from_peercert(None) is None
    nameless = PeerCertificate.from_peercert({"subject": ((("organizationName", "Acme"),),)})
    assert nameless is not None and nameless.username("cn") is None
    assert nameless.username("san") is None


# --- reload and start-up refusals ----------------------------------------------------------


def _serial(client: TlsWireClient) -> int:
    return x509.load_der_x509_certificate(served_certificate(client)).serial_number


def test_reload_serves_a_renewed_certificate_to_new_connections(
    start_broker: Start, tmp_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    ca = CertAuthority(tmp_path / "ca")
    first = ca.server()
    broker = start_broker(tls_cert=first.cert, tls_key=first.key)
    context = client_context(ca.cert_path)
    assert broker.address is not None
    with TlsWireClient(broker.address, context) as old:
        registered(old.register("old"))
        before = _serial(old)
        ca.server()  # renewed in place: a new serial, key and notAfter
        assert broker.reload_tls()
        with TlsWireClient(broker.address, context) as new:
            assert _serial(new) != before
            registered(new.register("new", username="bob", password="hunter2"))
        _round_trip(old)  # the open connection keeps its session
        assert _serial(old) == before
    (line,) = _events(caplog_info, "tls_reloaded")
    assert "not_after=" in line and "subject=" in line


def test_a_failed_reload_keeps_the_old_certificate(
    start_broker: Start, tmp_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    ca = CertAuthority(tmp_path / "ca")
    files = ca.server()
    broker = start_broker(tls_cert=files.cert, tls_key=files.key)
    context = client_context(ca.cert_path)
    assert broker.address is not None
    with TlsWireClient(broker.address, context) as client:
        before = _serial(client)
    key = files.key.read_bytes()
    ca.issue("other", common_name="other")
    files.key.write_bytes((tmp_path / "ca" / "other.key").read_bytes())  # not the cert's key
    assert not broker.reload_tls()
    (line,) = _events(caplog_info, "tls_reload_failed")
    assert "reason=" in line and "BEGIN" not in line  # never the key's text
    files.key.write_bytes(key)
    os.chmod(files.key, 0o644)
    assert not broker.reload_tls()  # a key others may read is refused at reload too
    assert "chmod 600" in _events(caplog_info, "tls_reload_failed")[-1]
    with TlsWireClient(broker.address, context) as client:
        assert _serial(client) == before
        registered(client.register("still"))


def test_start_refuses_an_open_key_or_a_mismatched_one(start_broker: Start, tmp_path: Path) -> None:
    ca = CertAuthority(tmp_path / "ca")
    files = ca.server()
    os.chmod(files.key, 0o640)
    with pytest.raises(StartupError, match=r"chmod 600 .*server\.key"):
        start_broker(tls_cert=files.cert, tls_key=files.key)
    os.chmod(files.key, 0o600)
    other = ca.issue("other", common_name="other")
    with pytest.raises(StartupError, match=r"KEY_VALUES_MISMATCH|key values mismatch"):
        start_broker(tls_cert=files.cert, tls_key=other.key)
    with pytest.raises(StartupError, match=r"No such file.*check the paths"):
        start_broker(tls_cert=tmp_path / "missing.pem", tls_key=files.key)
    with pytest.raises(StartupError, match="client CA"):
        start_broker(tls_cert=files.cert, tls_key=files.key, tls_client_ca=tmp_path / "nope.pem")
