"""The client tools of the `tether` command: `pub` and `sub`, on the bundled client library
(docs/client.md, "Command line"), and `stats`, on the broker's admin HTTP API
(client/admin_cli.py). tether/cli.py puts them beside the broker's commands.

Sessions: a command leaves none behind unless asked to. `pub` unregisters when done (or
failed); `sub` unregisters when it ends (its count reached, SIGINT or SIGTERM),
unless `--state` keeps the session for the next run."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import structlog
from structlog.typing import EventDict

from tether.cli_common import PROG, CliError, port, positive
from tether.protocol import Publish

from .admin_cli import add_stats_command
from .errors import NotAuthorized, PayloadTooLarge, TetherError
from .events import Disconnected, Message, Reconnected
from .sync import Client

__all__ = ["add_commands", "client_password"]

# Tools that run once and exit give up on an unreachable broker sooner than a service would.
CONNECT_TIMEOUT = 5.0
# How long ending the session may hold up the exit (a broker gone meanwhile does not answer);
# past it the session lingers on the broker until it expires.
UNREGISTER_TIMEOUT = 5.0
# `sub` comes back within this many seconds of the broker (the library's default is 30).
SUB_BACKOFF_CAP = 5.0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `stats`, `pub` and `sub` to the `tether` command's subcommands."""
    add_stats_command(commands)  # through the HTTP API: client/admin_cli.py

    pub = commands.add_parser(
        "pub",
        help="publish a message (from an argument, --file or stdin)",
        description="Publish MESSAGE, or the contents of --file, or stdin, to TOPIC. "
        "A message too large for the broker is refused before anything is sent.",
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
    _client_arguments(pub, "session identity (default: tether-pub-HOST-PID)")
    pub.set_defaults(func=_cmd_pub)

    sub = commands.add_parser(
        "sub",
        help="subscribe and print each message",
        description="Print each message of the TOPICs: the payload as text when it is "
        "UTF-8, else as hex. Connection losses and returns are told on stderr. Without "
        "--state the session ends with the command (--count reached, Ctrl-C, SIGTERM).",
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+")
    sub.add_argument("-v", "--verbose", action="store_true", help="prefix topic and seq")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="keep the session in FILE, to resume it (and lose nothing) next time; "
        "the first run needs --client-id",
    )
    sub.add_argument("--count", type=positive(int), metavar="N", help="exit after N messages")
    _client_arguments(
        sub,
        "session identity (default: tether-sub-HOST-PID; with --state: needed the first "
        "time, then read from the state file)",
    )
    sub.set_defaults(func=_cmd_sub)


def _client_arguments(parser: argparse.ArgumentParser, client_id_help: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="broker (default: %(default)s)")
    parser.add_argument("--port", type=port, default=7878, help="(default: %(default)s)")
    parser.add_argument("--client-id", help=client_id_help)
    parser.add_argument("--username", default="admin", help="(default: %(default)s)")
    parser.add_argument(
        "--password-file",
        type=Path,
        metavar="PATH",
        help="read the password from this file (else $TETHER_PASSWORD, else a prompt; with "
        "--tls-cert and neither, no password is sent: the broker logs in by the certificate)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, verifying the broker against the system's CAs (implied by "
        "the options below)",
    )
    tls.add_argument(
        "--tls-ca", type=Path, metavar="PATH", help="the CA that signed the broker's certificate"
    )
    tls.add_argument(
        "--tls-cert", type=Path, metavar="PATH", help="a client certificate (for mutual TLS)"
    )
    tls.add_argument(
        "--tls-key",
        type=Path,
        metavar="PATH",
        help="its key, unencrypted (default: in the --tls-cert file)",
    )


def _check_tls(args: argparse.Namespace) -> None:
    if args.tls_key is not None and args.tls_cert is None:
        raise CliError("--tls-key needs --tls-cert (the certificate it belongs to)")


def client_password(password_file: Path | None, *, certificate: bool = False) -> str | None:
    """A password from a file, $TETHER_PASSWORD or a prompt: never from a plain argument.
    With a client `certificate` and neither a file nor the variable: None (no prompt; the
    broker logs the client in by its certificate)."""
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read the password file: {exc}") from None
        return text[:-1] if text.endswith("\n") else text
    env = os.environ.get("TETHER_PASSWORD")
    if env is not None:
        return env
    if certificate:
        return None
    if not sys.stdin.isatty():
        raise CliError("no password: set TETHER_PASSWORD or pass --password-file")
    return getpass.getpass("password: ")


# Events the library logs that every command here reports itself: `stopped` (the client
# ended by itself) always becomes the command's own error line.
_TOLD = frozenset({"stopped"})
# And what `sub` tells in its own lines about the connection (lost; back, maybe with a new
# session in place of a lost one).
_TOLD_BY_SUB = _TOLD | {"disconnected", "reconnected", "session_lost"}


def _client_log_to_stderr(told: frozenset[str] = _TOLD) -> None:
    """Show the client library's warnings (dropped messages, refused publishes, ...) on
    stderr, away from the output, as `tether: event='...' key=value ...` lines; leave out
    the events in `told`, which the command reports in its own words."""

    def leave_out_told(_logger: object, _method: str, event: EventDict) -> EventDict:
        if event.get("event") in told:
            raise structlog.DropEvent
        return event

    render = structlog.processors.KeyValueRenderer(key_order=["event"])
    structlog.configure(
        processors=[
            leave_out_told,
            structlog.processors.format_exc_info,
            lambda logger, method, event: f"{PROG}: {render(logger, method, event)}",
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _notice(text: str) -> None:
    """One line on stderr about the connection, away from the messages on stdout."""
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


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


def _end_session(client: Client) -> None:
    """Unregister, so that no session is left behind; give up after UNREGISTER_TIMEOUT (the
    session then lingers until it expires) rather than hold up the exit."""
    if client.closed:
        client.close()  # ended by itself (taken over, ...): no session of ours to end
        return
    failed: list[TetherError] = []

    def unregister() -> None:
        try:
            client.unregister()
        except TetherError as exc:
            failed.append(exc)

    worker = threading.Thread(target=unregister, name="tether-cli-unregister", daemon=True)
    worker.start()
    worker.join(UNREGISTER_TIMEOUT)
    if worker.is_alive():
        client.close()  # which ends the waiting unregister too
        worker.join(UNREGISTER_TIMEOUT)
        why = f"no answer from the broker within {UNREGISTER_TIMEOUT:g} s"
    elif failed:
        why = str(failed[0])
    else:
        return
    _notice(
        f"could not end the session of client id {client.options.client_id!r} ({why}); it "
        "lingers on the broker until it expires"
    )


@contextlib.contextmanager
def _signals_set(done: threading.Event) -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM set `done` (so the command ends the way it ends
    normally, cleaning up after itself) and are listed in the list yielded. A second one
    acts as it would have without this block: it ends the process at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can be set in the main thread only
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def handle(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        restore()
        done.set()

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield received
    finally:
        restore()


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


def _too_large(exc: PayloadTooLarge, index: int, total: int) -> str:
    """One line: the size and the limit and what to do (`exc` says them), and what was sent."""
    if total == 1:
        return f"{exc} (nothing was published)"
    earlier = "" if index == 0 else "; line 1 was" if index == 1 else f"; lines 1 to {index} were"
    not_sent = f"it and the lines after it were not published{earlier}"
    return f"line {index + 1} of {total}: {exc} ({not_sent})"


def _cmd_pub(args: argparse.Namespace) -> int:
    _client_log_to_stderr()
    payloads = _pub_payloads(args)
    try:
        Publish(topic=args.topic, payload=b"")  # a bad topic fails before connecting
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _check_tls(args)
    password = client_password(args.password_file, certificate=args.tls_cert is not None)
    try:
        client = Client(
            client_id=_client_id(args),
            username=args.username,
            password=password,
            host=args.host,
            port=args.port,
            connect_timeout=CONNECT_TIMEOUT,
            tls=args.tls or None,  # --tls-ca and --tls-cert imply it
            ca=args.tls_ca,
            cert=args.tls_cert,
            key=args.tls_key,
        )
        client.connect()
        try:
            for index, payload in enumerate(payloads):
                try:
                    client.publish(args.topic, payload, confirm=args.confirm)
                except PayloadTooLarge as exc:
                    raise CliError(_too_large(exc, index, len(payloads))) from None
        finally:
            # Answers come in request order, so the unregister's ok also means that every
            # publish before it was taken; and no session is left lingering behind.
            _end_session(client)
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
    _client_log_to_stderr(_TOLD_BY_SUB)
    _check_tls(args)
    password = client_password(args.password_file, certificate=args.tls_cert is not None)
    client_id = _client_id(args, args.state)
    # With --state the session outlives the process, to be resumed; else it ends with it.
    keep = args.state is not None
    broker = f"{args.host}:{args.port}"
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
                if keep:
                    # From the handler: this message counts as handled, none after it does
                    # (the next run gets them).
                    client.close()
                done.set()

    revoked: list[str] = []

    def refused(error: TetherError) -> None:
        # The broker ended a subscription (the user's permissions changed): say so; once
        # none is left there is nothing to wait for.
        if isinstance(error, NotAuthorized):
            _notice(f"the broker ended a subscription: {error}")
            revoked.append(str(error))
            if len(revoked) >= len(args.topics):
                done.set()

    def lost(event: Disconnected) -> None:
        _notice(f"lost the connection to {broker} ({event.reason}): reconnecting")

    def back(event: Reconnected) -> None:
        if event.resumed:
            _notice(
                f"reconnected to {broker}: session resumed, {event.queued} queued "
                f"message{'' if event.queued == 1 else 's'} to come"
            )
        else:
            _notice(
                f"reconnected to {broker} with a new session (the old one was gone): "
                "the messages queued for it are lost"
            )

    with _signals_set(done) as signals:
        try:
            client = Client(
                client_id=client_id,
                username=args.username,
                password=password,
                host=args.host,
                port=args.port,
                state_file=args.state,
                connect_timeout=CONNECT_TIMEOUT,
                backoff_cap=SUB_BACKOFF_CAP,
                on_taken_over=lambda _error: done.set(),
                on_error=refused,
                on_disconnected=lost,
                on_reconnected=back,
                tls=args.tls or None,  # --tls-ca and --tls-cert imply it
                ca=args.tls_ca,
                cert=args.tls_cert,
                key=args.tls_key,
            )
            client.connect()
            try:
                for topic in args.topics:
                    client.subscribe(topic, show)
                while not done.wait(0.2) and not client.closed:
                    pass
            finally:
                if keep:
                    client.close()
                else:
                    _end_session(client)
            if client.error is not None:
                raise client.error
            if revoked and len(revoked) >= len(args.topics):
                raise CliError("not authorized for any of the topics any more")
        except TetherError as exc:
            raise CliError(str(exc)) from None
        except ValueError as exc:
            raise CliError(str(exc)) from None
        except BrokenPipeError:
            return 0
    if signals:
        if signals[0] == signal.SIGINT:
            print(file=sys.stderr)  # after the ^C the terminal echoed
        return 128 + signals[0]  # what a shell reports for a process ended by the signal
    return 0
