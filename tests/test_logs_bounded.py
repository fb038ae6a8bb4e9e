"""Issue 12: every log line renders its values bounded and safely, so the `session_registered`
audit line is written whatever the client's metadata holds (binary keys, nesting 1,000 deep,
huge maps, long strings), in JSON and console formats alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from tests.helpers import Dial, registered
from tests.wire import wait_for
from tether.broker.logs import (
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_STR,
    bound_values,
    configure_logging,
    get_logger,
)
from tether.broker.server import Broker


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def configure(fmt: str) -> None:
    configure_logging(fmt, "info")
    # No caching: a module-level logger the broker uses here must not keep this set-up for
    # the tests that run after this one.
    structlog.configure(cache_logger_on_first_use=False)


def deep(levels: int) -> dict[Any, Any]:
    m: dict[Any, Any] = {"leaf": 1}
    for i in range(levels - 1):
        m = {f"l{i}": m}
    return m


def hostile_metadata() -> dict[Any, Any]:
    """What the decoder now refuses, built directly: the logger must cope anyway."""
    return {
        "deep": deep(1000),
        b"\xff\xfe binary key": b"\x00\x01 binary value",
        7: "int key",
        (1, 2): "tuple key",
        "long": "x" * 100_000,
        "wide": {f"k{i}": i for i in range(10_000)},
        "list": list(range(10_000)),
        "huge_int": 10**5000,
        "nested_lists": [[[[[[[[[["bottom"]]]]]]]]]],
    }


def depth_of(x: Any) -> int:
    if isinstance(x, dict):
        return 1 + max((depth_of(v) for v in x.values()), default=0)
    if isinstance(x, list):
        return 1 + max((depth_of(v) for v in x), default=0)
    return 0


def log_registered(metadata: Any) -> None:
    get_logger("tether.sessions").info(
        "session_registered", session_id="s-1", client_id="dev", metadata=metadata
    )


def test_json_audit_line_is_written_and_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    configure("json")
    log_registered(hostile_metadata())
    out = capsys.readouterr().out
    [text] = out.splitlines()
    assert len(text) < 64 * 1024
    line = json.loads(text)
    assert line["event"] == "session_registered" and line["client_id"] == "dev"
    meta = line["metadata"]
    assert meta["b'\\xff\\xfe binary key'"] == "b'\\x00\\x01 binary value'"
    assert meta["7"] == "int key" and meta["(1, 2)"] == "tuple key"
    assert meta["long"].startswith("x" * MAX_STR) and "more chars" in meta["long"]
    assert len(meta["long"]) < MAX_STR + 40
    assert len(meta["wide"]) == MAX_ITEMS + 1 and meta["wide"]["..."] == "9968 more items"
    assert len(meta["list"]) == MAX_ITEMS + 1 and meta["list"][-1] == "...[9968 more items]"
    assert meta["huge_int"].startswith("<int of ")
    assert depth_of(meta) <= MAX_DEPTH
    assert "cut>" in json.dumps(meta["deep"])


def test_console_audit_line_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    configure("console")
    log_registered(hostile_metadata())
    out = capsys.readouterr().out
    assert "session_registered" in out and "binary key" in out
    assert len(out) < 64 * 1024


def test_a_self_referencing_value_and_a_stdlib_line_are_bounded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("json")
    loop: dict[str, Any] = {}
    loop["me"] = loop
    get_logger("tether.test").info("looped", value=loop, raw=bytearray(b"\x80" * 5000))
    logging.getLogger("pykka").warning("%s", "y" * 50_000)
    ours, theirs = (json.loads(t) for t in capsys.readouterr().out.splitlines())
    assert depth_of(ours["value"]) <= MAX_DEPTH
    assert ours["raw"].startswith("b'\\x80") and ours["raw"].endswith("more bytes]")
    assert len(theirs["event"]) < 10_000


def test_the_line_total_is_bounded_across_values() -> None:
    many = {f"v{i}": {f"k{j}": [1, 2, 3] for j in range(MAX_ITEMS)} for i in range(50)}
    out = bound_values(None, "info", {"event": "e", **many})
    assert len(json.dumps(out)) < 64 * 1024
    assert list(out) == ["event", *many]  # every key kept; the later values cut
    assert any("cut>" in json.dumps(v) for v in out.values())


def test_plain_values_pass_unchanged() -> None:
    event = {"event": "e", "n": 3, "ok": True, "f": 1.5, "none": None, "s": "short"}
    assert bound_values(None, "info", dict(event)) == event


def test_broker_writes_the_audit_line_for_a_binary_key(
    start_broker: Callable[..., Broker], dial: Dial, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("json")
    broker = start_broker()
    client = dial(broker)
    meta = {b"\xff\x00": b"\x01", "nested": deep(7), 3: [b"x"]}
    registered(client.register("bin-keys", metadata=meta))
    lines: list[dict[str, Any]] = []

    def audit_line_seen() -> bool:
        for text in capsys.readouterr().out.splitlines():
            if text.startswith("{"):
                lines.append(json.loads(text))
        return any(line.get("event") == "session_registered" for line in lines)

    wait_for(audit_line_seen)
    [line] = [line for line in lines if line.get("event") == "session_registered"]
    assert line["client_id"] == "bin-keys"
    assert line["metadata"]["b'\\xff\\x00'"] == "b'\\x01'"
    assert line["metadata"]["3"] == ["b'x'"]
