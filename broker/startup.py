"""What `Broker.start()` does before the actors exist, and how it fails: the store's recovery,
and the one-line `StartupError` for an address that cannot be bound."""

from __future__ import annotations

import errno
import os
import socket
import threading

import structlog

from tether.broker.config import BrokerConfig
from tether.broker.store import DeleteSession, Snapshot, Store, StoreError

__all__ = ["StartupError", "bind_error", "listen_error", "recover"]

_log = structlog.get_logger("tether.server")


def recover(store: Store, now: float) -> Snapshot:
    """Load the store: sessions whose expiry deadline passed while the broker was down are
    deleted (logged with what they held); the rest come back, their queued messages left in
    the store to be read back a page at a time when their sessions resume."""
    snapshot = store.load()
    _log.info(
        "store_loaded",
        sessions=len(snapshot.sessions),
        subscriptions=sum(1 for sub in snapshot.subscriptions if sub.active),
        queued=sum(sub.queued for sub in snapshot.subscriptions),
    )
    expired = {
        s.session_id for s in snapshot.sessions if s.expires_at is not None and s.expires_at <= now
    }
    if expired:
        lost = sum(sub.queued for sub in snapshot.subscriptions if sub.session_id in expired)
        done = threading.Event()
        errors: list[StoreError] = []

        def deleted(error: StoreError | None) -> None:
            if error is not None:
                errors.append(error)
            done.set()

        store.submit(tuple(DeleteSession(sid) for sid in sorted(expired)), deleted)
        done.wait()
        if errors:
            raise errors[0]
        _log.info("sessions_expired_while_down", sessions=len(expired), discarded=lost)
        snapshot = Snapshot(
            tuple(s for s in snapshot.sessions if s.session_id not in expired),
            tuple(sub for sub in snapshot.subscriptions if sub.session_id not in expired),
        )
    return snapshot


class StartupError(Exception):
    """The broker cannot start: the message is one line saying what and what to do."""


# errno -> what to do about it, for the errors binding a listening socket gives.
_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there (another broker?): stop it or pick --port",
    errno.EADDRNOTAVAIL: "this machine has no such address: pick --host from its addresses",
    errno.EACCES: "not allowed (ports below 1024 need privileges): pick another --port",
}


def listen_error(config: BrokerConfig, exc: OSError) -> StartupError:
    where = f"{config.host}:{config.port}"
    if isinstance(exc, socket.gaierror):
        return StartupError(
            f"cannot listen on {where}: unknown host {config.host!r} ({exc.strerror}): "
            "--host takes an address or a name this machine resolves"
        )
    # asyncio's own message repeats the address; the errno's text says it plainly.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = _LISTEN_HINTS.get(exc.errno or 0, "check --host and --port")
    return StartupError(f"cannot listen on {where}: {reason}: {hint}")


def bind_error(what: str, where: tuple[str, int], option: str, exc: OSError) -> StartupError:
    """The one line for an address `option` names that cannot be bound."""
    address = f"{where[0]}:{where[1]}"
    if isinstance(exc, socket.gaierror):
        return StartupError(
            f"cannot {what} {address}: unknown host {where[0]!r} ({exc.strerror}): "
            f"{option} takes an address or a name this machine resolves"
        )
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = {
        errno.EADDRINUSE: f"another process listens there: stop it or pick another {option}",
        errno.EADDRNOTAVAIL: f"this machine has no such address: check {option}",
        errno.EACCES: f"not allowed (ports below 1024 need privileges): check {option}",
    }.get(exc.errno or 0, f"check {option}")
    return StartupError(f"cannot {what} {address}: {reason}: {hint}")
