"""Connection settings shared by the examples: from the environment, so that no password is
ever typed on a command line.

    TETHER_HOST (127.0.0.1)  TETHER_PORT (7878)  TETHER_USERNAME (admin)  TETHER_PASSWORD

The examples need the project's venv (scripts/run and scripts/test make it): run them with
its Python, `.venv/bin/python examples/NAME.py`. Run with another Python, they say so.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
from pathlib import Path
from typing import Any

try:
    import tether.client  # noqa: F401 - only to fail here, with a hint, not in each script
except ModuleNotFoundError as exc:
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "NAME.py"
    sys.exit(
        f"{exc} (this Python, {sys.executable}, is not the project's): run the examples with "
        f"the venv's Python, .venv/bin/python examples/{script} (scripts/run sets it up)"
    )


def connection_settings() -> dict[str, Any]:
    password = os.environ.get("TETHER_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            sys.exit("set TETHER_PASSWORD (scripts/run printed the admin password once)")
        password = getpass.getpass("Tether password: ")
    return {
        "host": os.environ.get("TETHER_HOST", "127.0.0.1"),
        "port": int(os.environ.get("TETHER_PORT", "7878")),
        "username": os.environ.get("TETHER_USERNAME", "admin"),
        "password": password,
    }


def show_client_logs() -> None:
    # The client logs (reconnects, lost sessions) but never prints: show its warnings.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
