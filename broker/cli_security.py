"""`tether serve`'s security options (issue 13): TLS, mutual TLS and the default for users
without topic permissions. Each is a BrokerConfig setting; docs/security.md says how to use
them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tether.cli_common import port

__all__ = ["add_security_arguments", "security_settings"]


def add_security_arguments(serve: argparse.ArgumentParser) -> None:
    tls = serve.add_argument_group(
        "security", "TLS, client certificates and topic permissions (docs/security.md)"
    )
    tls.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PATH",
        help="PEM certificate (chain) to serve TLS with, on --port unless --tls-port is given; "
        "with --http the endpoint serves HTTPS too; re-read on SIGHUP",
    )
    tls.add_argument(
        "--tls-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="PEM private key of --tls-cert; refused if group or others may read it",
    )
    tls.add_argument(
        "--tls-port",
        type=port,
        default=None,
        metavar="PORT",
        help="serve TLS on this port beside plaintext on --port (default: TLS on --port)",
    )
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        metavar="PATH",
        help="require a client certificate signed by this CA (PEM) on the TLS listener",
    )
    tls.add_argument(
        "--tls-cert-username",
        choices=("cn", "san"),
        default=None,
        help="with --tls-client-ca: the certificate's common name (cn) or first "
        "subjectAltName (san) is the username, and no password is needed (default: the "
        "password is checked too)",
    )
    tls.add_argument(
        "--require-tls",
        action="store_true",
        help="refuse plaintext entirely (no plaintext listener)",
    )
    tls.add_argument(
        "--default-deny",
        action="store_true",
        help="a user without publish/subscribe lists in the users file may use no topic "
        "(default: every topic)",
    )


def security_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_port": args.tls_port,
        "tls_client_ca": args.tls_client_ca,
        "tls_cert_username": args.tls_cert_username,
        "require_tls": args.require_tls,
        "default_deny": args.default_deny,
    }
