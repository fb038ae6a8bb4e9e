"""The optional state file: what a restarted process needs to resume its session (session id,
newest resume token, last seq *handled* per topic), replaced atomically. See docs/client.md."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.files import write_atomic

from .errors import StateFileError

__all__ = ["SavedState", "load_state", "save_state"]

_VERSION = 1


@dataclass(frozen=True, slots=True)
class SavedState:
    client_id: str
    session_id: str | None = None
    resume_token: str | None = None
    last_seq: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "client_id": self.client_id,
            "session_id": self.session_id,
            "resume_token": self.resume_token,
            "last_seq": dict(sorted(self.last_seq.items())),
        }


def load_state(path: str | os.PathLike[str], client_id: str) -> SavedState | None:
    """The state saved at `path`, or None when there is no file yet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(
            f"cannot read the state file {path}: {exc.strerror or exc}: fix its permissions"
        ) from None
    try:
        state = _parse(json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise StateFileError(
            f"the state file {path} is damaged ({exc}): delete it to start a new session "
            "(messages queued for the old one will not be received)"
        ) from None
    if state.client_id != client_id:
        raise StateFileError(
            f"the state file {path} belongs to client_id {state.client_id!r}, not "
            f"{client_id!r}: give each client_id its own state file"
        )
    return state


def _parse(data: object) -> SavedState:
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        raise ValueError(f"not a version {_VERSION} Tether client state")
    session_id, token = data.get("session_id"), data.get("resume_token")
    if (session_id is None) != (token is None):
        raise ValueError("session_id and resume_token go together")
    for value in (session_id, token):
        if value is not None and not isinstance(value, str):
            raise TypeError("session_id and resume_token must be strings")
    client_id = data["client_id"]
    if not isinstance(client_id, str):
        raise TypeError("client_id must be a string")
    raw = data.get("last_seq", {})
    if not isinstance(raw, dict):
        raise TypeError("last_seq must be an object")
    last_seq: dict[str, int] = {}
    for topic, seq in raw.items():
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise TypeError(f"last_seq[{topic!r}] must be an int >= 0")
        last_seq[topic] = seq
    return SavedState(client_id, session_id, token, last_seq)


def save_state(path: str | os.PathLike[str], state: SavedState) -> None:
    """Replace the file at `path` atomically and durably. Mode 0600: it holds a credential."""
    write_atomic(path, json.dumps(state.to_json(), separators=(",", ":")).encode(), 0o600)
