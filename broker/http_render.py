"""JSON rendering for the HTTP API: sessions in exactly the shape of docs/operations.md (issue 11),
times as RFC 3339 UTC with a `Z`, and device-sent data made safe for JSON.

What a device sends (metadata, health details) is msgpack, which holds more than JSON can.
It is rendered, recursively, as follows (documented in docs/operations.md):

- bytes become a str of their standard base64 (with padding);
- map keys that are not str become str: bytes keys base64 as above, others as JSON would
  write them (`1`, `1.5`, `true`, `null`); if two keys render alike, the later one wins;
- floats that JSON cannot hold (NaN, Infinity, -Infinity) become the str "NaN", "Infinity",
  "-Infinity";
- tuples become lists; anything else (a msgpack extension type) becomes its `repr` str.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tether.broker.messages import SessionView, SubscriptionView

__all__ = ["dumps", "json_safe", "rfc3339", "session_json"]


def rfc3339(when: float | None) -> str | None:
    """Seconds since the epoch as `2026-11-29T16:05:17Z` (seconds precision, UTC)."""
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(key)).decode("ascii")
    safe = json_safe(key)
    return safe if isinstance(safe, str) else json.dumps(safe)


def json_safe(value: object) -> Any:
    """`value` with everything JSON cannot hold replaced (see the module's docstring)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {_key(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [json_safe(item) for item in value]
    return repr(value)


def session_json(view: SessionView, subscriptions: Sequence[SubscriptionView]) -> dict[str, Any]:
    """One session object, its keys in the documented order."""
    health = view.health
    return {
        "client_id": view.client_id,
        "username": view.username,
        "session_id": view.session_id,
        "status": view.status,
        "connected_since": rfc3339(view.connected_since),
        "away_since": rfc3339(view.away_since),
        "last_seen": rfc3339(view.last_seen),
        "expires_at": rfc3339(view.expires_at),
        "peer": view.peer,
        "keepalive": view.keepalive,
        "metadata": json_safe(view.metadata),
        "health": {
            "status": health.status,
            "details": json_safe(health.details),
            "at": rfc3339(health.at),
            "stale": health.stale,
        },
        "subscriptions": [
            {"topic": s.topic, "queued": s.queued, "unacked": s.unacked, "dropped": s.dropped}
            for s in subscriptions
        ],
    }


def dumps(value: object) -> str:
    """Strict JSON (no NaN), ASCII only: safe to embed anywhere, whatever the ids hold."""
    return json.dumps(value, allow_nan=False, separators=(", ", ": "))
