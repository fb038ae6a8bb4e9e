"""The client's state file: round trip, atomic replacement, and refusing foreign or torn files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tether.client import SavedState, StateFileError, load_state, save_state


def test_round_trip_and_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "dev.state"
    assert load_state(path, "dev") is None  # no file yet: a fresh start
    state = SavedState("dev", "S", "T", {"a": 3, "b": 1})
    save_state(path, state)
    assert load_state(path, "dev") == state
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the resume token
    assert [p.name for p in tmp_path.iterdir()] == ["dev.state"]  # no temp file left


def test_replacement_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "dev.state"
    save_state(path, SavedState("dev", "S", "T1"))

    def crash(*_args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_state(path, SavedState("dev", "S", "T2"))
    monkeypatch.undo()
    assert load_state(path, "dev") == SavedState("dev", "S", "T1")  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["dev.state"]


def test_a_state_file_of_another_client_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.state"
    save_state(path, SavedState("other", "S", "T"))
    with pytest.raises(StateFileError, match="give each client_id its own state file"):
        load_state(path, "dev")


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"version": 2, "client_id": "dev"}',
        '{"version": 1, "client_id": "dev", "session_id": "S"}',
        '{"version": 1, "client_id": "dev", "last_seq": {"t": -1}}',
        '{"version": 1, "client_id": "dev", "last_seq": {"t": true}}',
    ],
)
def test_a_damaged_file_says_what_to_do(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.state"
    path.write_text(text)
    with pytest.raises(StateFileError, match="delete it to start a new session"):
        load_state(path, "dev")
