"""The broker's Prometheus metrics (`GET /metrics`): one registry per Broker (tests run several
brokers in one process, so never prometheus_client's global one).

Two kinds of figure. Counters and gauges the actors own are asked for at scrape time: a custom
collector asks each actor `GetMetrics()` (off the broker's loop, from the HTTP side's executor)
and turns the flat dicts into metric families; a name an actor does not report yet is left
out rather than shown as 0. Durations are histograms observed where they happen: a password
check (the auth pool), a group commit (the store's writer thread), and the broker loop's lag
(a probe on that loop: how late a timer set 0.5 s ahead fired). prometheus_client's metric
objects are thread-safe, so each is observed on its own thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "BrokerMetrics", "LoopLagProbe"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# GetMetrics key -> (family name, counter or gauge, help). Counters get `_total` added by
# prometheus_client's exposition (the family is named without it).
_PLAIN: tuple[tuple[str, str, str, str], ...] = (
    ("connections_open", "tether_connections_open", "gauge", "TCP connections open"),
    ("connections_accepted", "tether_connections_accepted", "counter", "TCP connections accepted"),
    ("connections_pending", "tether_connections_pending", "gauge", "connections not registered"),
    (
        "connections_pending_bytes",
        "tether_connections_pending_bytes",
        "gauge",
        "bytes read from connections not registered yet (at most what they hold)",
    ),
    (
        "connections_refused_pending",
        "tether_connections_refused_pending",
        "counter",
        "connections closed at accept: too many pending (per address or in all)",
    ),
    (
        "connections_closed_unregistered",
        "tether_connections_closed_unregistered",
        "counter",
        "connections that closed before they registered",
    ),
    (
        "accept_pauses",
        "tether_accept_pauses",
        "counter",
        "times accepting paused near the open-file limit",
    ),
    (
        "tls_handshake_failures",
        "tether_tls_handshake_failures",
        "counter",
        "TLS handshakes that failed (plaintext client, bad or missing certificate, timeout)",
    ),
    (
        "certificate_logins",
        "tether_certificate_logins",
        "counter",
        "fresh logins by a client certificate's name, without a password (--tls-cert-username)",
    ),
    ("password_checks", "tether_password_checks", "counter", "bcrypt password checks made"),
    ("messages_published", "tether_messages_published", "counter", "messages published"),
    ("messages_delivered", "tether_messages_delivered", "counter", "deliveries sent"),
    (
        "messages_redelivered",
        "tether_messages_redelivered",
        "counter",
        "deliveries sent again (after a resume)",
    ),
    ("messages_acked", "tether_messages_acked", "counter", "deliveries acknowledged"),
    (
        "messages_dropped",
        "tether_messages_dropped",
        "counter",
        "queued messages dropped by an overflowing queue",
    ),
    ("messages_queued", "tether_queued_messages", "gauge", "messages held in queues"),
    ("bytes_queued", "tether_queued_bytes", "gauge", "payload bytes held in queues"),
    ("subscriptions", "tether_subscriptions", "gauge", "active subscriptions"),
    ("topics", "tether_topics", "gauge", "topics with at least one subscriber"),
    ("sessions_expired", "tether_sessions_expired", "counter", "sessions ended by expiry"),
    # Issue 12, the data path's bounds (the SubscriberManager's).
    (
        "subscriptions_refused",
        "tether_subscriptions_refused",
        "counter",
        "subscribes refused quota_exceeded (--max-subscriptions)",
    ),
    ("stats_refused", "tether_stats_refused", "counter", "stats frames refused (not admin)"),
    (
        "subscriptions_revoked",
        "tether_subscriptions_revoked",
        "counter",
        "subscriptions ended because the users file no longer allows them",
    ),
    (
        "messages_dropped_session_bytes",
        "tether_messages_dropped_session_bytes",
        "counter",
        "queued messages dropped for --session-queue-bytes",
    ),
    (
        "messages_dropped_memory_budget",
        "tether_messages_dropped_memory_budget",
        "counter",
        "queued messages dropped for --memory-budget",
    ),
    (
        "messages_dropped_store_budget",
        "tether_messages_dropped_store_budget",
        "counter",
        "queued messages dropped for --store-budget",
    ),
    (
        "queues_spilled",
        "tether_queues_spilled",
        "counter",
        "queues whose backlog was moved to the store for --memory-budget",
    ),
    ("bytes_queued_memory", "tether_queued_memory_bytes", "gauge", "queued bytes in memory"),
    ("memory_budget", "tether_memory_budget_bytes", "gauge", "--memory-budget in force"),
    ("bytes_queued_store", "tether_queued_store_bytes", "gauge", "queued bytes in the store"),
    ("store_budget", "tether_store_budget_bytes", "gauge", "--store-budget in force"),
    ("auth_queue_length", "tether_auth_queue_length", "gauge", "logins waiting for a check"),
    (
        "auth_queue_refused",
        "tether_auth_queue_refused",
        "counter",
        "logins answered rate_limited because the password-check queue was full",
    ),
    (
        "sessions_quota_refused",
        "tether_sessions_quota_refused",
        "counter",
        "fresh registrations refused: the user's session quota was reached",
    ),
    (
        "client_id_refused",
        "tether_client_id_refused",
        "counter",
        "registrations refused: client id outside the user's allowed prefixes",
    ),
)
_SESSION_STATES = ("online", "away")
_REGISTRATION_OUTCOMES = (
    "new",
    "resumed",
    "taken_over",
    "conflict",
    "auth_failed",
    "rate_limited",
    "unknown_session",
)

# Seconds. bcrypt at cost 4 takes about 1 ms, at cost 12 about 0.3 s (this machine).
_CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

LAG_INTERVAL = 0.5


class _ActorCollector(Collector):
    """The actors' own figures, asked at each scrape through `read`."""

    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return ()  # names vary with what the actors report: nothing to check at register

    def collect(self) -> Iterable[Metric]:
        figures = self._read()
        for key, name, kind, doc in _PLAIN:
            value = figures.get(key)
            if value is None:
                continue
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, doc, value=value)
            else:
                family = GaugeMetricFamily(name, doc, value=value)
            yield family
        sessions = GaugeMetricFamily(
            "tether_sessions", "sessions by state (online: connected)", labels=("state",)
        )
        for state in _SESSION_STATES:
            value = figures.get(f"sessions_{state}")
            if value is not None:
                sessions.add_metric((state,), value)
        if sessions.samples:
            yield sessions
        registrations = CounterMetricFamily(
            "tether_registrations", "registrations by outcome", labels=("outcome",)
        )
        for outcome in _REGISTRATION_OUTCOMES:
            value = figures.get(f"registrations_{outcome}")
            if value is not None:
                registrations.add_metric((outcome,), value)
        if registrations.samples:
            yield registrations
        denied = CounterMetricFamily(
            "tether_permission_denied",
            "publishes and subscribes refused by the user's topic permissions",
            labels=("action",),
        )
        for action in ("publish", "subscribe"):
            value = figures.get(f"permission_denied_{action}")
            if value is not None:
                denied.add_metric((action,), value)
        if denied.samples:
            yield denied
        failing = figures.get("store_failing")
        if failing is not None:
            yield GaugeMetricFamily(
                "tether_store_failing", "1 while the store's last commit failed", value=failing
            )


