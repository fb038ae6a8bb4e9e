"""`tether token new --file PATH`: a new admin token for the HTTP API, printed alone on stdout;
only its SHA-256 is appended to PATH (`tether serve --admin-token-file PATH`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tether.broker.admin_tokens import append_token, new_token
from tether.cli_common import PROG, CliError

__all__ = ["add_token_commands"]


def add_token_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `token` to the `tether` command's subcommands."""
    token = commands.add_parser("token", help="manage admin tokens for the HTTP API")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    new = token_commands.add_parser(
        "new",
        help="print a new admin token on stdout and append its SHA-256 hash to --file",
    )
    new.add_argument(
        "--file",
        type=Path,
        required=True,
        metavar="PATH",
        help="the admin token file (`serve --admin-token-file`); created with mode 0600",
    )
    new.set_defaults(func=_cmd_token_new)


def _cmd_token_new(args: argparse.Namespace) -> int:
    path: Path = args.file
    token = new_token()
    try:
        append_token(path, token)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    # The token alone on stdout (scripts capture it); what was done, on stderr.
    print(token)
    print(
        f"{PROG}: added an admin token to {path} (only its hash is kept: this is the one "
        "time it is shown)",
        file=sys.stderr,
    )
    return 0
