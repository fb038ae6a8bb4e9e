"""`BrokerFleet`: the HTTP endpoint's view of one Broker (the `http.Fleet` facade). Each call
asks actors from the calling thread (the HTTP side's executor, never the broker's loop) with
a timeout, and turns a broker that cannot answer into `Unavailable`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import pykka
import structlog
from pykka import ActorRef

from tether.broker.http import Unavailable
from tether.broker.messages import (
    DisconnectSession,
    EndSessionByAdmin,
    GetMetrics,
    GetSession,
    GetStats,
    GetSubscriptions,
    ListSessions,
    SessionPage,
    SessionView,
    SubscriptionView,
)

if TYPE_CHECKING:
    from tether.broker.server import Broker

__all__ = ["ASK_TIMEOUT", "BrokerFleet"]

_log = structlog.get_logger("tether.http")

ASK_TIMEOUT = 5.0
# /health answers within a load balancer's usual check timeout, even when the loop is stuck.
HEALTH_TIMEOUT = 2.0
# The actors that answer GetMetrics, each for the names it owns (messages.py).
_METRIC_OWNERS = ("listeners", "supervisor", "sessions", "subscribers")


class BrokerFleet:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def _ref(self, name: str) -> ActorRef[Any]:
        ref = self._broker.actor(name)
        if ref is None:
            raise Unavailable("starting" if not self._broker.draining.is_set() else "stopped")
        return ref

    def _ask(self, name: str, message: object, timeout: float = ASK_TIMEOUT) -> Any:
        try:
            return self._ref(name).ask(message, timeout=timeout)
        except pykka.ActorDeadError:
            raise Unavailable("shutting_down") from None
        except pykka.Timeout:
            raise Unavailable(f"not_responding: {name}") from None

    # --- no token needed ------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        broker = self._broker
        if broker.draining.is_set():
            return False, {"status": "unavailable", "reason": "shutting_down"}
        if not broker.accepting:
            return False, {"status": "unavailable", "reason": "starting"}
        store = broker.store
        failing = store.failing if store is not None else None
        if failing is not None:
            return False, {"status": "unavailable", "reason": f"store_failing: {failing}"}
        try:
            # Asked, not read: an answer also shows the broker's loop is turning.
            listeners = cast("dict[str, int]", self._ask("listeners", GetStats(), HEALTH_TIMEOUT))
            subscribers = cast(
                "dict[str, int]", self._ask("subscribers", GetStats(), HEALTH_TIMEOUT)
            )
        except Unavailable as exc:
            return False, {"status": "unavailable", "reason": str(exc)}
        return True, {
            "status": "ok",
            "mode": "in-memory" if store is None else "durable",
            "connections": listeners.get("connections", 0),
            "sessions": subscribers.get("sessions", 0),
        }

    def metrics(self) -> bytes:
        metrics = self._broker.metrics
        if metrics is None:
            raise Unavailable("no metrics")
        return metrics.render()

    def read_metrics(self) -> Mapping[str, float]:
        """Every actor's GetMetrics answer, merged (asked at once, then waited for). An actor
        that is gone or answers nothing useful is left out: a scrape shows what it can."""
        futures: list[tuple[str, pykka.Future[Any]]] = []
        for name in _METRIC_OWNERS:
            ref = self._broker.actor(name)
            if ref is not None:
                futures.append((name, ref.ask(GetMetrics(), block=False)))
        merged: dict[str, float] = {}
        for name, future in futures:
            try:
                figures = future.get(timeout=ASK_TIMEOUT)
            except (pykka.ActorDeadError, pykka.Timeout) as exc:
                _log.warning("metrics_unanswered", actor=name, error=type(exc).__name__)
                continue
            if isinstance(figures, Mapping):
                merged.update(figures)
        store = self._broker.store
        if store is not None:
            merged["store_failing"] = 1 if store.failing is not None else 0
        return merged

    # --- /api/* ---------------------------------------------------------------------------

    def list_sessions(self, query: ListSessions) -> SessionPage:
        return cast("SessionPage", self._ask("sessions", query))

    def get_session(self, client_id: str) -> SessionView | None:
        return cast("SessionView | None", self._ask("sessions", GetSession(client_id)))

    def subscriptions(
        self, session_ids: tuple[str, ...]
    ) -> Mapping[str, tuple[SubscriptionView, ...]]:
        if not session_ids:
            return {}
        answer = self._ask("subscribers", GetSubscriptions(session_ids))
        return cast("Mapping[str, tuple[SubscriptionView, ...]]", answer or {})

    def stats(self) -> dict[str, int]:
        # The `stats` frame's counters: the SubscriberManager answers both from one place.
        return cast("dict[str, int]", self._ask("subscribers", GetStats()))

    def disconnect(self, client_id: str) -> SessionView | None:
        return cast("SessionView | None", self._ask("sessions", DisconnectSession(client_id)))

    def end(self, client_id: str) -> SessionView | None:
        return cast("SessionView | None", self._ask("sessions", EndSessionByAdmin(client_id)))
