"""The Tether client library: a blocking `Client` and an asyncio `AsyncClient`, one
sans-IO connection state machine (`machine.py`) under both. Depends on `tether.protocol` only
(and `tether.files` for the state file).

    from tether.client import Client

    with Client(client_id="demo", username="alice", password="secret", takeover=True) as c:
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
    NotAuthorized,
    PayloadTooLarge,
    Rejected,
    SessionEnded,
    SessionLost,
    StateFileError,
    StateFileLocked,
    TakenOver,
    TetherError,
    Timeout,
    TlsError,
    TlsReason,
)
from .events import Disconnected, Dropped, Message, Reconnected, SubscriptionRevoked
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
    "Disconnected",
    "Dropped",
    "Health",
    "MachineConfig",
    "Message",
    "NotAuthorized",
    "PayloadTooLarge",
    "Phase",
    "Reconnected",
    "Rejected",
    "SavedState",
    "SessionEnded",
    "SessionLost",
    "StateFileError",
    "StateFileLocked",
    "Subscription",
    "SubscriptionRevoked",
    "TakenOver",
    "TetherError",
    "Timeout",
    "TlsError",
    "TlsReason",
    "load_state",
    "save_state",
]
