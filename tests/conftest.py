from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.helpers import broker_factory
from tests.wire import WireClient
from tether.broker.server import Broker
from tether.broker.users import add_user

PASSWORDS = {"alice": "secret", "bob": "hunter2"}


@pytest.fixture(autouse=True)
def _broker_logs_through_logging() -> None:
    """Brokers started in-process log through the standard library, which pytest captures
    (shown with a failing test), instead of structlog's default printer, whose lines from
    the brokers' threads land in pytest's own output between tests."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.KeyValueRenderer(key_order=["event"]),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users.json"
    for name, password in PASSWORDS.items():
        add_user(path, name, password, cost=4)
    return path


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    """Subprocesses a test started (brokers, CLI commands): killed if still running after it."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
def start_broker(users_file: Path) -> Iterator[Callable[..., Broker]]:
    with broker_factory(users_file) as start:
        yield start


@pytest.fixture
def live(users_path: Path) -> Iterator[Callable[..., Broker]]:
    """Brokers that load their users from the test module's `users_path` fixture and watch
    it."""
    with broker_factory(users_path, watched=True) as start:
        yield start


@pytest.fixture
def broker(start_broker: Callable[..., Broker]) -> Broker:
    return start_broker()


@pytest.fixture
def connect(broker: Broker) -> Iterator[Callable[[], WireClient]]:
    clients: list[WireClient] = []

    def make() -> WireClient:
        assert broker.address is not None
        client = WireClient(broker.address)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def dial() -> Iterator[Callable[[Broker], WireClient]]:
    """Connect a WireClient to any broker started in the test; closed at teardown."""
    made: list[WireClient] = []

    def make(broker: Broker, timeout: float = 2.0) -> WireClient:
        assert broker.address is not None
        client = WireClient(broker.address, timeout=timeout)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