class BrokerMetrics:
    """One broker's registry. `read_actors` answers the actors' GetMetrics dicts merged (it
    blocks: it is called from `render`, which the HTTP side runs in its executor)."""

    def __init__(self, read_actors: Callable[[], Mapping[str, float]], *, durable: bool) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.password_check = Histogram(
            "tether_password_check_duration_seconds",
            "time a bcrypt password check took",
            buckets=_CHECK_BUCKETS,
            registry=self.registry,
        )
        self.store_commit: Histogram | None = None
        if durable:
            self.store_commit = Histogram(
                "tether_store_commit_duration_seconds",
                "time a group commit of the store took",
                buckets=_COMMIT_BUCKETS,
                registry=self.registry,
            )
        self.loop_lag = Histogram(
            "tether_event_loop_lag_seconds",
            f"how late the broker loop ran a timer (probed every {LAG_INTERVAL} s)",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag_last = Gauge(
            "tether_event_loop_lag_last_seconds",
            "the broker loop's lag at the last probe",
            registry=self.registry,
        )
        self.registry.register(_ActorCollector(read_actors))
        ProcessCollector(registry=self.registry)

    def observe_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)
        self.loop_lag_last.set(seconds)

    def render(self) -> bytes:
        """The exposition text (blocks while the actors are asked)."""
        return generate_latest(self.registry)


class LoopLagProbe:
    """Measures how late a timer fires on `loop`: the time a message waits there behind
    whatever runs. Start and stop from any thread; `report` runs on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        report: Callable[[float], None],
        interval: float = LAG_INTERVAL,
    ) -> None:
        self._loop = loop
        self._report = report
        self._interval = interval
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = False

    def start(self) -> None:
        self._loop.call_soon_threadsafe(self._arm)

    def stop(self) -> None:
        self._stopped = True
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._cancel)

    def _arm(self) -> None:
        if self._stopped:
            return
        self._due = self._loop.time() + self._interval
        self._handle = self._loop.call_later(self._interval, self._fired)

    def _fired(self) -> None:
        self._report(max(0.0, self._loop.time() - self._due))
        self._arm()

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
