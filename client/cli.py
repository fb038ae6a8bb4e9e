"""The client tools of the `tether` command: `pub`, `sub` and `stats`, on the bundled client
library (docs/client.md, "Command line"). tether/cli.py puts them beside the broker's commands."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import secrets
import socket
import sys
import threading
from pathlib import Path

from tether.cli_common import PROG, CliError, port, positive
from tether.protocol import Publish

from .errors import TetherError
from .events import Message
from .sync import Client

__all__ = ["add_commands", "client_password"]

# Tools that run once and exit give up on an unreachable broker sooner than a service would.
CONNECT_TIMEOUT = 5.0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `stats`, `pub` and `sub` to the `tether` command's subcommands."""
    stats = commands.add_parser("stats", help="print a running broker's counters as JSON")
    stats.add_argument("--host", default="127.0.0.1")
    stats.add_argument("--port", type=port, default=7878)
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
    sub.add_argument("--count", type=positive(int), metavar="N", help="exit after N messages")
    _client_arguments(sub, "sub")
    sub.set_defaults(func=_cmd_sub)


def _client_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="broker (default: %(default)s)")
    parser.add_argument("--port", type=port, default=7878, help="(default: %(default)s)")
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


def _client_log_to_stderr() -> None:
    # The client logs through structlog/logging and prints nothing itself; show its warnings
    # (reconnects, lost sessions, dropped messages) on stderr, away from the output.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=f"{PROG}: %(message)s")


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
    return f"tether-{args.command}-{socket.gethostname()}-{os.getpid()}"[:128]


def _cmd_stats(args: argparse.Namespace) -> int:
    _client_log_to_stderr()
    password = client_password(args.password_file)
    try:
        client = Client(
            # A throwaway session, ended again below.
            client_id=f"tether-stats-{os.getpid()}-{secrets.token_hex(4)}",
            username=args.username,
            password=password,
            host=args.host,
            port=args.port,
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=10.0,
        )
        client.connect()
        try:
            stats = client.stats()
        except BaseException:
            client.close()
            raise
        client.unregister()
    except TetherError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def _pub_payloads(args: argparse.Namespace) -> list[bytes]:
    if args.message is not None and args.file is not None:
        raise CliError("give the message as an argument or with --file, not both")
    if args.message is not None:
        data: bytes = args.message.encode()
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
            connect_timeout=CONNECT_TIMEOUT,
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


def _format_message(message: Message, *, verbose: bool, as_json: bool) -> str:
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
    _client_log_to_stderr()
    password = client_password(args.password_file)
    done = threading.Event()
    lock = threading.Lock()
    seen = 0

    def show(message: Message) -> None:
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
            connect_timeout=CONNECT_TIMEOUT,
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
