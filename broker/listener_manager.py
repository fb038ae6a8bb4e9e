"""ListenerManager: owns the listening socket and spawns one Listener per connection.

See docs/architecture.md sections 2 and 4.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pykka import ActorRef

from tether.broker.listener import CloseConnection, Listener
from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import GetMetrics, GetStats, ListenerClosed
from tether.broker.netedge import Connection, ConnectionHandler
from tether.broker.sessions import BrokerDraining

if TYPE_CHECKING:
    from tether.broker.sessions import SessionManager
    from tether.broker.subscribers import SubscriberManager
    from tether.broker.supervisor import BrokerSupervisor

_log = structlog.get_logger("tether.listeners")

LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class StartListening:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class StopListening:
    pass


@dataclass(frozen=True, slots=True)
class Drain:
    """Shutdown, first step: stop accepting and close every connection cleanly (each Listener
    closes its link; its session goes away as after any disconnect). `drained` is set once the
    last Listener has reported `ListenerClosed`. Answered with the number of connections open."""

    drained: threading.Event


class ListenerManager(LoopActor):
    resume_after_failure = True

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        *,
        supervisor: ActorRef[BrokerSupervisor],
        session_manager: ActorRef[SessionManager],
        subscriber_manager: ActorRef[SubscriberManager],
        max_frame: int,
        register_timeout: float,
        high_water: int,
    ) -> None:
        super().__init__(loop, loop_thread)
        self._supervisor = supervisor
        self._session_manager = session_manager
        self._subscribers = subscriber_manager
        self._max_frame = max_frame
        self._register_timeout = register_timeout
        self._high_water = high_water
        self._conn_ids = itertools.count(1)
        self._listeners: dict[int, ActorRef[Listener]] = {}
        self._server: asyncio.Server | None = None
        self._drained: threading.Event | None = None  # set by Drain: shutting down
        self.accepted = 0

    def on_receive(self, message: Any) -> Any:
        match message:
            case StartListening(host, port):
                # Answered with a future the caller (outside the loop) waits on.
                return asyncio.run_coroutine_threadsafe(self._listen(host, port), self.loop)
            case StopListening():
                if self._server is not None:
                    self._server.close()
                    self._server = None
                for ref in list(self._listeners.values()):
                    ref.stop(block=False)
                self._listeners.clear()
            case Drain(drained):
                if self._server is not None:
                    self._server.close()
                    self._server = None
                self._drained = drained
                # First, so that the disconnects that follow are told apart as the shutdown's.
                tell(self._session_manager, BrokerDraining())
                for ref in self._listeners.values():
                    tell(ref, CloseConnection())
                if not self._listeners:
                    drained.set()
                return len(self._listeners)
            case ListenerClosed(conn_id):
                self._listeners.pop(conn_id, None)
                if self._drained is not None and not self._listeners:
                    self._drained.set()
            case GetStats():
                return {"connections": len(self._listeners), "accepted": self.accepted}
            case GetMetrics():
                return {
                    "connections_open": len(self._listeners),
                    "connections_accepted": self.accepted,
                }
            case _:
                return super().on_receive(message)
        return None

    async def _listen(self, host: str, port: int) -> tuple[str, int]:
        self._server = await self.loop.create_server(
            self._new_connection, host, port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        _log.info("listening", host=sockname[0], port=sockname[1])
        return sockname[0], sockname[1]

    def _new_connection(self) -> Connection:
        return Connection(self.loop, make_handler=self._spawn, high_water=self._high_water)

    def _spawn(self, link: Connection) -> ConnectionHandler:
        conn_id = next(self._conn_ids)
        self.accepted += 1
        listener = Listener(
            self.loop,
            self._loop_thread,
            link=link,
            conn_id=conn_id,
            supervisor=self._supervisor,
            session_manager=self._session_manager,
            subscriber_manager=self._subscribers,
            listener_manager=self.actor_ref,
            max_frame=self._max_frame,
            register_timeout=self._register_timeout,
        )
        # Not `Listener.start()`: the connection needs the object itself as its handler (both
        # run on this loop thread), and this manager, not pykka's registry (whose removal is a
        # list scan), keeps the listeners for shutdown.
        self._listeners[conn_id] = listener.start_unregistered()
        return listener
