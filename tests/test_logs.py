"""configure_logging: JSON lines on stdout for structlog and stdlib logging alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog

from tether.broker.logs import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # configure_logging changes process-wide state: put it back for the other tests.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def test_json_line_has_timestamp_level_event_and_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    structlog.contextvars.bind_contextvars(session_id="s-42")
    get_logger("tether.test").info("session resumed", queued=3)

    [line] = _json_lines(capsys)
    assert line["event"] == "session resumed"
    assert line["level"] == "info"
    assert line["logger"] == "tether.test"
    assert line["session_id"] == "s-42"
    assert line["queued"] == 3
    offset = datetime.fromisoformat(line["timestamp"]).utcoffset()
    assert offset is not None and offset.total_seconds() == 0  # UTC, and says so


def test_stdlib_logging_is_routed_through_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    structlog.contextvars.bind_contextvars(session_id="s-7")
    logging.getLogger("pykka").warning("actor %s crashed", "Session-1")

    [line] = _json_lines(capsys)
    assert line["event"] == "actor Session-1 crashed"
    assert line["level"] == "warning"
    assert line["logger"] == "pykka"
    assert line["session_id"] == "s-7"
    assert "timestamp" in line


def test_exceptions_are_rendered_into_the_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("tether.test").exception("handler failed")
        logging.getLogger("pykka").exception("stdlib failed")

    ours, theirs = _json_lines(capsys)
    for line in (ours, theirs):
        assert line["level"] == "error"
        assert "RuntimeError: boom" in line["exception"]


def test_level_filters_both_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "warning")
    get_logger("tether.test").info("hidden")
    logging.getLogger("pykka").info("hidden too")
    get_logger("tether.test").warning("shown")

    assert [line["event"] for line in _json_lines(capsys)] == ["shown"]


def test_calling_twice_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("tether.test")  # made before configuring, as module-level loggers are
    configure_logging("console", "debug")
    configure_logging("json", "info")
    log.info("once")
    logging.getLogger("other").info("also once")

    assert [line["event"] for line in _json_lines(capsys)] == ["once", "also once"]


def test_console_format_goes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "info")
    get_logger("tether.test").info("hello console", session_id="s-1")
    captured = capsys.readouterr()
    assert "hello console" in captured.out and "session_id" in captured.out
    assert captured.err == ""


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "loud")])
def test_bad_arguments_are_refused(fmt: str, level: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(fmt, level)
