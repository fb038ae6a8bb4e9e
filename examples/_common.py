"""Connection settings shared by the examples: from the environment, so that no password is
ever typed on a command line.

    TETHER_HOST (127.0.0.1)  TETHER_PORT (7878)  TETHER_USERNAME (admin)  TETHER_PASSWORD
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
from typing import Any


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
