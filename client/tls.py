"""TLS for the client: the `ssl.SSLContext` built from the options, what a failure means
(`TlsError`, with the reason in a word), and `TlsStream`, TLS over a socket for the blocking
client.

Why `TlsStream` and not `ssl.SSLSocket`: the blocking client reads in one thread and writes in
another, and an `SSLSocket` is not safe for that (OpenSSL's SSL objects must not be used by
two threads at once: CPython issues 76714 and 151508). So the TLS state is an `ssl.SSLObject`
over memory buffers, touched only under a lock, and the socket under it moves the encrypted
bytes: the reader reads it with no lock held; whoever takes encrypted bytes out of the
object sends them before anyone else may take more (`_send_lock`), so records go out in the
order they were made.

Which failures are final (never retried): a certificate that does not verify, an alert from
the broker (it demands or refused a client certificate, or no protocol could be agreed), a
peer that does not speak TLS; and, before the first session, a broker that closes the
connection right after the handshake without a word, which is how an asyncio server refuses
a client certificate under TLS 1.3 (it sends no alert). A reset or an EOF *during* the
handshake is not final: a broker over its pending-connection bound does just that.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass

from .errors import TlsError, TlsReason

__all__ = [
    "HandshakeCut",
    "TlsPeer",
    "TlsStream",
    "client_context",
    "closed_after_handshake",
    "describe_ssl_error",
    "tls_failure",
]

PathLike = str | os.PathLike[str]

# OpenSSL's X509_V_ERR_* codes, as `SSLCertVerificationError.verify_code` gives them.
_VERIFY_REASONS: dict[int, TlsReason] = {
    9: TlsReason.EXPIRED,  # not yet valid
    10: TlsReason.EXPIRED,
    2: TlsReason.UNKNOWN_CA,
    18: TlsReason.UNKNOWN_CA,  # self-signed leaf
    19: TlsReason.UNKNOWN_CA,  # self-signed CA in the chain
    20: TlsReason.UNKNOWN_CA,
    21: TlsReason.UNKNOWN_CA,
    62: TlsReason.HOSTNAME_MISMATCH,
    64: TlsReason.HOSTNAME_MISMATCH,  # IP address mismatch
}

# `SSLError.reason` of the alerts a broker sends, and of bytes that are not TLS at all.
_ALERT_REASONS: dict[str, TlsReason] = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": TlsReason.CERTIFICATE_REQUIRED,
    "SSLV3_ALERT_BAD_CERTIFICATE": TlsReason.CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": TlsReason.CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": TlsReason.CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": TlsReason.CERTIFICATE_REFUSED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": TlsReason.CERTIFICATE_REFUSED,
    "TLSV1_ALERT_UNKNOWN_CA": TlsReason.CERTIFICATE_REFUSED,
    "TLSV1_ALERT_ACCESS_DENIED": TlsReason.CERTIFICATE_REFUSED,
    "TLSV1_ALERT_DECRYPT_ERROR": TlsReason.CERTIFICATE_REFUSED,
    "WRONG_VERSION_NUMBER": TlsReason.NOT_TLS,
    "RECORD_LAYER_FAILURE": TlsReason.NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": TlsReason.NOT_TLS,
    "UNKNOWN_PROTOCOL": TlsReason.NOT_TLS,
    "HTTP_REQUEST": TlsReason.NOT_TLS,
    "UNEXPECTED_RECORD": TlsReason.NOT_TLS,
    "RECORD_LENGTH_MISMATCH": TlsReason.NOT_TLS,
    "TLSV1_RECORD_OVERFLOW": TlsReason.NOT_TLS,
}

_NOISE = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] | \(_ssl\.c:\d+\)$")


def _no_passphrase() -> bytes:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key.
    raise TlsError(
        TlsReason.LOCAL_FILES,
        "encrypted key",
        "the client key is encrypted: give an unencrypted key file (mode 0600), e.g. "
        "`openssl pkey -in KEY -out KEY.plain`",
    )


def client_context(
    *, ca: PathLike | None = None, cert: PathLike | None = None, key: PathLike | None = None
) -> ssl.SSLContext:
    """The `ssl` module's default client context (the broker's certificate verified, its name
    checked), TLS 1.2 at least; `ca` as the trust anchor (else the system's store), `cert` and
    `key` as the client certificate. Files that cannot be used raise `TlsError`
    (`local_files`), before anything is dialled."""

    def refuse(detail: str, message: str) -> TlsError:
        return TlsError(TlsReason.LOCAL_FILES, detail, message)

    try:
        context = ssl.create_default_context(cafile=os.fspath(ca) if ca is not None else None)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            detail = describe_ssl_error(exc)
            raise refuse(
                detail,
                f"the CA file {ca} holds no usable certificate ({detail}): give the PEM file "
                "of the CA that signed the broker's certificate",
            ) from None
        detail = exc.strerror or str(exc)
        raise refuse(detail, f"cannot read the CA file {ca} ({detail}): check the path") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except ssl.SSLError as exc:
            detail = describe_ssl_error(exc)
            if exc.reason == "KEY_VALUES_MISMATCH":
                message = (
                    f"the key {key or cert} does not belong to the certificate {cert}: give the "
                    "key the certificate was issued for"
                )
            else:
                message = (
                    f"cannot load the client certificate {cert} and its key {key or cert} "
                    f"({detail}): both must be PEM files, the key unencrypted"
                )
            raise refuse(detail, message) from None
        except OSError as exc:
            detail = exc.strerror or str(exc)
            raise refuse(
                detail,
                f"cannot read the client certificate {cert} or its key {key or cert} "
                f"({detail}): check the paths",
            ) from None
    return context


def describe_ssl_error(exc: ssl.SSLError) -> str:
    """What the `ssl` module said, without OpenSSL's codes around it."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return _NOISE.sub("", text).strip() or str(exc.reason or exc)


def tls_failure(
    exc: BaseException, *, where: str, server_hostname: str, has_cert: bool
) -> TlsError | None:
    """The `TlsError` for an exception raised by a TLS handshake or a read just after it,
    when another attempt would fail the same way; None when it may be worth retrying (a
    timeout, a reset or an EOF: the network, or a busy broker). `where` names the peer
    (`the broker at HOST:PORT`)."""
    if isinstance(exc, TlsError):
        return exc
    if not isinstance(exc, ssl.SSLError) or isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
    ):
        return None
    detail = describe_ssl_error(exc)
    fail = f"TLS with {where} failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(exc.verify_code, TlsReason.VERIFY_FAILED)
        hint = {
            TlsReason.EXPIRED: "the broker's certificate is out of its validity period: renew "
            "it (the broker reloads it on SIGHUP), or check this machine's clock",
            TlsReason.UNKNOWN_CA: "the broker's certificate is not signed by a CA this client "
            "trusts: give the CA that signed it (ca=PATH, --tls-ca PATH)",
            TlsReason.HOSTNAME_MISMATCH: "the broker's certificate does not name "
            f"{server_hostname!r}: dial a name it was issued for, or give that name as "
            "server_hostname",
        }.get(reason, "the broker's certificate did not verify: check it against the CA given")
        return TlsError(reason, detail, f"{fail}: certificate verify failed ({detail}): {hint}")
    reason = _ALERT_REASONS.get(str(exc.reason), TlsReason.HANDSHAKE_FAILED)
    if reason is TlsReason.CERTIFICATE_REQUIRED:
        hint = (
            "the broker demands a client certificate (it runs with --tls-client-ca): give "
            "cert= and key= (--tls-cert, --tls-key)"
        )
    elif reason is TlsReason.CERTIFICATE_REFUSED:
        hint = _refused_hint(has_cert)
    elif reason is TlsReason.NOT_TLS:
        hint = (
            "the broker does not speak TLS on this port: use the port of its TLS listener "
            "(tether serve --tls-cert, --tls-port), or connect without TLS"
        )
    else:
        hint = "no TLS connection could be agreed: both sides must allow TLS 1.2 or later" + (
            ""
            if has_cert
            else "; a broker that demands a client certificate answers so too: "
            "give cert= and key= (--tls-cert, --tls-key)"
        )
    return TlsError(reason, detail, f"{fail} ({detail}): {hint}")


