"""Broker settings: one frozen dataclass, filled from the command line or by tests. Its defaults
are `tether serve`'s (docs/architecture.md, section 13)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tether.protocol import DEFAULT_MAX_FRAME


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 7878  # 0 picks a free port (tests)
    users_path: Path = Path("users.json")
    session_expiry: float = 300.0  # seconds a dropped session lingers
    queue_limit: int = 10_000  # messages per subscriber queue, unacked deliveries included
    queue_bytes: int = 64 * 1024 * 1024  # payload bytes per subscriber queue
    max_frame: int = DEFAULT_MAX_FRAME
    register_timeout: float = 10.0  # seconds a connection may stay unregistered
    outbound_high_water: int = 1 << 20  # bytes buffered per connection before pausing deliveries
    # How long a publisher is held back (not read) while a connected subscriber's queue is
    # full, before the oldest unsent message is dropped to make room (counted, told).
    publish_wait: float = 1.0
    auth_workers: int = 1  # threads that run bcrypt (it releases the GIL)
    auth_fail_limit: int = 5  # failures per address within auth_fail_window before rate_limited
    auth_fail_window: float = 60.0
    auth_fail_penalty: float = 1.0  # seconds before a blocked address hears of a wrong password
    log_format: str = "console"  # json | console
    # Where the store lives (SQLite, docs/architecture.md section 15): durable by default,
    # relative to the working directory; None: in memory only (`--in-memory`), no files.
    data_dir: Path | None = Path("tether-data")
    sync: str = "full"  # full | normal: SQLite's `synchronous` (what each survives: section 15)
    # Seconds a stop (SIGTERM) may take: stop accepting, close every connection, save, exit.
    shutdown_grace: float = 5.0
    # The HTTP endpoint (/health, /metrics, /api/*, the fleet page): off unless given; port 0
    # picks a free one (tests). Admin tokens: the file of their hashes (`tether token new`);
    # None: /api/* answers 401.
    http: tuple[str, int] | None = None
    admin_token_file: Path | None = None
    # --- Limits against hostile or runaway clients (issue 12; broker/cli_limits.py) ---
    # Bytes read from a connection before its `register` is answered (a larger register is
    # frame_too_large); what it sent beyond waits in its socket until `registered` is sent.
    max_register_bytes: int = 64 * 1024
    # Connections not yet registered: in all, and from one address (1,000 devices behind one
    # NAT address must be able to connect at once).
    max_pending_connections: int = 10_000
    max_pending_per_address: int = 2_000
    max_metadata: int = 8 * 1024  # encoded bytes of a register's metadata or a ping's details
    max_subscriptions: int = 1_000  # per session; over it: quota_exceeded
    max_sessions_per_user: int = 0  # 0: unlimited; over it a fresh register: quota_exceeded
    # Queued payload bytes of one session across all its topics; past it the oldest messages
    # of its largest queue are dropped (counted, told as overflow).
    session_queue_bytes: int = 256 * 1024 * 1024
    # Queued payload bytes held in memory by all sessions; None: a quarter of the memory
    # available to the process (a cgroup limit included), worked out at start.
    memory_budget: int | None = None
    store_budget: int = 10 * 1024 * 1024 * 1024  # queued bytes in the store
    auth_queue: int = 1_000  # password checks waiting at once; when full: rate_limited
    insecure_users_file: bool = False  # start even if the users file is group/other-readable
    # --- TLS and permissions (issue 13; broker/cli_security.py, docs/security.md) ---
    # With a certificate and key: `port` serves TLS, unless `tls_port` is given, which then
    # serves TLS beside the plaintext `port`. Both files are re-read on SIGHUP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int | None = None  # 0 picks a free port (tests)
    # Mutual TLS: a client certificate signed by this CA is required on the TLS listener.
    tls_client_ca: Path | None = None
    # "cn" or "san": the client certificate's name is the username (no password needed);
    # None: the certificate is required and the password is checked too.
    tls_cert_username: str | None = None
    require_tls: bool = False  # no plaintext listener at all
    # A user whose users-file entry has no publish/subscribe lists may use no topic (else: all).
    default_deny: bool = False

    def __post_init__(self) -> None:
        if self.session_expiry <= 0:
            raise ValueError("session_expiry must be > 0")
        if self.queue_limit < 1:
            raise ValueError("queue_limit must be >= 1")
        if self.max_frame < 64:
            raise ValueError("max_frame must be >= 64 bytes")
        if self.log_format not in ("json", "console"):
            raise ValueError("log_format must be json or console")
        if self.shutdown_grace <= 0:
            raise ValueError("shutdown_grace must be > 0")
        if self.sync not in ("full", "normal"):
            raise ValueError("sync must be full or normal")
        for name in (
            "max_register_bytes",
            "max_pending_connections",
            "max_pending_per_address",
            "max_metadata",
            "max_subscriptions",
            "session_queue_bytes",
            "store_budget",
            "auth_queue",
            "auth_workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_sessions_per_user < 0:
            raise ValueError("max_sessions_per_user must be >= 0 (0: unlimited)")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError("memory_budget must be >= 1")
        if self.http is not None and not 0 <= self.http[1] <= 65535:
            raise ValueError("the http port must be 0..65535")
        self._check_tls()

    def _check_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert is None:
            for name, value in (
                ("--tls-port", self.tls_port),
                ("--tls-client-ca", self.tls_client_ca),
                ("--require-tls", self.require_tls or None),
            ):
                if value is not None:
                    raise ValueError(f"{name} needs --tls-cert and --tls-key")
        if self.tls_port is not None:
            if not 0 <= self.tls_port <= 65535:
                raise ValueError("the TLS port must be 0..65535")
            if self.require_tls:
                raise ValueError(
                    "--require-tls refuses plaintext: serve TLS on --port, without --tls-port"
                )
        if self.tls_cert_username is not None:
            if self.tls_cert_username not in ("cn", "san"):
                raise ValueError("--tls-cert-username must be cn or san")
            if self.tls_client_ca is None:
                raise ValueError("--tls-cert-username needs --tls-client-ca")

    @property
    def tls(self) -> bool:
        """Some listener serves TLS."""
        return self.tls_cert is not None

    @property
    def plaintext(self) -> bool:
        """Some listener serves plaintext (`port` without TLS)."""
        return self.tls_cert is None or self.tls_port is not None
