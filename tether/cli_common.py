"""What the two halves of the `tether` command line (broker/cli.py, client/cli.py) share: the
error reported as one line, and the argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["PROG", "CliError", "port", "positive", "size"]

PROG = "tether"


class CliError(Exception):
    """A problem the user can fix: printed as one `tether: error: ...` line, exit status 1."""


def positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    """An argument type: a number of `kind` above 0."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def port(text: str) -> int:
    """An argument type: a TCP port, 0 (pick a free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}


def size(text: str) -> int:
    """An argument type: a size in bytes above 0, plain or with a binary unit (64KiB, 256M,
    10GiB: K, M and G are 1024-based, as memory and disk tools mean them)."""
    stripped = text.strip()
    digits = stripped.rstrip("bBiIkKmMgG ")
    unit = stripped[len(digits) :].strip().lower()
    if unit not in _UNITS or not digits:
        raise argparse.ArgumentTypeError(f"not a size (e.g. 65536, 64KiB, 256MiB): {text!r}")
    try:
        value = float(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size (e.g. 65536, 64KiB, 256MiB): {text!r}"
        ) from None
    result = int(value * _UNITS[unit])
    if result <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return result
