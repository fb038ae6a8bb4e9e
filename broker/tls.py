"""TLS on the broker's side: the server contexts, the start-up checks of the key and
certificate files, their reload on SIGHUP, and who a client certificate names.

TLS terminates in the broker process, with the standard library's `ssl` (OpenSSL) and its
secure defaults (`ssl.create_default_context`), TLS 1.2 at least.

Reload, theory of operation: a renewal is first loaded into a fresh context built from the
files as they are now (the same checks as at start: key mode, certificate and key that
match). Only if that succeeds does it go live: the broker's listener swaps to the fresh
context for the handshakes that follow (`ListenerManager`), and the HTTP endpoint's context,
which aiohttp holds, loads the same files on its own loop. Either way a connection already
open keeps the certificate it shook hands with; a failed reload keeps the old one in use.
"""

from __future__ import annotations

import asyncio.sslproto
import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tether.broker.config import BrokerConfig

__all__ = [
    "PeerCertificate",
    "TlsFileError",
    "certificate_summary",
    "check_key_file",
    "server_context",
]

_log = structlog.get_logger("tether.tls")

# subjectAltName entry types that may name a user, as `getpeercert()` spells them.
_NAME_TYPES = ("DNS", "email", "URI")

# asyncio's SSL transport gives every connection a zeroed read buffer of `max_size` (256 KiB):
# resident at once, 287 KiB per TLS session against 9 KiB in plaintext (2.8 GiB for 10,000
# devices). Two full TLS records (16 KiB of plaintext each, plus framing) are plenty to read
# at a time; a larger read just takes one more loop turn. There is no per-transport knob.
SSL_READ_SIZE = 34 * 1024


def limit_ssl_read_buffers() -> None:
    """Make asyncio's SSL transports (this process's) read at most SSL_READ_SIZE at a time."""
    asyncio.sslproto.SSLProtocol.max_size = SSL_READ_SIZE


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot be used: one line saying what and what to do."""


def check_key_file(path: Path) -> None:
    """Refuse a private key that group or others may read or write (TlsFileError)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise TlsFileError(f"cannot read TLS key {path}: {exc.strerror or exc}") from None
    if mode & 0o066:
        raise TlsFileError(
            f"TLS key {path} is open to group or others (mode {mode:04o}): run `chmod 600 {path}`"
        )


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context serving `cert` with `key`; with `client_ca`, a client certificate
    signed by it is required. Raises TlsFileError with the file and the reason."""
    check_key_file(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        hint = (
            "both must be PEM files and the key the certificate's"
            if isinstance(exc, ssl.SSLError)
            else "check the paths, and that the broker's user may read both files"
        )
        raise TlsFileError(
            f"cannot load TLS certificate {cert} with key {key}: {_reason(exc)}: {hint}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ValueError) as exc:
            raise TlsFileError(
                f"cannot load the client CA {client_ca}: {_reason(exc)}: it must be a PEM file "
                "of CA certificates"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def broker_context(config: BrokerConfig) -> ssl.SSLContext:
    """The context of the broker's TLS listener (client CA included)."""
    assert config.tls_cert is not None and config.tls_key is not None
    return server_context(config.tls_cert, config.tls_key, config.tls_client_ca)


def http_context(config: BrokerConfig) -> ssl.SSLContext:
    """The HTTPS endpoint's: the same certificate, no client certificate asked for (the admin
    token authenticates there)."""
    assert config.tls_cert is not None and config.tls_key is not None
    return server_context(config.tls_cert, config.tls_key)


def certificate_summary(cert: Path) -> dict[str, Any]:
    """The subject, serial and notAfter of the first certificate in `cert`, for the log; empty
    if this Python cannot decode it (the decoder is the ssl module's, undocumented)."""
    import _ssl

    decode = getattr(_ssl, "_test_decode_cert", None)
    if decode is None:
        return {}
    try:
        info: Mapping[str, Any] = decode(str(cert))
    except (OSError, ValueError):
        return {}
    subject = ", ".join(f"{key}={value}" for rdn in info.get("subject", ()) for key, value in rdn)
    return {
        "subject": subject,
        "serial": info.get("serialNumber"),
        "not_after": info.get("notAfter"),
    }


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """Who a verified client certificate names: its subject's commonName, and its
    subjectAltName entries of type DNS, email and URI (values, in certificate order)."""

    common_name: str | None
    alt_names: tuple[str, ...] = ()

    def username(self, mode: str) -> str | None:
        """The user this certificate logs in as under `--tls-cert-username mode`."""
        if mode == "cn":
            return self.common_name
        if mode == "san":
            return self.alt_names[0] if self.alt_names else None
        raise ValueError(f"unknown certificate username mode {mode!r}")

    @classmethod
    def from_peercert(cls, peercert: Mapping[str, Any] | None) -> PeerCertificate | None:
        """From `getpeercert()`'s dict; None when there is no verified certificate (an empty
        dict is what a context that does not verify clients answers)."""
        if not peercert:
            return None
        common_name: str | None = None
        for rdn in peercert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName" and value:
                    # Several: the last is the most specific (as OpenSSL's host checks take it).
                    common_name = str(value)
        alt_names = tuple(
            str(value)
            for kind, value in peercert.get("subjectAltName", ())
            if kind in _NAME_TYPES and value
        )
        return cls(common_name=common_name, alt_names=alt_names)
