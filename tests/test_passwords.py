"""bcrypt-over-SHA-256 hashing: round trips, long passwords, and the never-raise contract."""

from __future__ import annotations

import pytest

from tether.broker import passwords
from tether.broker.passwords import (
    SCHEME_PREFIX,
    hash_count,
    hash_password,
    verify_password,
    verify_unknown_user,
)

COST = 4  # bcrypt's minimum: keeps the suite fast


def test_round_trip() -> None:
    stored = hash_password("correct horse", cost=COST)
    assert stored.startswith(SCHEME_PREFIX + "$2b$04$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("", stored)


def test_same_password_gets_a_fresh_salt() -> None:
    assert hash_password("pw", cost=COST) != hash_password("pw", cost=COST)


def test_long_passwords_are_neither_rejected_nor_truncated() -> None:
    prefix = "x" * 72
    a, b = prefix + "A", prefix + "B"  # same first 72 bytes: plain bcrypt could not tell them apart
    stored_a = hash_password(a, cost=COST)
    assert verify_password(a, stored_a)
    assert not verify_password(b, stored_a)
    assert not verify_password(prefix, stored_a)
    huge = "y" * 100_000
    assert verify_password(huge, hash_password(huge, cost=COST))


def test_unicode_passwords() -> None:
    pw = "pässwörd-密码-🔑"
    stored = hash_password(pw, cost=COST)
    assert verify_password(pw, stored)
    # Same look, different code points (NFD vs NFC): these are different passwords.
    assert not verify_password("pa\u0308sswörd-密码-🔑", stored)


def test_lone_surrogate_does_not_raise() -> None:
    stored = hash_password("a\ud800b", cost=COST)
    assert verify_password("a\ud800b", stored)
    assert not verify_password("ab", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "garbage",
        SCHEME_PREFIX,
        SCHEME_PREFIX + "$2b$04$tooshort",
        SCHEME_PREFIX + "$2b$99$" + "a" * 53,  # cost out of range
        "$2b$04$" + "a" * 53,  # bcrypt hash without our prefix
        SCHEME_PREFIX + "$2b$04$" + "é" * 53,
    ],
)
def test_malformed_stored_hash_is_false_and_still_costs_a_bcrypt(
    monkeypatch: pytest.MonkeyPatch, stored: str
) -> None:
    # A cost-4 dummy keeps this fast; set up front, so only the check itself is counted.
    monkeypatch.setitem(
        passwords._dummies, passwords.DEFAULT_COST, hash_password("dummy", cost=COST)
    )
    before = hash_count()
    assert verify_password("anything", stored) is False
    assert hash_count() == before + 1


def test_plain_bcrypt_of_the_raw_password_is_not_accepted() -> None:
    # The prefix promises a pre-hash: a bcrypt of the raw password must not verify.
    import bcrypt

    raw = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=COST)).decode()
    assert not verify_password("secret", SCHEME_PREFIX + raw)


def test_unknown_user_costs_one_bcrypt_and_is_false() -> None:
    dummy = passwords.DUMMY_HASH
    assert dummy.startswith(SCHEME_PREFIX + "$2b$12$")
    assert passwords.DUMMY_HASH is dummy  # made once
    before = hash_count()
    assert verify_unknown_user("whatever") is False
    assert hash_count() == before + 1


def test_hash_count_counts_hash_and_check() -> None:
    before = hash_count()
    stored = hash_password("pw", cost=COST)
    verify_password("pw", stored)
    assert hash_count() == before + 2


@pytest.mark.parametrize("cost", [3, 32, -1])
def test_cost_out_of_range_is_refused(cost: int) -> None:
    with pytest.raises(ValueError, match="cost"):
        hash_password("pw", cost=cost)


def test_unknown_attribute_still_raises() -> None:
    with pytest.raises(AttributeError):
        _ = passwords.NOT_THERE  # type: ignore[attr-defined]


def test_unknown_user_dummy_has_the_cost_asked_for() -> None:
    stored = passwords.hash_password("pw", cost=5)
    assert passwords.cost_of(stored) == 5
    assert passwords.cost_of("garbage") == passwords.DEFAULT_COST
    assert passwords.cost_of(passwords.dummy_hash(5)) == 5
    before = passwords.hash_count()
    assert passwords.verify_unknown_user("pw", cost=5) is False
    assert passwords.hash_count() == before + 1