def closed_after_handshake(
    *, where: str, has_cert: bool, during_handshake: bool = False
) -> TlsError:
    """The broker completed the handshake, then closed the connection before a single byte:
    under TLS 1.3 a server checks the client certificate only then, and asyncio's closes
    without an alert when it refuses one (or when none came and it demands one). Under TLS
    1.2 it closes during the handshake instead (`during_handshake`)."""
    if has_cert:
        reason, hint = TlsReason.CERTIFICATE_REFUSED, _refused_hint(True)
    else:
        reason = TlsReason.CERTIFICATE_REQUIRED
        hint = (
            "most likely the broker demands a client certificate (it runs with "
            "--tls-client-ca): give cert= and key= (--tls-cert, --tls-key)"
        )
    detail = (
        "closed by the broker during the handshake, after its hello"
        if during_handshake
        else "closed by the broker after the handshake, before answering"
    )
    return TlsError(reason, detail, f"TLS with {where} failed ({detail}): {hint}")


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """The broker a TLS client dials, for its failures' messages: `where` names it (`the
    broker at HOST:PORT`),
    `server_hostname` the name its certificate must carry, `has_cert` whether the client
    presents a certificate of its own."""

    where: str
    server_hostname: str
    has_cert: bool

    def failure(self, exc: BaseException, *, had_session: bool = False) -> TlsError | None:
        """`tls_failure` for this broker: final, or None (worth retrying). A handshake the
        broker cut after its hello (TLS 1.2's way to refuse a client certificate, from an
        asyncio server) is final before the first session."""
        if isinstance(exc, HandshakeCut) and exc.after_hello and not had_session:
            return closed_after_handshake(
                where=self.where, has_cert=self.has_cert, during_handshake=True
            )
        return tls_failure(
            exc, where=self.where, server_hostname=self.server_hostname, has_cert=self.has_cert
        )

    def ended_unanswered(
        self, error: BaseException | None, *, had_session: bool
    ) -> TlsError | None:
        """Why a TLS connection that ended before a single byte came is final: an alert from
        the broker; or, before the first session, a close without a word (how a broker
        refuses a client certificate under TLS 1.3). None: worth retrying."""
        if isinstance(error, ssl.SSLError) and (final := self.failure(error)) is not None:
            return final
        if had_session or isinstance(error, TimeoutError):
            return None
        return closed_after_handshake(where=self.where, has_cert=self.has_cert)


