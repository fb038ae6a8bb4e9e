"""Issue 12, the users file: per-user client id prefixes (`client_id_prefixes`, format version
3, `tether user add --client-id-prefix`), and a users file that group or others may read is
refused by `tether serve` (or accepted with a warning under --insecure-users-file); the
watcher's reload warns when the mode becomes too open."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli_user import fake_server  # noqa: F401  (a fixture)
from tests.wire import wait_for
from tether.broker.users import (
    FILE_VERSION,
    UserFileError,
    UserStore,
    add_user,
    insecure_mode,
)
from tether.broker.userwatch import UserWatcher
from tether.cli import main

COST = 4


def write_doc(path: Path, users: dict[str, Any], version: int = 3) -> None:
    path.write_text(json.dumps({"version": version, "users": users}))


def entry(path: Path, **extra: Any) -> dict[str, Any]:
    """A valid user entry (a real hash) with `extra` fields."""
    probe = path.with_name("probe.json")
    add_user(probe, "probe", "pw", cost=COST, replace=True)
    base: dict[str, Any] = json.loads(probe.read_text())["users"]["probe"]
    return {**base, **extra}


# --- the file format ------------------------------------------------------------------------


def test_prefixes_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write_doc(
        path,
        {
            "fleet": entry(path, client_id_prefixes=["sensor-", "cam-"]),
            "anyone": entry(path),
        },
    )
    store = UserStore.load(path)
    assert store.client_id_allowed("fleet", "sensor-12")
    assert store.client_id_allowed("fleet", "cam-1")
    assert not store.client_id_allowed("fleet", "alice-sensor")
    assert not store.client_id_allowed("fleet", "sensor")  # the whole prefix must match
    assert store.client_id_allowed("anyone", "whatever")
    # A prefix some user is limited to is reserved to that user: no squatting.
    assert not store.client_id_allowed("anyone", "sensor-12")
    assert not store.client_id_allowed("anyone", "cam-")
    assert store.client_id_allowed("anyone", "sensor")
    assert not store.client_id_allowed("nobody", "sensor-1")
    record = store.get("fleet")
    assert record is not None and record.client_id_prefixes == ("sensor-", "cam-")


@pytest.mark.parametrize(
    ("value", "version", "words"),
    [
        (["sensor-"], 2, 'needs "version": 3'),
        ([], 3, "non-empty list"),
        ("sensor-", 3, "non-empty list"),
        ([7], 3, "1 to 128 characters"),
        ([""], 3, "1 to 128 characters"),
        (["x" * 129], 3, "1 to 128 characters"),
        (["bad\nprefix"], 3, "control characters"),
    ],
)
def test_bad_prefixes_make_the_file_malformed(
    tmp_path: Path, value: Any, version: int, words: str
) -> None:
    path = tmp_path / "users.json"
    write_doc(path, {"fleet": entry(path, client_id_prefixes=value)}, version)
    with pytest.raises(UserFileError, match=words):
        UserStore.load(path)


def test_add_user_writes_keeps_replaces_and_clears_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "plain", "pw", cost=COST)
    assert json.loads(path.read_text())["version"] == 1  # still readable by older brokers
    add_user(path, "fleet", "pw", cost=COST, client_id_prefixes=["s-", "c-", "s-"])
    doc = json.loads(path.read_text())
    assert doc["version"] == 3 < FILE_VERSION  # version 4 adds topic permissions
    assert doc["users"]["fleet"]["client_id_prefixes"] == ["s-", "c-"]
    assert "client_id_prefixes" not in doc["users"]["plain"]

    def prefixes() -> Any:
        record = UserStore.load(path).get("fleet")
        assert record is not None
        return record.client_id_prefixes

    add_user(path, "fleet", "pw2", cost=COST, replace=True)  # None: kept
    assert prefixes() == ("s-", "c-")
    add_user(path, "fleet", "pw3", cost=COST, replace=True, client_id_prefixes=["x-"])
    assert prefixes() == ("x-",)
    add_user(path, "fleet", "pw4", cost=COST, replace=True, client_id_prefixes=[])
    assert prefixes() is None
    assert json.loads(path.read_text())["version"] == 1
    with pytest.raises(ValueError, match="control characters"):
        add_user(path, "other", "pw", cost=COST, client_id_prefixes=["a\x00"])


# --- the command line -----------------------------------------------------------------------


def run_add(monkeypatch: pytest.MonkeyPatch, path: Path, name: str, *extra: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    return main(["user", "add", name, "--users", str(path), "--cost", str(COST), *extra])


def listed(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, list[str]]:
    capsys.readouterr()
    assert main(["user", "list", "--users", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split("\t")[0]: line.split("\t")[2:] for line in lines}


def test_cli_prefixes_add_list_replace_clear(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    assert run_add(monkeypatch, path, "fleet", "--client-id-prefix", "sensor-") == 0
    assert run_add(monkeypatch, path, "ops", "--admin", "--client-id-prefix", "a b,") == 0
    assert run_add(monkeypatch, path, "dev") == 0
    assert listed(path, capsys) == {
        "dev": [],
        "fleet": ["client ids starting with 'sensor-'"],
        "ops": ["admin", "client ids starting with 'a b,'"],
    }
    argv = ["--replace", "--client-id-prefix", "cam-", "--client-id-prefix", "mic-"]
    assert run_add(monkeypatch, path, "fleet", *argv) == 0
    assert listed(path, capsys)["fleet"] == ["client ids starting with 'cam-', 'mic-'"]
    assert run_add(monkeypatch, path, "fleet", "--replace") == 0  # kept
    assert listed(path, capsys)["fleet"] == ["client ids starting with 'cam-', 'mic-'"]
    assert run_add(monkeypatch, path, "fleet", "--replace", "--any-client-id") == 0
    assert listed(path, capsys)["fleet"] == []
    assert UserStore.load(path).client_id_allowed("fleet", "anything")


def test_cli_refuses_a_bad_prefix_before_asking_for_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    monkeypatch.setattr(sys, "stdin", None)  # reading a password would fail differently
    assert main(["user", "add", "x", "--users", str(path), "--client-id-prefix", ""]) != 0
    err = capsys.readouterr().err
    assert "1 to 128 characters" in err and len(err.splitlines()) == 1
    assert not path.exists()


def test_cli_prefix_and_any_client_id_exclude_each_other(tmp_path: Path) -> None:
    argv = ["user", "add", "x", "--users", str(tmp_path / "u.json")]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--client-id-prefix", "a-", "--any-client-id"])
    assert info.value.code == 2


# --- the users file's mode ------------------------------------------------------------------


def test_add_user_writes_0600_and_insecure_mode_sees_group_or_other_access(
    tmp_path: Path,
) -> None:
    path = tmp_path / "users.json"
    add_user(path, "a", "pw", cost=COST)
    assert insecure_mode(path) is None
    for mode in (0o640, 0o604, 0o620):
        path.chmod(mode)
        assert insecure_mode(path) == mode
    assert insecure_mode(tmp_path / "missing.json") is None


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_serve_refuses_a_group_readable_users_file(
    fake_server: list[Any],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    path = tmp_path / "users.json"
    add_user(path, "a", "pw", cost=COST)
    path.chmod(0o644)
    assert main(["serve", "--users", str(path), "--log-format", "json"]) == 2
    assert fake_server == []
    [line] = capsys.readouterr().err.splitlines()
    assert f"chmod 600 {path}" in line and "0644" in line

    assert main(["serve", "--users", str(path), "--insecure-users-file"]) == 0
    [config] = fake_server
    assert config.insecure_users_file is True
    lines = [json.loads(t) for t in capsys.readouterr().out.splitlines()]
    [warning] = [t for t in lines if t["event"] == "users_file_insecure"]
    assert warning["level"] == "warning" and warning["hint"] == f"chmod 600 {path}"

    path.chmod(0o600)
    assert main(["serve", "--users", str(path)]) == 0
    assert len(fake_server) == 2


def test_the_watcher_warns_when_the_mode_opens_and_still_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "users.json"
    add_user(path, "a", "pw", cost=COST)
    loads: list[UserStore] = []
    watcher = UserWatcher(path, loads.append, interval=0.02)
    watcher.start()
    try:

        def insecure_lines() -> list[str]:
            return [
                r.getMessage() for r in caplog.records if "users_file_insecure" in r.getMessage()
            ]

        path.chmod(0o644)  # a chmod alone: same inode, size and mtime
        wait_for(lambda: bool(insecure_lines()))
        assert "0644" in insecure_lines()[0] and f"chmod 600 {path}" in insecure_lines()[0]
        assert loads and "a" in loads[-1]  # the reload was not refused
        count = len(loads)
        path.chmod(0o600)
        wait_for(lambda: len(loads) > count)
        assert len(insecure_lines()) == 1  # no warning for the safe mode
    finally:
        watcher.stop()
