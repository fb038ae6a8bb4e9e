"""`tether.files.write_atomic`: content, mode, durability, and nothing left behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tether.files import write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_the_bytes_with_a_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    write_atomic(path, b'{"a": 1}\n')
    assert path.read_bytes() == b'{"a": 1}\n'
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.json"]


def test_replaces_an_existing_file_and_sets_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old, and much longer than the new content")
    path.chmod(0o644)
    write_atomic(str(path), b"new", mode=0o640)  # a str path works too
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o640  # not the old file's mode, and not narrowed by the umask
    write_atomic(path, b"")
    assert path.read_bytes() == b""
    assert _mode(path) == 0o600


def test_fsyncs_the_file_and_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []  # per fsync: was it a directory?
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "f", b"data")
    assert synced == [False, True]  # the bytes, then the rename


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failure_leaves_the_old_file_whole_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"old")

    def crash(*_args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "f", "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_the_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "f", b"data")
    assert list(tmp_path.iterdir()) == []
