"""The `tether` command line: `serve` runs the broker, `user` manages the users file.

Errors the user can fix (an existing user, a malformed users file, a bad option) are printed
as one `tether: error: ...` line with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from broker.logs import FORMATS, LEVELS, configure_logging, get_logger
from broker.passwords import DEFAULT_COST, MAX_COST, MIN_COST
from broker.users import UserExistsError, UserFileError, UserStore, add_user

PROG = "tether"
DEFAULT_USERS = "users.json"


class CliError(Exception):
    """A problem to report as one line and exit 1."""


def _positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:  # 0 picks a free port
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _cost(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not MIN_COST <= value <= MAX_COST:
        raise argparse.ArgumentTypeError(f"cost must be {MIN_COST}..{MAX_COST}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Tether: an actor-based TCP session broker."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the broker until SIGINT/SIGTERM")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument("--port", type=_port, default=7878, help="TCP port (default: %(default)s)")
    serve.add_argument(
        "--users",
        type=Path,
        default=Path(DEFAULT_USERS),
        metavar="PATH",
        help="users file (default: %(default)s)",
    )
    serve.add_argument(
        "--session-expiry",
        type=_positive(float),
        default=300.0,
        metavar="SECONDS",
        help="how long a dropped session lingers (default: %(default)s)",
    )
    serve.add_argument(
        "--queue-limit",
        type=_positive(int),
        default=10_000,
        metavar="MESSAGES",
        help="messages held per subscriber queue (default: %(default)s)",
    )
    serve.add_argument(
        "--max-frame",
        type=_positive(int),
        default=None,  # BrokerConfig's default, the protocol's DEFAULT_MAX_FRAME (1 MiB)
        metavar="BYTES",
        help="largest frame accepted (default: 1048576)",
    )
    serve.add_argument(
        "--register-timeout",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="time a connection may take to register (default: %(default)s)",
    )
    serve.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help="default: console when stdout is a terminal, else json",
    )
    serve.add_argument(
        "--log-level", choices=LEVELS, default="info", help="log threshold (default: %(default)s)"
    )
    serve.set_defaults(func=_cmd_serve)

    user = commands.add_parser("user", help="manage the users file")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    add = user_commands.add_parser(
        "add",
        help="add a user (password from a prompt, or from stdin when it is not a terminal)",
    )
    add.add_argument("name")
    add.add_argument(
        "--users",
        type=Path,
        default=Path(DEFAULT_USERS),
        metavar="PATH",
        help="users file (default: %(default)s)",
    )
    add.add_argument(
        "--cost",
        type=_cost,
        default=DEFAULT_COST,
        help=f"bcrypt cost, {MIN_COST}..{MAX_COST} (default: %(default)s)",
    )
    add.add_argument("--replace", action="store_true", help="change an existing user's password")
    add.set_defaults(func=_cmd_user_add)

    list_ = user_commands.add_parser("list", help="list user names and creation times")
    list_.add_argument(
        "--users",
        type=Path,
        default=Path(DEFAULT_USERS),
        metavar="PATH",
        help="users file (default: %(default)s)",
    )
    list_.set_defaults(func=_cmd_user_list)

    stats = commands.add_parser("stats", help="print a running broker's counters as JSON")
    stats.add_argument("--host", default="127.0.0.1")
    stats.add_argument("--port", type=_port, default=7878)
    stats.add_argument("--username", default="admin")
    stats.add_argument(
        "--password-file",
        type=Path,
        metavar="PATH",
        help="read the password from this file (else $TETHER_PASSWORD, else a prompt)",
    )
    stats.set_defaults(func=_cmd_stats)

    # Later commands hang off `commands` here, each with its own _cmd_* function:
    #   tether pub     (publish from the command line)
    #   tether sub     (subscribe and print deliveries)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _cmd_serve(args: argparse.Namespace) -> int:
    # Imported here: `tether user ...` must not need the network stack to be importable.
    from broker.config import BrokerConfig

    log_format = args.log_format or ("console" if sys.stdout.isatty() else "json")
    configure_logging(log_format, args.log_level)
    log = get_logger("tether.cli")

    users_path: Path = args.users
    try:
        store = UserStore.load(users_path)  # fail here, with a clear line, not in an actor
    except UserFileError as exc:
        raise CliError(str(exc)) from None
    if not users_path.exists():
        log.warning(
            "users file not found: nobody can log in",
            users=str(users_path),
            hint=f"add a user with: {PROG} user add NAME --users {users_path}",
        )
    elif len(store) == 0:
        log.warning("users file holds no users: nobody can log in", users=str(users_path))

    try:
        config = BrokerConfig(
            host=args.host,
            port=args.port,
            users_path=users_path,
            session_expiry=args.session_expiry,
            queue_limit=args.queue_limit,
            register_timeout=args.register_timeout,
            log_format=log_format,
            **({"max_frame": args.max_frame} if args.max_frame is not None else {}),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None

    from broker.server import serve

    return serve(config)


def read_password(name: str) -> str:
    """Prompt twice on a terminal; otherwise read stdin and drop one trailing newline."""
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass(f"Password for {name}: ")
        second = getpass.getpass("Again: ")
        if first != second:
            raise CliError("the two passwords do not match")
        return first
    if sys.stdin is None:
        raise CliError("no password: stdin is closed")
    data = sys.stdin.read()
    # Only the newline `echo` or a here-doc adds: any other whitespace is part of the password.
    for ending in ("\r\n", "\n"):
        if data.endswith(ending):
            return data[: -len(ending)]
    return data


def _cmd_user_add(args: argparse.Namespace) -> int:
    password = read_password(args.name)
    if not password:
        raise CliError("empty password refused")
    try:
        existed = args.name in UserStore.load(args.users)
        add_user(args.users, args.name, password, cost=args.cost, replace=args.replace)
    except UserExistsError as exc:
        raise CliError(f"{exc} (use --replace to change the password)") from None
    except (UserFileError, ValueError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {args.users}: {exc.strerror or exc}") from None
    verb = "changed the password of" if existed else "added"
    print(f"{PROG}: {verb} user {args.name!r} in {args.users}", file=sys.stderr)
    return 0


def _cmd_user_list(args: argparse.Namespace) -> int:
    try:
        store = UserStore.load(args.users)
    except UserFileError as exc:
        raise CliError(str(exc)) from None
    if not args.users.exists():
        print(f"{PROG}: no users file at {args.users}", file=sys.stderr)
    for name in store.names():
        record = store.get(name)
        print(f"{name}\t{record.created if record else ''}")
    return 0


def client_password(password_file: Path | None) -> str:
    """A password from a file, $TETHER_PASSWORD or a prompt: never from a plain argument."""
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read the password file: {exc}") from None
        return text[:-1] if text.endswith("\n") else text
    env = os.environ.get("TETHER_PASSWORD")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise CliError("no password: set TETHER_PASSWORD or pass --password-file")
    return getpass.getpass("password: ")


def _cmd_stats(args: argparse.Namespace) -> int:
    from broker.admin import AdminError, fetch_stats

    password = client_password(args.password_file)
    try:
        stats = fetch_stats(args.host, args.port, username=args.username, password=password)
    except AdminError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0