def _refused_hint(has_cert: bool) -> str:
    if not has_cert:
        return (
            "the broker demands a client certificate (it runs with --tls-client-ca): give "
            "cert= and key= (--tls-cert, --tls-key)"
        )
    return (
        "the broker refused this client's certificate: it must be signed by the CA the broker "
        "trusts (--tls-client-ca), be within its validity period and allow client "
        "authentication"
    )


class HandshakeCut(ssl.SSLEOFError):
    """The peer closed the connection during the handshake; `after_hello`: once it had sent
    something (a TLS server's hello), not at once (a broker over its pending-connection bound
    closes at accept)."""

    def __init__(self, after_hello: bool) -> None:
        self.after_hello = after_hello
        what = "after its hello" if after_hello else "before answering"
        super().__init__(8, f"the peer closed the connection during the TLS handshake, {what}")


class TlsStream:
    """TLS over a connected socket, with the methods of a socket the blocking client uses
    (`recv`, `sendall`, `shutdown`, `close`): safe for one reading thread and one writing
    thread at once, unlike `ssl.SSLSocket` (see the module's docstring)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._lock = threading.Lock()  # the SSLObject and its buffers
        self._send_lock = threading.Lock()  # taking encrypted bytes out, and sending them
        self._read_size = 64 * 1024
        self._heard = False  # the peer sent something during the handshake

    def handshake(self) -> None:
        """Run the handshake (within the socket's timeout). Raises what `ssl` raises, or
        `ssl.SSLEOFError` when the peer closes the connection during it."""
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._feed_or_eof()
            except ssl.SSLError:
                # Our alert (unknown CA, bad certificate...) tells the broker why, in its log.
                with contextlib.suppress(OSError):
                    self._flush()
                raise

    @property
    def version(self) -> str | None:
        return self._tls.version()

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes of plaintext (all that is decrypted so far, not one record at a
        time); b"" once the connection ended."""
        while True:
            with self._lock:
                data = self._decrypted(size)
                reply = self._outgoing.pending > 0
            if reply:
                self._flush()  # (a key update wants an answer)
            if data is None:
                return b""  # close_notify
            if data:
                return data
            raw = self._sock.recv(self._read_size)
            if not raw:
                return b""
            with self._lock:
                self._incoming.write(raw)

    def _decrypted(self, size: int) -> bytes | None:
        """What the records received so far hold, up to `size` bytes; None after the peer's
        close_notify. Called with the lock held."""
        parts: list[bytes] = []
        got = 0
        while got < size:
            try:
                part = self._tls.read(size - got)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                if not parts:
                    return None
                break
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._lock:
                view = memoryview(data)
                while view:
                    view = view[self._tls.write(view) :]
                out = self._outgoing.read()
            self._sock.sendall(out)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                out = self._outgoing.read()
            if out:
                self._sock.sendall(out)

    def _feed_or_eof(self) -> None:
        try:
            raw = self._sock.recv(self._read_size)
        except ConnectionResetError:
            raw = b""
        if not raw:
            raise HandshakeCut(self._heard)
        self._heard = True
        with self._lock:
            self._incoming.write(raw)
