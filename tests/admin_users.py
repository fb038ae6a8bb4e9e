"""A users file with the tests' users (tests/conftest.py's alice and bob) and one admin, root:
only admins may send `stats` (issue 12). A test module that asks `stats` over the wire
overrides conftest's `users_file` with it."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PASSWORDS
from tether.broker.users import add_user

ROOT, ROOT_PASSWORD = "root", "rootpw"


def users_with_admin(path: Path) -> Path:
    for name, password in PASSWORDS.items():
        add_user(path, name, password, cost=4)
    add_user(path, ROOT, ROOT_PASSWORD, cost=4, admin=True)
    return path
