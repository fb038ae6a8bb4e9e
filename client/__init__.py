"""The Tether client library: a blocking `Client` and an asyncio `AsyncClient`, one
sans-IO connection state machine (`client.machine`) under both. Depends on `protocol` only.

    from tether.client import Client

    with Client(client_id="demo", username="alice", password="secret") as c:
        inbox = c.subscribe("greetings")  # iterate over it, or pass a handler instead
        c.publish("greetings", "hello", confirm=True)
        print(next(inbox).payload.decode())  # hello
"""

from .aio import AsyncClient, AsyncSubscription
from .backoff import Backoff
from .errors import (
    AuthFailed,
    ClientClosed,
    ConnectionFailed,
    Rejected,
    SessionLost,
    StateFileError,
    TakenOver,
    TetherError,
    Timeout,
)
from .events import Dropped, Message
from .machine import ClientMachine, MachineConfig, Phase
from .options import ClientOptions, Health
from .state import SavedState, load_state, save_state
from .sync import Client, Subscription

__all__ = [
    "AsyncClient",
    "AsyncSubscription",
    "AuthFailed",
    "Backoff",
    "Client",
    "ClientClosed",
    "ClientMachine",
    "ClientOptions",
    "ConnectionFailed",
    "Dropped",
    "Health",
    "MachineConfig",
    "Message",
    "Phase",
    "Rejected",
    "SavedState",
    "SessionLost",
    "StateFileError",
    "Subscription",
    "TakenOver",
    "TetherError",
    "Timeout",
    "load_state",
    "save_state",
]
