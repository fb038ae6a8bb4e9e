"""The client's exceptions: one base class, one subclass per thing the application can act on.
Every message ends with what to do: they reach people through logs, far from their cause."""

from __future__ import annotations

from enum import StrEnum

from tether.protocol import ErrorCode

__all__ = [
    "AuthFailed",
    "ClientClosed",
    "ConnectionFailed",
    "NotAuthorized",
    "PayloadTooLarge",
    "Rejected",
    "SessionEnded",
    "SessionLost",
    "StateFileError",
    "StateFileLocked",
    "TakenOver",
    "TetherError",
    "Timeout",
    "TlsError",
    "TlsReason",
    "rejection",
]


class TetherError(Exception):
    """Base class of every error the Tether client raises."""


class ConnectionFailed(TetherError, ConnectionError):
    """The broker could not be reached, or the connection broke while a request waited."""


class ClientClosed(ConnectionFailed):
    """The client was closed (or ended for good) before the request completed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "the client is closed: create a new Client (or call connect() again) to go on"
        )


class TlsReason(StrEnum):
    """Why TLS with the broker failed: what a program may branch on (`TlsError.reason`)."""

    EXPIRED = "expired"  # the broker's certificate is out of its validity period
    UNKNOWN_CA = "unknown_ca"  # not signed by the CA given in `ca` (or the system store)
    HOSTNAME_MISMATCH = "hostname_mismatch"  # it does not name the host dialled
    VERIFY_FAILED = "verify_failed"  # any other verification failure
    CERTIFICATE_REQUIRED = "certificate_required"  # the broker demands a client certificate
    CERTIFICATE_REFUSED = "certificate_refused"  # the broker refused the client certificate
    HANDSHAKE_FAILED = "handshake_failed"  # no common protocol or cipher, or an alert
    NOT_TLS = "not_tls"  # the peer does not speak TLS on that port
    LOCAL_FILES = "local_files"  # the CA, certificate or key files cannot be used


class TlsError(ConnectionFailed):
    """TLS with the broker failed in a way another attempt would repeat (a certificate that
    does not verify, a client certificate refused or missing, a peer that does not speak
    TLS), or the local CA, certificate or key files cannot be used. Never retried: the client
    stops, as for a rejected login. `reason` is a `TlsReason`, `detail` what the `ssl`
    module said."""

    reason: TlsReason
    detail: str

    def __init__(self, reason: TlsReason, detail: str, message: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(message)


class Timeout(TetherError, TimeoutError):
    """No answer within the request timeout. The request may still take effect later."""


class Rejected(TetherError):
    """The broker answered a request with an error; `code` is the broker's error code (an
    `ErrorCode`, or a plain str for a code newer than this client)."""

    code: str
    broker_message: str

    def __init__(self, code: str, broker_message: str, *, hint: str | None = None) -> None:
        self.code = code
        self.broker_message = broker_message
        text = f"the broker refused the request ({code}: {broker_message})"
        super().__init__(f"{text}: {hint or _HINTS.get(code, _DEFAULT_HINT)}")


class AuthFailed(Rejected):
    """Wrong username or password (the broker does not say which). The client stops."""

    def __init__(self, username: str, broker_message: str = "wrong username or password") -> None:
        super().__init__(
            ErrorCode.AUTH_FAILED,
            broker_message,
            hint=f"check the password of user {username!r}, and the name, and that they are in "
            "the users file the broker was started with (--users); it picks up a change to "
            "that file within a second",
        )


class NotAuthorized(Rejected):
    """The broker refused a request this user may not make (`not_authorized`): a `subscribe`
    to a `$sys/...` topic or a `stats` by a user not marked admin, or a `register` with a
    client id outside the user's allowed prefixes. Nothing was done; the connection (and the
    session, if any) goes on."""

    def __init__(self, broker_message: str) -> None:
        super().__init__(ErrorCode.NOT_AUTHORIZED, broker_message)


def rejection(code: str, broker_message: str) -> Rejected:
    """The error for a request the broker answered with `error` `code`: the most specific
    `Rejected` the client has for it."""
    if code == ErrorCode.NOT_AUTHORIZED:
        return NotAuthorized(broker_message)
    return Rejected(code, broker_message)


class PayloadTooLarge(TetherError, ValueError):
    """A frame larger than the limit: a publish the broker would refuse (raised by `publish()`
    before anything is sent, or given to the request when the broker refused it), or a
    delivery larger than this client accepts. `size` is the frame's bytes as the length
    prefix counts them, `limit` the broker's frame limit (its `--max-frame`)."""

    size: int
    limit: int

    def __init__(self, size: int, limit: int, message: str | None = None) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            message
            or f"the message makes a frame of {size} bytes, over the broker's limit of {limit} "
            "bytes: send it in smaller parts, or ask for a larger `tether serve --max-frame`"
        )


