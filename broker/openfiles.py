"""The process's open-file limit: raised at start, and how many connections fit under it.

Every connection is a file descriptor. At the soft limit `accept()` fails with EMFILE, and
whatever else wants a descriptor then (the store, a log file, a thread) fails too; so the
broker raises its soft limit to the hard one at start, and stops accepting a margin below it
(the ListenerManager), instead of running into it.
"""

from __future__ import annotations

import os

import structlog

try:
    import resource
except ImportError:  # not on POSIX: no limit we can read or raise
    resource = None  # type: ignore[assignment]

__all__ = ["FD_MARGIN", "connection_capacity", "open_fds", "raise_open_file_limit"]

_log = structlog.get_logger("tether.broker")

# Descriptors kept free below the soft limit for everything that is not a client connection
# (the store's files, the HTTP endpoint's sockets, a log rotation, a connection being refused).
FD_MARGIN = 32

# A hard limit of "unlimited" is not a number the kernel takes for a soft limit (Linux caps it
# at fs.nr_open): use this instead.
_UNLIMITED_CAP = 1 << 20


def soft_limit() -> int | None:
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log the result in one line. Returns the
    soft limit in force afterwards (None: unlimited or unknown)."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _UNLIMITED_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            _log.warning("open_file_limit_not_raised", soft=soft, hard=hard, error=str(e))
            return soft
        soft = wanted
    _log.info(
        "open_file_limit",
        soft=None if soft == resource.RLIM_INFINITY else soft,
        hard=None if hard == resource.RLIM_INFINITY else hard,
    )
    return None if soft == resource.RLIM_INFINITY else soft


def open_fds() -> int:
    """Descriptors open in this process now (0 where /proc/self/fd is not there)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connection_capacity() -> int | None:
    """How many more connections fit before the soft limit, less `FD_MARGIN`, counted from the
    descriptors open now (None: no limit known)."""
    soft = soft_limit()
    if soft is None:
        return None
    return max(1, soft - open_fds() - FD_MARGIN)
