"""Issue 9, item 10, the library's part: one client per state file. A second client (in this
process or another) fails at its start, naming the file and the holder's pid, instead of
silently taking the session over; the lock goes with its holder, however that ends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.test_client_chaos import FAST
from tests.test_client_connect import free_port
from tether.broker.server import Broker
from tether.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    StateFileError,
    StateFileLocked,
)
from tether.client.state import lock_state


def client(broker: Broker, state: Path, **kw: Any) -> Client:
    assert broker.address is not None
    host, port = broker.address
    options: dict[str, Any] = {
        "username": "alice",
        "password": "secret",
        "host": host,
        "port": port,
        **FAST,
        **kw,
    }
    return Client(client_id="keeper", state_file=state, **options)


def test_a_second_client_on_one_state_file_fails_at_its_start(
    broker: Broker, tmp_path: Path
) -> None:
    state = tmp_path / "keeper.state"
    with client(broker, state) as first:
        session = first.session_id
        with pytest.raises(StateFileLocked) as info:
            client(broker, state)
        error = info.value
        assert isinstance(error, StateFileError)
        assert error.pid == os.getpid() and error.path == str(state)
        assert str(state) in str(error) and f"process {os.getpid()}" in str(error)
        assert first.connected and first.session_id == session  # not taken over

        async def second() -> None:
            with pytest.raises(StateFileLocked):
                AsyncClient(
                    client_id="keeper", username="alice", password="secret", state_file=state
                )

        asyncio.run(second())
    # Released at close, and its lock file gone: the next run resumes the session.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keeper.state"]
    with client(broker, state) as again:
        assert again.session_id == session


def test_a_client_that_fails_to_start_lets_go_of_the_state_file(
    broker: Broker, tmp_path: Path
) -> None:
    state = tmp_path / "keeper.state"
    with client(broker, state):
        pass
    # Another client_id's file: refused at construction, and not left locked.
    with pytest.raises(StateFileError, match="belongs to client_id 'keeper'"):
        Client(client_id="other", username="u", password="p", state_file=state)
    lock_state(state).release()
    # A failed connect() closes the client, which lets go of the file.
    with pytest.raises(ConnectionFailed, match="refused"):
        client(broker, state, port=free_port()).connect()
    lock_state(state).release()
    # A directory that does not exist: a clear StateFileError, at the start.
    with pytest.raises(StateFileError, match="directory exists"):
        client(broker, tmp_path / "nowhere" / "x.state")


def test_the_lock_of_a_live_process_is_refused_and_that_of_a_dead_one_is_not(
    broker: Broker, tmp_path: Path
) -> None:
    assert broker.address is not None
    state = tmp_path / "keeper.state"
    holder = textwrap.dedent(
        f"""
        import sys
        from tether.client import Client
        c = Client(client_id="keeper", username="alice", password="secret",
                   port={broker.address[1]}, state_file={str(state)!r}).connect()
        print("ready", flush=True)
        sys.stdin.read()  # until the test kills it
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        with pytest.raises(StateFileLocked) as info:
            client(broker, state)
        assert info.value.pid == process.pid
        assert f"process {process.pid}" in str(info.value)
        # Killed (no close(), no cleanup): the OS drops the lock with the process.
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        with client(broker, state, takeover=True) as c:
            assert c.connected
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
