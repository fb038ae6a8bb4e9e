"""`tether sessions ...` and `tether stats`: an operator's view of a running broker through its
admin HTTP API (client/admin.py; docs/operations.md). tether/cli.py puts them beside the other
commands.

    tether sessions [--status online|away] [--username U] [--client-id-prefix P] [--json]
    tether sessions show CLIENT_ID [--json]
    tether sessions disconnect CLIENT_ID
    tether sessions end CLIENT_ID
    tether stats

Each takes `--http URL` (default http://127.0.0.1:7879; an https:// URL is verified against
`--tls-ca PATH`, else the system's CAs) and the token from $TETHER_ADMIN_TOKEN or
`--token-file PATH`, never from an argument. What a device sent (ids, metadata, health) is
printed with its control characters escaped, so a client id cannot rewrite the terminal.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tether.cli_common import CliError

from .admin import DEFAULT_HTTP, TOKEN_ENV, AdminClient, AdminError, read_token

__all__ = ["add_commands", "add_stats_command", "age", "describe", "session_rows", "table"]

STATUSES = ("online", "away")
SUB_COUNTS = ("queued", "unacked", "dropped")
COLUMNS = ("CLIENT ID", "USER", "STATUS", "HEALTH", "LAST SEEN", "QUEUED", "PEER")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `sessions` (list, show, disconnect, end) to the `tether` command's subcommands."""
    # No abbreviations: `--token X` must be refused, not read as `--token-file X`.
    sessions = commands.add_parser(
        "sessions",
        allow_abbrev=False,
        help="list a running broker's sessions; show, disconnect or end one (HTTP API)",
        description="The sessions of a running broker, through its admin HTTP API "
        "(`tether serve --http HOST:PORT --admin-token-file FILE`). Without an action: a "
        "table of every session (all pages), sorted by client id.",
    )
    _admin_arguments(sessions)
    sessions.add_argument("--status", choices=STATUSES, help="only sessions in this state")
    sessions.add_argument("--username", metavar="USER", help="only this user's sessions")
    sessions.add_argument(
        "--client-id-prefix", metavar="PREFIX", help="only client ids that start with PREFIX"
    )
    sessions.add_argument("--json", action="store_true", help='{"sessions": [...]}, as the API')
    sessions.set_defaults(func=_cmd_list)
    actions = sessions.add_subparsers(dest="action", metavar="ACTION")

    show = actions.add_parser(
        "show", allow_abbrev=False, help="one session, with its health and subscriptions"
    )
    show.add_argument("client_id", metavar="CLIENT_ID")
    show.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="as the API answers it"
    )
    _admin_arguments(show, inherited=True)
    show.set_defaults(func=_cmd_show)

    disconnect = actions.add_parser(
        "disconnect",
        allow_abbrev=False,
        help="close a session's connection (the session stays; its client resumes it)",
    )
    disconnect.add_argument("client_id", metavar="CLIENT_ID")
    _admin_arguments(disconnect, inherited=True)
    disconnect.set_defaults(func=_cmd_disconnect)

    end = actions.add_parser(
        "end",
        allow_abbrev=False,
        help="end a session: its queued messages are discarded, its client gets "
        "session_ended and does not reconnect",
    )
    end.add_argument("client_id", metavar="CLIENT_ID")
    _admin_arguments(end, inherited=True)
    end.set_defaults(func=_cmd_end)


def add_stats_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `stats`: the broker's counters as JSON, from GET /api/stats (no login, no bcrypt)."""
    stats = commands.add_parser(
        "stats",
        allow_abbrev=False,
        help="print a running broker's counters as JSON (HTTP API)",
        description="The counters of a running broker (those of the `stats` frame) as JSON, "
        "from its admin HTTP API: no session and no password check per call.",
    )
    _admin_arguments(stats)
    stats.set_defaults(func=_cmd_stats)


