"""TLS for the tests' raw wire client: a `WireClient` whose socket is wrapped by the standard
library's `ssl` (no client library), and the client contexts to wrap it with."""

from __future__ import annotations

import ssl
from pathlib import Path

from bench.certs import CertFiles
from tests.wire import Closed, WireClient

__all__ = ["REFUSED", "TlsWireClient", "client_context", "served_certificate"]

# What a client sees when the broker refuses its handshake: an alert during the handshake, or
# (TLS 1.3, where the client finishes first) on its first read, or the connection closed.
REFUSED = (ssl.SSLError, Closed, ConnectionError)


def client_context(ca: Path, cert: CertFiles | None = None) -> ssl.SSLContext:
    """Verify the broker against `ca`; present `cert` (mutual TLS) if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


class TlsWireClient(WireClient):
    """The handshake happens in the constructor (it raises what the handshake raises)."""

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        *,
        timeout: float = 5.0,
        server_hostname: str = "localhost",
    ) -> None:
        super().__init__(address, timeout=timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except BaseException:
            self.sock.close()
            raise

    @property
    def tls(self) -> ssl.SSLSocket:
        assert isinstance(self.sock, ssl.SSLSocket)
        return self.sock


def served_certificate(client: TlsWireClient) -> bytes:
    """The DER certificate the broker shook hands with."""
    der = client.tls.getpeercert(binary_form=True)
    assert der is not None
    return der
