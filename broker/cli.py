"""The broker's commands of the `tether` command: `serve` runs the broker, `user
add|set|remove|list` manage the users file (a running broker reloads it when it changes),
`token new` makes an admin token for the HTTP API. tether/cli.py puts them beside the client
tools (README, "Command line")."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from tether.broker.cli_limits import add_limit_arguments, limit_settings
from tether.broker.cli_security import add_security_arguments, security_settings
from tether.broker.config import BrokerConfig
from tether.broker.logs import FORMATS, LEVELS, configure_logging, get_logger
from tether.broker.passwords import DEFAULT_COST, MAX_COST, MIN_COST
from tether.broker.permissions import PatternError, validate_pattern
from tether.broker.token_cli import add_token_commands
from tether.broker.users import (
    KEEP,
    Keep,
    UserExistsError,
    UserFileError,
    UserNotFoundError,
    UserRecord,
    UserStore,
    add_user,
    insecure_mode,
    remove_user,
    set_user,
    validate_client_id_prefix,
)
from tether.cli_common import PROG, CliError, port, positive

__all__ = ["add_commands", "read_password"]

# `serve`'s defaults are BrokerConfig's, not restated here.
_DEFAULT = BrokerConfig()
# `--pub-any` / `--sub-any`: a list lifted (no restriction), told apart from "not given" (None).
_ANY = "any"


def _cost(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not MIN_COST <= value <= MAX_COST:
        raise argparse.ArgumentTypeError(f"cost must be {MIN_COST}..{MAX_COST}, got {value}")
    return value


def _http_address(text: str) -> tuple[str, int]:
    """An argument type: HOST:PORT (an IPv6 host in brackets: [::1]:7879)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port(port_text)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve`, `user` and `token` to the `tether` command's subcommands."""
    serve = commands.add_parser("serve", help="run the broker until SIGINT/SIGTERM")
    serve.add_argument(
        "--host", default=_DEFAULT.host, help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=port, default=_DEFAULT.port, help="TCP port (default: %(default)s)"
    )
    _users_argument(serve)
    serve.add_argument(
        "--session-expiry",
        type=positive(float),
        default=_DEFAULT.session_expiry,
        metavar="SECONDS",
        help="how long a dropped session lingers (default: %(default)s)",
    )
    serve.add_argument(
        "--queue-limit",
        type=positive(int),
        default=_DEFAULT.queue_limit,
        metavar="MESSAGES",
        help="messages held per subscriber queue (default: %(default)s)",
    )
    serve.add_argument(
        "--max-frame",
        type=positive(int),
        default=_DEFAULT.max_frame,
        metavar="BYTES",
        help="largest frame accepted (default: %(default)s)",
    )
    serve.add_argument(
        "--register-timeout",
        type=positive(float),
        default=_DEFAULT.register_timeout,
        metavar="SECONDS",
        help="time a connection may take to register (default: %(default)s)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=positive(float),
        default=_DEFAULT.shutdown_grace,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT: stop accepting, close every connection (clients resume on the "
        "next broker) and exit within this time; a second signal exits at once "
        "(default: %(default)s)",
    )
    _store_arguments(serve)
    serve.add_argument(
        "--http",
        type=_http_address,
        default=None,
        metavar="HOST:PORT",
        help="serve /health, /metrics, the admin API (/api/...) and the fleet page (/) over "
        "HTTP there (default: off)",
    )
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"hashes of the tokens /api/... accepts (made with `{PROG} token new --file "
        "PATH`; re-read when it changes); without it /api/... answers 401",
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
    add_limit_arguments(serve)
    add_security_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    user = commands.add_parser("user", help="manage the users file")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    add = user_commands.add_parser(
        "add",
        help="add a user (password from a prompt, or from stdin when it is not a terminal)",
    )
    add.add_argument("name")
    _users_argument(add)
    add.add_argument(
        "--cost",
        type=_cost,
        default=DEFAULT_COST,
        help=f"bcrypt cost, {MIN_COST}..{MAX_COST} (default: %(default)s)",
    )
    add.add_argument("--replace", action="store_true", help="change an existing user's password")
    add.add_argument(
        "--end-sessions",
        action="store_true",
        help="with --replace: also end the user's sessions now (a password rotated after a "
        "leak); their clients get session_ended",
    )
    admin = add.add_mutually_exclusive_group()
    admin.add_argument(
        "--admin",
        action="store_true",
        default=None,
        help="the user may subscribe to the broker's $sys/... events (session lifecycle) "
        "and ask for its counters (stats)",
    )
    admin.add_argument(
        "--no-admin",
        dest="admin",
        action="store_false",
        help="with --replace: take the admin mark away",
    )
    client_ids = add.add_mutually_exclusive_group()
    client_ids.add_argument(
        "--client-id-prefix",
        dest="client_id_prefixes",
        action="append",
        default=None,
        metavar="PREFIX",
        help="the user may only register client ids starting with PREFIX (repeatable: any of "
        "them; with --replace: replaces the list); a register outside them is not_authorized "
        "(default: any client id)",
    )
    client_ids.add_argument(
        "--any-client-id",
        action="store_true",
        help="with --replace: lift the user's client id prefixes (any client id)",
    )
    _permission_arguments(add, replacing="with --replace: ")
    add.set_defaults(func=_cmd_user_add)

    set_ = user_commands.add_parser(
        "set",
        help="change a user's topic permissions (the password stays; a running broker applies "
        "them to the user's sessions on reload)",
    )
    set_.add_argument("name")
    _users_argument(set_)
    _permission_arguments(set_, replacing="")
    set_.set_defaults(func=_cmd_user_set)

    remove = user_commands.add_parser(
        "remove", help="remove a user; a running broker ends their sessions (session_ended)"
    )
    remove.add_argument("name")
    _users_argument(remove)
    remove.set_defaults(func=_cmd_user_remove)

    list_ = user_commands.add_parser(
        "list",
        help="list user names, creation times, admin marks, client id prefixes and topic "
        "permissions",
    )
    _users_argument(list_)
    list_.set_defaults(func=_cmd_user_list)

    add_token_commands(commands)


