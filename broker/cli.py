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

from tether import __version__
from tether.broker.logs import FORMATS, LEVELS, configure_logging, get_logger
from tether.broker.passwords import DEFAULT_COST, MAX_COST, MIN_COST
from tether.broker.users import UserExistsError, UserFileError, UserStore, add_user

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
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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

    pub = commands.add_parser(
        "pub",
        help="publish a message (from an argument, --file or stdin)",
        description="Publish MESSAGE, or the contents of --file, or stdin, to TOPIC.",
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("message", metavar="MESSAGE", nargs="?", help="the payload, as UTF-8")
    pub.add_argument("--file", type=Path, metavar="PATH", help="read the payload from a file")
    pub.add_argument(
        "--lines", action="store_true", help="one message per line (without its newline)"
    )
    pub.add_argument(
        "--confirm", action="store_true", help="wait for the broker to accept each message"
    )
    _client_arguments(pub, "pub")
    pub.set_defaults(func=_cmd_pub)

    sub = commands.add_parser(
        "sub",
        help="subscribe and print each message",
        description="Print each message of the TOPICs: the payload as text when it is "
        "UTF-8, else as hex.",
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+")
    sub.add_argument("-v", "--verbose", action="store_true", help="prefix topic and seq")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="keep the session in FILE, to resume it (and lose nothing) next time",
    )
    sub.add_argument("--count", type=_positive(int), metavar="N", help="exit after N messages")
    _client_arguments(sub, "sub")
    sub.set_defaults(func=_cmd_sub)

    return parser


def _client_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="broker (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=7878, help="(default: %(default)s)")
    parser.add_argument(
        "--client-id",
        help=f"session identity (default: tether-{command}-HOST-PID; with --state, the one "
        "the state file holds)",
    )
    parser.add_argument("--username", default="admin", help="(default: %(default)s)")
    parser.add_argument(
        "--password-file",
        type=Path,
        metavar="PATH",
        help="read the password from this file (else $TETHER_PASSWORD, else a prompt)",
    )


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
    from tether.broker.config import BrokerConfig

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

    from tether.broker.server import serve

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
    from tether.broker.admin import AdminError, fetch_stats

    password = client_password(args.password_file)
    try:
        stats = fetch_stats(args.host, args.port, username=args.username, password=password)
    except AdminError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


# --- tether pub / tether sub: the bundled client library on the command line -------------


def _client_log_to_stderr() -> None:
    # The client logs through structlog/logging and prints nothing itself; show its warnings
    # (reconnects, lost sessions, dropped messages) on stderr, away from the messages.
    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="tether: %(message)s")


def _client_id(args: argparse.Namespace, state: Path | None = None) -> str:
    if args.client_id:
        return str(args.client_id)
    if state is not None and state.exists():
        try:
            found = json.loads(state.read_text(encoding="utf-8")).get("client_id")
        except (OSError, ValueError, AttributeError):
            found = None
        if isinstance(found, str):
            return found
    if state is not None:
        raise CliError("--state needs --client-id the first time (the session belongs to it)")
    import socket

    return f"tether-{args.command}-{socket.gethostname()}-{os.getpid()}"[:128]


def _pub_payloads(args: argparse.Namespace) -> list[bytes]:
    if args.message is not None and args.file is not None:
        raise CliError("give the message as an argument or with --file, not both")
    if args.message is not None:
        data = args.message.encode()
    elif args.file is not None:
        try:
            data = args.file.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    else:
        if sys.stdin is None or sys.stdin.isatty():
            raise CliError("no message: give it as an argument, with --file, or on stdin")
        data = sys.stdin.buffer.read()
    if not args.lines:
        return [data]
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line does not start another message
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _cmd_pub(args: argparse.Namespace) -> int:
    from tether.client import Client, TetherError
    from tether.protocol import Publish

    _client_log_to_stderr()
    payloads = _pub_payloads(args)
    try:
        Publish(topic=args.topic, payload=b"")  # a bad topic fails before connecting
    except ValueError as exc:
        raise CliError(str(exc)) from None
    password = client_password(args.password_file)
    try:
        client = Client(
            client_id=_client_id(args),
            username=args.username,
            password=password,
            host=args.host,
            port=args.port,
            connect_timeout=5.0,
        )
        client.connect()
        try:
            for payload in payloads:
                client.publish(args.topic, payload, confirm=args.confirm)
        except BaseException:
            client.close()
            raise
        # Answers come in request order, so the unregister's ok also means that every
        # publish before it was taken; and no session is left lingering behind.
        client.unregister()
    except TetherError as exc:
        raise CliError(str(exc)) from None
    return 0


def _format_message(message: object, *, verbose: bool, as_json: bool) -> str:
    from tether.client import Message

    assert isinstance(message, Message)
    try:
        text: str | None = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if as_json:
        record: dict[str, object] = {"topic": message.topic, "seq": message.seq}
        if text is not None:
            record.update(payload=text, encoding="utf-8")
        else:
            record.update(payload=message.payload.hex(), encoding="hex")
        if message.redelivered:
            record["redelivered"] = True
        return json.dumps(record, ensure_ascii=False)
    body = text if text is not None else message.payload.hex()
    return f"{message.topic} {message.seq} {body}" if verbose else body


def _cmd_sub(args: argparse.Namespace) -> int:
    import threading

    from tether.client import Client, TetherError

    _client_log_to_stderr()
    password = client_password(args.password_file)
    done = threading.Event()
    lock = threading.Lock()
    seen = 0

    def show(message: object) -> None:
        nonlocal seen
        with lock:
            if done.is_set():
                return
            line = _format_message(message, verbose=args.verbose, as_json=args.json)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            seen += 1
            if args.count is not None and seen >= args.count:
                # From the handler: this message counts as handled, none after it does.
                client.close()
                done.set()

    try:
        client = Client(
            client_id=_client_id(args, args.state),
            username=args.username,
            password=password,
            host=args.host,
            port=args.port,
            state_file=args.state,
            connect_timeout=5.0,
            on_taken_over=lambda _error: done.set(),
        )
        with client:
            for topic in args.topics:
                client.subscribe(topic, show)
            while not done.wait(0.2) and not client.closed:
                pass
            if client.error is not None:
                raise client.error
    except TetherError as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except BrokenPipeError:
        return 0
    return 0