class TakenOver(TetherError):
    """Another connection resumed or took over this session. The client stops for good."""

    def __init__(self, client_id: str) -> None:
        super().__init__(
            f"another client took over the session of client_id {client_id!r}, so this one "
            "stopped: make sure only one process uses this client_id (and state file)"
        )


class SessionEnded(TakenOver):
    """The broker ended this session (`session_ended`): its user was removed from the users
    file, or its sessions were revoked (`tether user add --replace --end-sessions`). Like a
    takeover, the client stops for good and does not reconnect (same event and callback)."""

    def __init__(self, client_id: str, message: str = "") -> None:
        TetherError.__init__(
            self,
            f"the broker ended the session of client_id {client_id!r}, so this client stopped"
            + (f" ({message})" if message else "")
            + ": its user was removed or its password changed with --end-sessions; "
            "log in again with valid credentials",
        )


class SessionLost(TetherError):
    """The broker no longer knew the session when the client resumed it (`unknown_session`);
    a fresh one replaced it. Queued messages and whatever the old session had not delivered
    are gone. The client cannot tell why: the message lists what makes a broker forget one."""

    old_session_id: str | None

    def __init__(self, old_session_id: str | None, *, expiry: float | None = None) -> None:
        self.old_session_id = old_session_id
        which = "the session" if old_session_id is None else f"session {old_session_id}"
        away = "away longer than its expiry" + ("" if expiry is None else f" ({expiry:g} s)")
        super().__init__(
            f"{which} is gone: the broker answered unknown_session to the "
            "resume; a new session replaced it and messages queued for the old one are lost. "
            f"A broker forgets a session that was unregistered, taken over, {away}, or that "
            "its store no longer holds (a broker run with --in-memory, or on another "
            "--data-dir): if this was unexpected, check the broker's --session-expiry and "
            "--data-dir"
        )


class StateFileError(TetherError):
    """The state file cannot be read or does not belong to this client."""


class StateFileLocked(StateFileError):
    """Another live process (or client) uses this state file. `pid` is the holder's process
    id when it could be read, else None."""

    path: str
    pid: int | None

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"the state file {path} is in use by {holder}: only one client may use a state "
            "file at a time: stop the other one, or give this one its own state file and "
            "client_id"
        )


_DEFAULT_HINT = "see docs/protocol.md, section 5, for what the code means"
_HINTS: dict[str, str] = {
    ErrorCode.BAD_REQUEST: "the client sent something the broker does not accept; check the topic "
    "(1..256 characters, no leading '$' for publish) and the payload size",
    ErrorCode.CONFLICT: "another session holds this client_id: resume it with the same state file, "
    "pass takeover=True to replace it, or wait until it expires",
    ErrorCode.RATE_LIMITED: "too many failed logins from this address: wait a minute and check the "
    "password",
    ErrorCode.NOT_REGISTERED: "the connection was not registered yet; this is a client bug, please "
    "report it",
    ErrorCode.UNKNOWN_SESSION: "the session is gone; the client registers afresh by itself",
    ErrorCode.NOT_AUTHORIZED: "only users marked admin (tether user add NAME --admin) may "
    "subscribe to $sys topics or ask stats, and a user given client-id prefixes "
    "(--client-id-prefix) may register only such ids; the broker's users file decides",
}