def _permission_arguments(parser: argparse.ArgumentParser, *, replacing: str) -> None:
    """`--pub`/`--sub` (repeatable) and their `-any`/`-none` forms: the user's topic patterns
    (broker/permissions.py). Not given: left as they are (a new user: any topic)."""
    for flag, dest, verb in (("pub", "publish", "publish"), ("sub", "subscribe", "subscribe to")):
        group = parser.add_mutually_exclusive_group()
        group.add_argument(
            f"--{flag}",
            dest=dest,
            action="append",
            default=None,
            metavar="PATTERN",
            help=f"a topic pattern the user may {verb}: `+` one level, `#` the rest, "
            "{username} and {client_id} a whole level each (repeatable; "
            f"{replacing}replaces the list); anything else is not_authorized",
        )
        group.add_argument(
            f"--{flag}-any",
            dest=dest,
            action="store_const",
            const=_ANY,
            help=f"{replacing}lift the {dest} list: any topic (none with serve --default-deny)",
        )
        group.add_argument(
            f"--{flag}-none",
            dest=dest,
            action="store_const",
            const=[],
            help=f"the user may {verb} no topic at all",
        )


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    """Where sessions and queues are kept, and what a commit survives (README, "Command line";
    docs/architecture.md, "The store")."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--data-dir",
        type=Path,
        default=_DEFAULT.data_dir,
        metavar="DIR",
        help="directory of the store (SQLite): sessions, subscriptions and queued messages "
        "survive a restart; created (mode 0700) if missing (default: %(default)s)",
    )
    where.add_argument(
        "--in-memory",
        action="store_true",
        help="keep everything in memory only: no files, and a restart loses every session "
        "and queued message",
    )
    parser.add_argument(
        "--sync",
        choices=("full", "normal"),
        default=_DEFAULT.sync,
        help="when a commit is on disk: full (an `ok` survives a power loss) or normal (it "
        "survives a crash of the broker process, not of the machine) (default: %(default)s)",
    )


def _users_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--users",
        type=Path,
        default=_DEFAULT.users_path,
        metavar="PATH",
        help="users file (default: %(default)s)",
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    log_format = args.log_format or ("console" if sys.stdout.isatty() else "json")
    configure_logging(log_format, args.log_level)
    log = get_logger("tether.cli")

    users_path: Path = args.users
    try:
        store = UserStore.load(users_path)  # fail here, with a clear line, not in an actor
    except UserFileError as exc:
        return _refuse_start(str(exc))
    mode = insecure_mode(users_path)
    if mode is not None:
        # The file holds password hashes: group or others must not read (or write) it.
        if not args.insecure_users_file:
            return _refuse_start(
                f"users file {users_path} is open to group or others (mode {mode:04o}): "
                f"run `chmod 600 {users_path}` (or start with --insecure-users-file)"
            )
        log.warning(
            "users_file_insecure",
            users=str(users_path),
            mode=f"{mode:04o}",
            hint=f"chmod 600 {users_path}",
            accepted="--insecure-users-file",
        )
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
            max_frame=args.max_frame,
            register_timeout=args.register_timeout,
            log_format=log_format,
            data_dir=None if args.in_memory else args.data_dir,
            sync=args.sync,
            shutdown_grace=args.shutdown_grace,
            http=args.http,
            admin_token_file=args.admin_token_file,
            **limit_settings(args),
            **security_settings(args),
        )
    except ValueError as exc:
        return _refuse_start(str(exc))

    # Imported here: `tether user ...` must not need the network stack to be importable.
    from tether.broker.server import StartupError, serve

    try:
        return serve(config)
    except StartupError as exc:
        return _refuse_start(str(exc))


def _refuse_start(message: str) -> int:
    """Every start-up refusal of `serve`: one line saying what and what to do, status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


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
    if args.end_sessions and not args.replace:
        raise CliError("--end-sessions goes with --replace (it ends an existing user's sessions)")
    users: Path = args.users
    if not users.parent.is_dir():
        # Said before the password is asked for. Not created: a typo in --users would make a
        # file no broker reads.
        raise CliError(
            f"directory {users.parent} does not exist: create it first "
            f"(mkdir -p {users.parent}) or check --users"
        )
    prefixes: list[str] | None = [] if args.any_client_id else args.client_id_prefixes
    for prefix in prefixes or ():
        try:
            validate_client_id_prefix(prefix)  # before the password prompt
        except ValueError as exc:
            raise CliError(str(exc)) from None
    try:
        publish, subscribe = _patterns(args.publish), _patterns(args.subscribe)
    except PatternError as exc:
        return _refuse_pattern(exc)  # before the password prompt
    password = read_password(args.name)
    if not password:
        raise CliError("empty password refused")
    try:
        existed = args.name in UserStore.load(args.users)
        add_user(
            args.users,
            args.name,
            password,
            cost=args.cost,
            replace=args.replace,
            end_sessions=args.end_sessions,
            admin=args.admin,
            client_id_prefixes=prefixes,
            publish=publish,
            subscribe=subscribe,
        )
    except UserExistsError as exc:
        raise CliError(f"{exc} (use --replace to change the password)") from None
    except (UserFileError, ValueError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {args.users}: {exc.strerror or exc}") from None
    verb = "changed the password of" if existed else "added"
    ended = " and ended their sessions" if args.end_sessions else ""
    print(f"{PROG}: {verb} user {args.name!r}{ended} in {args.users}", file=sys.stderr)
    return 0


def _patterns(given: list[str] | str | None) -> list[str] | Keep | None:
    """A `--pub`/`--sub` option as `add_user`/`set_user` take it; raises `PatternError`."""
    if given is None:
        return KEEP
    if given == _ANY:
        return None
    assert isinstance(given, list)
    for pattern in given:
        validate_pattern(pattern)
    return given


def _refuse_pattern(exc: PatternError) -> int:
    # A usage error, as argparse's: one line, status 2, nothing written.
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return 2


def _cmd_user_set(args: argparse.Namespace) -> int:
    try:
        publish, subscribe = _patterns(args.publish), _patterns(args.subscribe)
    except PatternError as exc:
        return _refuse_pattern(exc)
    if isinstance(publish, Keep) and isinstance(subscribe, Keep):
        raise CliError(
            "nothing to change: give --pub/--sub PATTERN, --pub-any/--sub-any or "
            "--pub-none/--sub-none"
        )
    try:
        record = set_user(args.users, args.name, publish=publish, subscribe=subscribe)
    except (UserFileError, UserNotFoundError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {args.users}: {exc.strerror or exc}") from None
    print(
        f"{PROG}: set the topic permissions of user {args.name!r} in {args.users}: "
        f"{_shown_permissions(record)} (a running broker applies them on reload)",
        file=sys.stderr,
    )
    return 0


def _shown_list(patterns: tuple[str, ...] | None) -> str:
    if patterns is None:
        return "any"
    if not patterns:
        return "none"
    # repr: a pattern may hold spaces or commas.
    return ", ".join(repr(p) for p in patterns)


def _shown_permissions(record: UserRecord) -> str:
    return f"publish {_shown_list(record.publish)}; subscribe {_shown_list(record.subscribe)}"


def _cmd_user_remove(args: argparse.Namespace) -> int:
    try:
        remove_user(args.users, args.name)
    except (UserFileError, UserNotFoundError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {args.users}: {exc.strerror or exc}") from None
    print(
        f"{PROG}: removed user {args.name!r} from {args.users} (a running broker ends their "
        "sessions)",
        file=sys.stderr,
    )
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
        if record is not None:
            line = f"{name}\t{record.created}" + ("\tadmin" if record.admin else "")
            if record.client_id_prefixes is not None:
                # repr: a prefix may hold spaces or commas.
                shown = ", ".join(repr(p) for p in record.client_id_prefixes)
                line += f"\tclient ids starting with {shown}"
            if record.publish is not None or record.subscribe is not None:
                line += f"\t{_shown_permissions(record)}"
            print(line)
    return 0