def _admin_arguments(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """`--http` and `--token-file`. On an action (`inherited`) they may also be given after
    it, and default to what came before it (SUPPRESS keeps the action's parser from
    overwriting the value `sessions` parsed)."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if inherited else {}
    parser.add_argument(
        "--http",
        metavar="URL",
        help=f"the broker's HTTP endpoint (default: {DEFAULT_HTTP})",
        **({"default": DEFAULT_HTTP} if not inherited else default),
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"a file holding the admin token in clear (else ${TOKEN_ENV})",
        **default,
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PATH",
        help="for an https:// URL: the CA that signed the broker's certificate (else the "
        "system's CAs)",
        **default,
    )


def _client(args: argparse.Namespace) -> AdminClient:
    try:
        return AdminClient(args.http, read_token(args.token_file), ca=args.tls_ca)
    except AdminError as exc:
        raise CliError(str(exc)) from None


def _run(args: argparse.Namespace, action: Callable[[AdminClient], int]) -> int:
    client = _client(args)
    try:
        return action(client)
    except AdminError as exc:
        raise CliError(str(exc)) from None


# --- the commands -----------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    def run(client: AdminClient) -> int:
        found = list(
            client.sessions(
                status=args.status,
                username=args.username,
                client_id_prefix=args.client_id_prefix,
            )
        )
        if args.json:
            print(json.dumps({"sessions": found, "next": None}, indent=2, ensure_ascii=False))
        else:
            print(table(COLUMNS, session_rows(found, _now())))
        return 0

    return _run(args, run)


def _cmd_show(args: argparse.Namespace) -> int:
    def run(client: AdminClient) -> int:
        found = client.session(args.client_id)
        if getattr(args, "json", False):
            print(json.dumps(found, indent=2, ensure_ascii=False))
        else:
            print(describe(found, _now()))
        return 0

    return _run(args, run)


def _cmd_disconnect(args: argparse.Namespace) -> int:
    def run(client: AdminClient) -> int:
        client.disconnect(args.client_id)
        print(f"disconnected {_text(args.client_id)} (its session stays; the client may resume)")
        return 0

    return _run(args, run)


def _cmd_end(args: argparse.Namespace) -> int:
    def run(client: AdminClient) -> int:
        client.end(args.client_id)
        print(f"ended the session of {_text(args.client_id)}")
        return 0

    return _run(args, run)


def _cmd_stats(args: argparse.Namespace) -> int:
    def run(client: AdminClient) -> int:
        # The format `tether stats` has always printed (it used to ask a `stats` frame).
        print(json.dumps(client.stats(), indent=2, sort_keys=True))
        return 0

    return _run(args, run)


# --- rendering ----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _text(value: object) -> str:
    """`value` as one line of printable text: control characters (ANSI escapes, newlines)
    are shown escaped, so what a device sent cannot move the cursor or fake a row."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(value: object, now: datetime) -> str:
    """An RFC 3339 time as how long ago it was: `12s ago`, `5m ago`, `3h ago`, `2d ago`."""
    then = _time(value)
    if then is None:
        return "-"
    seconds = int((now - then).total_seconds())
    if seconds < 0:
        return "just now"  # a clock a little ahead of ours
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _relative(value: object, now: datetime) -> str:
    """`age`, or for a time still to come (an expiry): `in 4m`."""
    then = _time(value)
    if then is None or then <= now:
        return age(value, now)
    seconds = int((then - now).total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"in {seconds // size}{unit}"
    return f"in {seconds}s"


def _queued(session: Mapping[str, Any]) -> int:
    subs = session.get("subscriptions") or []
    return sum(int(s.get("queued") or 0) for s in subs if isinstance(s, Mapping))


def _health(session: Mapping[str, Any]) -> str:
    health = session.get("health")
    if not isinstance(health, Mapping):
        return "-"
    status = _text(health.get("status") or "-")
    return f"{status} (stale)" if health.get("stale") else status


def session_rows(sessions: Sequence[Mapping[str, Any]], now: datetime) -> list[list[str]]:
    """The rows of the sessions table, one per session, in COLUMNS' order."""
    return [
        [
            _text(s.get("client_id", "")),
            _text(s.get("username", "")),
            _text(s.get("status", "")),
            _health(s),
            age(s.get("last_seen"), now),
            str(_queued(s)),
            _text(s.get("peer") or "-"),
        ]
        for s in sessions
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, three spaces apart (as `docker ps`)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = [header, *rows]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _json_text(value: object) -> str:
    return _text(json.dumps(value, ensure_ascii=False, sort_keys=True))


def describe(session: Mapping[str, Any], now: datetime) -> str:
    """One session, readable: a line per field, then its subscriptions as a table."""

    def when(key: str) -> str:
        value = session.get(key)
        return f"{_text(value)} ({_relative(value, now)})" if value else "-"

    raw = session.get("health")
    health: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    at = health.get("at")
    told = f"{_health(session)}, reported {_text(at)} ({age(at, now)})" if at else "-"
    fields = [
        ("client id", _text(session.get("client_id", ""))),
        ("username", _text(session.get("username", ""))),
        ("session id", _text(session.get("session_id", ""))),
        ("status", _text(session.get("status", ""))),
        ("connected since", when("connected_since")),
        ("away since", when("away_since")),
        ("last seen", when("last_seen")),
        ("expires at", when("expires_at")),
        ("peer", _text(session.get("peer") or "-")),
        ("keepalive", f"{_text(session.get('keepalive', '-'))} s"),
        ("metadata", _json_text(session.get("metadata") or {})),
        ("health", told),
        ("health details", _json_text(health.get("details")) if health.get("details") else "-"),
    ]
    width = max(len(name) for name, _ in fields) + 1
    lines = [f"{name + ':':<{width}} {value}" for name, value in fields]
    subs = [s for s in session.get("subscriptions") or [] if isinstance(s, Mapping)]
    if subs:
        lines.append("subscriptions:")
        rows = [
            [
                _text(s.get("topic", "")),
                *(str(s.get(k, 0)) for k in ("queued", "unacked", "dropped")),
            ]
            for s in subs
        ]
        sub_table = table(("TOPIC", "QUEUED", "UNACKED", "DROPPED"), rows)
        lines += ["  " + line for line in sub_table.splitlines()]
    else:
        lines.append("subscriptions: none")
    return "\n".join(lines)
