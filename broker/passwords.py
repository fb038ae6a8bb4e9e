"""Password hashing for the users file: bcrypt over a SHA-256 pre-hash, constant work for every
failure. Why the pre-hash and the dummy checks: docs/architecture.md section 11."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from typing import Any

import bcrypt

__all__ = [
    "DEFAULT_COST",
    "MAX_COST",
    "MIN_COST",
    "SCHEME_PREFIX",
    "cost_of",
    "dummy_hash",
    "hash_count",
    "hash_password",
    "verify_password",
    "verify_unknown_user",
]

SCHEME_PREFIX = "bcrypt-sha256$"
DEFAULT_COST = 12
MIN_COST = 4  # bcrypt's own limits on the log2 work factor
MAX_COST = 31

# $2b$12$ + 22 salt chars + 31 hash chars; checking the shape up front means bcrypt is never
# handed garbage, so a malformed entry costs exactly the one dummy computation.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")

_count_lock = threading.Lock()
_count = 0
_dummy_lock = threading.Lock()
_dummies: dict[int, str] = {}


def _counted() -> None:
    global _count
    with _count_lock:
        _count += 1


def hash_count() -> int:
    """Number of bcrypt computations (hashpw/checkpw calls) this process has run."""
    with _count_lock:
        return _count


def _prehash(password: str) -> bytes:
    # surrogatepass: a str with lone surrogates still hashes (and verifies) instead of raising;
    # for every valid string the bytes are plain UTF-8.
    digest = hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest()
    return base64.b64encode(digest)


def hash_password(password: str, *, cost: int = DEFAULT_COST) -> str:
    """Hash `password` for storage; `cost` is bcrypt's log2 work factor (4..31)."""
    if not MIN_COST <= cost <= MAX_COST:
        raise ValueError(f"bcrypt cost must be between {MIN_COST} and {MAX_COST}, got {cost}")
    _counted()
    hashed = bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds=cost))
    return SCHEME_PREFIX + hashed.decode("ascii")


def dummy_hash(cost: int = DEFAULT_COST) -> str:
    """A hash of a random password at `cost`, made once per cost on first use."""
    with _dummy_lock:
        if cost not in _dummies:
            _dummies[cost] = hash_password(secrets.token_urlsafe(32), cost=cost)
        return _dummies[cost]


def is_valid_hash(stored: str) -> bool:
    """Whether `stored` has the shape `hash_password` writes (checked when a users file loads)."""
    bcrypt_hash = stored[len(SCHEME_PREFIX) :] if stored.startswith(SCHEME_PREFIX) else ""
    return _BCRYPT_RE.fullmatch(bcrypt_hash) is not None


def cost_of(stored: str) -> int:
    """The bcrypt cost of a stored hash, or the default for one that is malformed."""
    bcrypt_hash = stored[len(SCHEME_PREFIX) :] if stored.startswith(SCHEME_PREFIX) else ""
    return int(bcrypt_hash[4:6]) if _BCRYPT_RE.fullmatch(bcrypt_hash) else DEFAULT_COST


def __getattr__(name: str) -> Any:
    # `DUMMY_HASH` reads as a module constant but costs a bcrypt only when first asked for.
    if name == "DUMMY_HASH":
        return dummy_hash()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check(secret: bytes, bcrypt_hash: str) -> bool:
    _counted()
    try:
        return bcrypt.checkpw(secret, bcrypt_hash.encode("ascii"))
    except ValueError:  # the regex should rule this out; never let it escape
        return False


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored`; False (never an exception) otherwise."""
    secret = _prehash(password)
    if isinstance(stored, str) and stored.startswith(SCHEME_PREFIX):
        bcrypt_hash = stored[len(SCHEME_PREFIX) :]
        if _BCRYPT_RE.fullmatch(bcrypt_hash):
            return _check(secret, bcrypt_hash)
    # Malformed entry: burn the same time a real check would, then refuse.
    _check(secret, dummy_hash()[len(SCHEME_PREFIX) :])
    return False


def verify_unknown_user(password: str, *, cost: int = DEFAULT_COST) -> bool:
    """Spend one bcrypt check as if the user existed, and return False.

    `cost` should be the cost the real users' hashes have, or timing tells unknown names apart.
    """
    verify_password(password, dummy_hash(cost))
    return False
