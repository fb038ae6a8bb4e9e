"""The `tether` command: one parser with `--version`, the broker's commands (broker/cli.py),
the client tools (client/cli.py) and the operator's `sessions` (client/admin_cli.py). A
`CliError` becomes one `tether: error: ...` line, status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from tether import __version__
from tether.broker import cli as broker_cli
from tether.cli_common import PROG, CliError
from tether.client import admin_cli
from tether.client import cli as client_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Tether: an actor-based TCP session broker."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    broker_cli.add_commands(commands)  # serve, user
    client_cli.add_commands(commands)  # stats, pub, sub
    admin_cli.add_commands(commands)  # sessions (the admin HTTP API)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
