"""`ClientOptions`: every setting of a client, shared by the blocking and the asyncio one."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tether.protocol import DEFAULT_MAX_FRAME, HEALTH_STATUSES

from .backoff import Backoff
from .errors import SessionLost, TakenOver, TetherError
from .events import Disconnected, Dropped, Reconnected
from .machine import MachineConfig
from .tls import TlsPeer, client_context

__all__ = ["ClientOptions", "Health", "HealthSource"]


@dataclass(frozen=True, slots=True)
class Health:
    """A health report, sent with every keepalive ping."""

    status: str = "healthy"  # healthy | degraded | unhealthy
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in HEALTH_STATUSES:
            raise ValueError(
                f"health status must be one of {', '.join(sorted(HEALTH_STATUSES))}, "
                f"got {self.status!r}"
            )


# What a health callable may return: a Health, or just a status string.
HealthSource = Callable[[], "Health | str"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    client_id: str
    username: str
    # Needed for a fresh session, unless the broker logs the client in by its certificate;
    # a resume does without.
    password: str | None = None
    host: str = "127.0.0.1"
    port: int = 7878
    # TLS: True for the `ssl` module's default client context (TLS 1.2 at least), built from
    # `ca` (the trust anchor; else the system's store), `cert` and `key` (a client
    # certificate); or a context of the application's, used as is. `ca`, `cert` or `key`
    # alone imply True.
    tls: bool | ssl.SSLContext | None = None
    ca: str | os.PathLike[str] | None = None
    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None  # None: the key is in the `cert` file
    server_hostname: str | None = None  # the name the broker's certificate must carry: host
    keepalive: int = 30  # seconds between pings; the broker drops us after 1.5x silence
    metadata: Mapping[str, Any] = field(default_factory=dict)  # name, kind, version, tags, ...
    # Replace an existing session of this client_id at the first registration. Never used
    # again after that: two clients must not steal one session back and forth.
    takeover: bool = False
    state_file: str | os.PathLike[str] | None = None  # resume across process restarts
    request_timeout: float = 30.0  # per request waiting for the broker's answer
    # How long connect() waits for a first session while the broker does not answer; a
    # refused connection or an unknown host fails at once.
    connect_timeout: float = 30.0
    backoff_base: float = 0.1
    backoff_cap: float = 30.0
    # The broker's --max-frame, for a broker that does not announce it in `registered`.
    max_frame: int = DEFAULT_MAX_FRAME
    max_buffer: int = 8 << 20  # bytes queued for sending before publish() blocks
    health: HealthSource | None = None
    # Called from the client's dispatcher (in order with the messages), never concurrently.
    on_session_lost: Callable[[SessionLost], object] | None = None
    on_dropped: Callable[[Dropped], object] | None = None
    on_taken_over: Callable[[TakenOver], object] | None = None
    on_error: Callable[[TetherError], object] | None = None
    on_disconnected: Callable[[Disconnected], object] | None = None
    on_reconnected: Callable[[Reconnected], object] | None = None

    def __post_init__(self) -> None:
        for name in ("request_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if self.max_buffer < 1:
            raise ValueError("max_buffer must be >= 1 byte")
        self.backoff  # noqa: B018 - validates base and cap now, not at the first reconnect
        files = self.ca is not None or self.cert is not None or self.key is not None
        if self.tls is False and files:
            raise ValueError("ca, cert and key are for TLS: not with tls=False")
        if isinstance(self.tls, ssl.SSLContext) and files:
            raise ValueError(
                "an SSLContext given as tls is used as is: load ca, cert and key into it "
                "instead of passing them"
            )
        if self.key is not None and self.cert is None:
            raise ValueError("a key without its certificate: give cert too")
        if self.server_hostname is not None and not self.uses_tls:
            raise ValueError("server_hostname is for TLS: give tls=True (or ca, cert, key)")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls) or self.ca is not None or self.cert is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context to dial with (None: plaintext). Raises `TlsError` for CA, certificate
        or key files that cannot be used."""
        if isinstance(self.tls, ssl.SSLContext):
            return self.tls
        if not self.uses_tls:
            return None
        return client_context(ca=self.ca, cert=self.cert, key=self.key)

    @property
    def tls_hostname(self) -> str:
        return self.server_hostname if self.server_hostname is not None else self.host

    def tls_peer(self) -> TlsPeer:
        return TlsPeer(
            f"the broker at {self.host}:{self.port}", self.tls_hostname, self.cert is not None
        )

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.backoff_base, self.backoff_cap)

    def machine_config(self) -> MachineConfig:
        return MachineConfig(
            client_id=self.client_id,
            username=self.username,
            password=self.password,
            keepalive=self.keepalive,
            metadata=dict(self.metadata),
            takeover=self.takeover,
            max_frame=self.max_frame,
        )


def read_health(source: HealthSource | None) -> Health | None:
    """The application's health report, or None when it has no callable."""
    if source is None:
        return None
    value = source()
    return value if isinstance(value, Health) else Health(value)
