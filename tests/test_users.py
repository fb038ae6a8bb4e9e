"""The users file: loading, adding, replacing, atomic writes and clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tether.broker.passwords import verify_password
from tether.broker.users import (
    FILE_VERSION,
    UserExistsError,
    UserFileError,
    UserNameError,
    UserNotFoundError,
    UserStore,
    add_user,
    remove_user,
)

COST = 4


def test_missing_file_is_an_empty_store(tmp_path: Path) -> None:
    store = UserStore.load(tmp_path / "nope.json")
    assert len(store) == 0
    assert store.names() == []
    assert store.lookup("admin") is None
    assert "admin" not in store


def test_add_then_load(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw-a", cost=COST)
    add_user(path, "bob", "pw-b", cost=COST)
    store = UserStore.load(path)
    assert store.names() == ["alice", "bob"]
    assert "alice" in store
    hash_a = store.lookup("alice")
    assert hash_a is not None and verify_password("pw-a", hash_a)
    assert not verify_password("pw-b", hash_a)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert set(doc["users"]["alice"]) == {"hash", "created"}
    assert doc["users"]["alice"]["created"].endswith("Z")


def test_file_mode_is_0600_and_no_temp_files_left(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw", cost=COST)
    add_user(path, "bob", "pw", cost=COST)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json"]


def test_write_is_a_rename_not_an_in_place_edit(tmp_path: Path) -> None:
    # Readers holding the old file keep seeing the old content: it was replaced, not rewritten.
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw", cost=COST)
    before = path.stat().st_ino
    with path.open() as old:
        add_user(path, "bob", "pw", cost=COST)
        assert "bob" not in json.load(old)["users"]
    assert path.stat().st_ino != before


def test_existing_user_needs_replace(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "old", cost=COST)
    created = json.loads(path.read_text())["users"]["alice"]["created"]
    with pytest.raises(UserExistsError, match="alice"):
        add_user(path, "alice", "new", cost=COST)
    stored = UserStore.load(path).lookup("alice")
    assert stored is not None and verify_password("old", stored)

    add_user(path, "alice", "new", cost=COST, replace=True)
    stored = UserStore.load(path).lookup("alice")
    assert stored is not None and verify_password("new", stored)
    assert not verify_password("old", stored)
    assert json.loads(path.read_text())["users"]["alice"]["created"] == created


def test_replace_adds_a_missing_user(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "carol", "pw", cost=COST, replace=True)
    assert "carol" in UserStore.load(path)


def test_missing_parent_directory_is_refused_not_created(tmp_path: Path) -> None:
    path = tmp_path / "var" / "users.json"
    with pytest.raises(UserFileError, match="does not exist: create it first"):
        add_user(path, "alice", "pw", cost=COST)
    assert not (tmp_path / "var").exists()


def test_remove_user(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw", cost=COST)
    add_user(path, "bob", "pw", cost=COST)
    remove_user(path, "alice")
    assert UserStore.load(path).names() == ["bob"]
    with pytest.raises(UserNotFoundError, match="'alice'"):
        remove_user(path, "alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_end_sessions_writes_version_2_and_keeps_created(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw", cost=COST)
    add_user(path, "bob", "pw", cost=COST)
    created = UserStore.load(path).records()["alice"].created
    add_user(path, "alice", "new", cost=COST, replace=True, end_sessions=True)
    doc = json.loads(path.read_text())
    assert doc["version"] == 2
    entry = doc["users"]["alice"]
    assert entry["created"] == created and entry["sessions_valid_after"].endswith("Z")
    assert "sessions_valid_after" not in doc["users"]["bob"]
    store = UserStore.load(path)
    after = store.valid_after()
    assert after["bob"] is None
    assert after["alice"] is not None and after["alice"] > 0
    # A later password change without --end-sessions keeps the mark.
    add_user(path, "alice", "newer", cost=COST, replace=True)
    kept = UserStore.load(path).records()["alice"].sessions_valid_after
    assert kept == entry["sessions_valid_after"]


def test_admin_mark_writes_version_3_and_is_kept_on_replace(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "ops", "pw", cost=COST, admin=True)
    add_user(path, "dev", "pw", cost=COST)
    doc = json.loads(path.read_text())
    assert doc["version"] == 3 < FILE_VERSION  # version 4 adds topic permissions
    assert doc["users"]["ops"]["admin"] is True and "admin" not in doc["users"]["dev"]
    store = UserStore.load(path)
    assert store.is_admin("ops") and not store.is_admin("dev") and not store.is_admin("nobody")
    add_user(path, "ops", "new", cost=COST, replace=True)  # admin=None keeps the mark
    assert UserStore.load(path).is_admin("ops")
    add_user(path, "ops", "new", cost=COST, replace=True, admin=False)
    assert not UserStore.load(path).is_admin("ops")
    assert json.loads(path.read_text())["version"] == 1  # nothing of version 2 or 3 left


@pytest.mark.parametrize(
    ("version", "admin", "match"),
    [(2, True, "needs"), (3, "yes", "true or false"), (3, 1, "true or false")],
)
def test_admin_mark_is_validated(tmp_path: Path, version: int, admin: object, match: str) -> None:
    path = tmp_path / "users.json"
    add_user(path, "ops", "pw", cost=COST)
    doc = json.loads(path.read_text())
    doc["version"] = version
    doc["users"]["ops"]["admin"] = admin
    path.write_text(json.dumps(doc))
    with pytest.raises(UserFileError, match=match):
        UserStore.load(path)


def test_version_1_files_still_load(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw", cost=COST)
    assert json.loads(path.read_text())["version"] == 1  # nothing of version 2 in it
    assert UserStore.load(path).valid_after() == {"alice": None}


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"version": FILE_VERSION + 1, "users": {}}))
    with pytest.raises(UserFileError, match="newer than this broker reads"):
        UserStore.load(path)


@pytest.mark.parametrize("name", ["", "x" * 129, "bad\nname", "tab\there", "nul\x00", "del\x7f"])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "users.json"
    with pytest.raises(UserNameError):
        add_user(path, name, "pw", cost=COST)
    assert not path.exists()


@pytest.mark.parametrize("name", ["a", "x" * 128, "Zoë", "user@example.com", "with space"])
def test_valid_names_are_accepted(tmp_path: Path, name: str) -> None:
    path = tmp_path / "users.json"
    add_user(path, name, "pw", cost=COST)
    assert name in UserStore.load(path)


def test_empty_password_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        add_user(tmp_path / "users.json", "alice", "", cost=COST)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[]", "object"),
        (b'{"version": 0, "users": {}}', "version"),
        (b'{"version": "2", "users": {}}', "version"),
        (b'{"version": 1}', "users"),
        (b'{"version": 1, "users": {"a": "hash"}}', "'a'"),
        (b'{"version": 1, "users": {"a": {"created": "x"}}}', "hash"),
        (b'{"version": 1, "users": {"a": {"hash": "h"}}}', "created"),
        (b'{"version": 1, "users": {"a\\u0001": {"hash": "h", "created": "x"}}}', "control"),
        # Not a hash `user add` writes: refused at load, not found out at every login.
        (b'{"version": 1, "users": {"a": {"hash": "h", "created": "x"}}}', "'a'.*not a bcrypt"),
        (b'{"version": 1, "users": {"a": {"hash": "$2b$12$abc", "created": "x"}}}', "bcrypt"),
        (
            b'{"version": 1, "users": {"a": {"hash": "bcrypt-sha256$x", "created": "x", '
            b'"sessions_valid_after": "2026-01-01T00:00:00Z"}}}',
            "needs",
        ),
    ],
)
def test_malformed_file_names_the_path(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "users.json"
    path.write_bytes(content)
    with pytest.raises(UserFileError, match=why) as info:
        UserStore.load(path)
    assert str(path) in str(info.value)
    # add_user must not paper over a broken file by writing a fresh one.
    with pytest.raises(UserFileError):
        add_user(path, "alice", "pw", cost=COST)
    assert path.read_bytes() == content


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_a_user_file_error(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw", cost=COST)
    path.chmod(0)
    with pytest.raises(UserFileError, match="cannot read"):
        UserStore.load(path)


def test_store_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "pw", cost=COST)
    store = UserStore.load(path)
    with pytest.raises(TypeError):
        store.records()["mallory"] = store.records()["alice"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        store.extra = 1  # type: ignore[attr-defined]
    # Later writes to the file do not reach an already loaded store.
    add_user(path, "bob", "pw", cost=COST)
    assert "bob" not in store
