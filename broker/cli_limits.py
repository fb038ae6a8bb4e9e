"""`tether serve`'s limits against hostile or runaway clients (issue 12): what a connection
may hold before it registers, what a session and a user may hold, the memory and store budgets,
and the login queue. Each is a BrokerConfig setting; docs/operations.md says what each bounds."""

from __future__ import annotations

import argparse
from typing import Any

from tether.broker.config import BrokerConfig
from tether.cli_common import positive, size

__all__ = ["add_limit_arguments", "limit_settings"]

_DEFAULT = BrokerConfig()


def _count(text: str) -> int:
    """An argument type: an int >= 0 (0: unlimited, where the option says so)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_limit_arguments(serve: argparse.ArgumentParser) -> None:
    limits = serve.add_argument_group(
        "limits", "bounds that keep one client, user or address from exhausting the broker"
    )
    limits.add_argument(
        "--max-register-bytes",
        type=size,
        default=_DEFAULT.max_register_bytes,
        metavar="SIZE",
        help="bytes read from a connection before its register is answered; a larger register "
        "frame is frame_too_large (default: 64KiB)",
    )
    limits.add_argument(
        "--max-pending-connections",
        type=positive(int),
        default=_DEFAULT.max_pending_connections,
        metavar="N",
        help="connections not yet registered, in all (default: %(default)s)",
    )
    limits.add_argument(
        "--max-pending-per-address",
        type=positive(int),
        default=_DEFAULT.max_pending_per_address,
        metavar="N",
        help="connections not yet registered from one address; over it new ones are closed at "
        "once (default: %(default)s)",
    )
    limits.add_argument(
        "--max-metadata",
        type=size,
        default=_DEFAULT.max_metadata,
        metavar="SIZE",
        help="encoded size of a register's metadata or a ping's details (default: 8KiB)",
    )
    limits.add_argument(
        "--max-subscriptions",
        type=positive(int),
        default=_DEFAULT.max_subscriptions,
        metavar="N",
        help="subscriptions per session; the subscribe over it is quota_exceeded "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--max-sessions-per-user",
        type=_count,
        default=_DEFAULT.max_sessions_per_user,
        metavar="N",
        help="sessions one user may hold; the fresh register over it is quota_exceeded "
        "(default: 0, unlimited)",
    )
    limits.add_argument(
        "--session-queue-bytes",
        type=size,
        default=_DEFAULT.session_queue_bytes,
        metavar="SIZE",
        help="bytes one session's queues hold across its topics; past it the oldest of its "
        "largest queue are dropped (default: 256MiB)",
    )
    limits.add_argument(
        "--memory-budget",
        type=size,
        default=None,
        metavar="SIZE",
        help="queued bytes held in memory, all sessions together; past it backlogs move to the "
        "store, then the oldest of the largest queues are dropped (default: a quarter of the "
        "memory available to the process)",
    )
    limits.add_argument(
        "--store-budget",
        type=size,
        default=_DEFAULT.store_budget,
        metavar="SIZE",
        help="queued bytes in the store; past it the oldest of the largest queues are dropped "
        "(default: 10GiB)",
    )
    limits.add_argument(
        "--auth-queue",
        type=positive(int),
        default=_DEFAULT.auth_queue,
        metavar="N",
        help="password checks waiting at once; when full a fresh register is rate_limited at "
        "once (default: %(default)s)",
    )
    limits.add_argument(
        "--auth-workers",
        type=positive(int),
        default=_DEFAULT.auth_workers,
        metavar="N",
        help="threads that check passwords (bcrypt) (default: %(default)s)",
    )
    limits.add_argument(
        "--insecure-users-file",
        action="store_true",
        help="start even when the users file is readable by group or others (with a warning)",
    )


def limit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The BrokerConfig keywords of the options above."""
    return {
        "max_register_bytes": args.max_register_bytes,
        "max_pending_connections": args.max_pending_connections,
        "max_pending_per_address": args.max_pending_per_address,
        "max_metadata": args.max_metadata,
        "max_subscriptions": args.max_subscriptions,
        "max_sessions_per_user": args.max_sessions_per_user,
        "session_queue_bytes": args.session_queue_bytes,
        "memory_budget": args.memory_budget,
        "store_budget": args.store_budget,
        "auth_queue": args.auth_queue,
        "auth_workers": args.auth_workers,
        "insecure_users_file": args.insecure_users_file,
    }
