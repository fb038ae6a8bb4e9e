"""Error codes and exception hierarchy of the Tether wire protocol."""

from __future__ import annotations

import enum

__all__ = [
    "FATAL_CODES",
    "BadFrame",
    "BadRequest",
    "ErrorCode",
    "FrameTooLarge",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(enum.StrEnum):
    """Values of the `code` field of an `error` frame."""

    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_REQUEST = "bad_request"
    NOT_REGISTERED = "not_registered"
    AUTH_FAILED = "auth_failed"
    UNKNOWN_SESSION = "unknown_session"
    CONFLICT = "conflict"
    TAKEN_OVER = "taken_over"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    # The broker could not store what the request needs (a failed commit): not done, retry.
    UNAVAILABLE = "unavailable"
    # The broker ended the session (its user was removed, or its sessions were revoked): fatal.
    SESSION_ENDED = "session_ended"
    # A `subscribe` to `$sys/...` from a user not marked admin: not done; not fatal.
    NOT_AUTHORIZED = "not_authorized"
    # A per-session or per-user quota would be exceeded (subscriptions, sessions): non-fatal.
    QUOTA_EXCEEDED = "quota_exceeded"


# After one of these the broker closes the connection: the byte stream can no longer be
# trusted (framing errors) or the session has moved on (takeover, keepalive timeout, ended).
FATAL_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.BAD_FRAME,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.TAKEN_OVER,
        ErrorCode.TIMEOUT,
        ErrorCode.SESSION_ENDED,
    }
)


class ProtocolError(Exception):
    """Root of every exception raised by the `protocol` package."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; `code` is what to answer it with in an `error` frame."""

    code: ErrorCode
    message: str
    req: int | None

    def __init__(self, message: str, *, code: ErrorCode, req: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.req = req

    @property
    def fatal(self) -> bool:
        """True when the connection must be closed after reporting this error."""
        return self.code in FATAL_CODES

    def __str__(self) -> str:
        return self.message


class BadFrame(RemoteProtocolError):
    """The byte stream is not valid framing/msgpack; fatal, the stream cannot be resynced."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.BAD_FRAME)


class FrameTooLarge(RemoteProtocolError):
    """A length prefix exceeds the decoder's limit; fatal."""

    size: int
    limit: int

    def __init__(self, message: str | None = None, *, size: int, limit: int) -> None:
        if message is None:
            message = f"frame of {size} bytes exceeds the limit of {limit} bytes"
        super().__init__(message, code=ErrorCode.FRAME_TOO_LARGE)
        self.size = size
        self.limit = limit


class BadRequest(RemoteProtocolError):
    """A well-formed frame with an unknown type or invalid fields; not fatal."""

    frame_type: str | None
    field: str | None

    def __init__(
        self,
        message: str,
        *,
        req: int | None = None,
        frame_type: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, code=ErrorCode.BAD_REQUEST, req=req)
        self.frame_type = frame_type
        self.field = field


class LocalProtocolError(ProtocolError, ValueError):
    """Our own code misused the library, e.g. built a frame with invalid field values."""

    frame_type: str | None
    field: str | None

    def __init__(
        self, message: str, *, frame_type: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.frame_type = frame_type
        self.field = field
