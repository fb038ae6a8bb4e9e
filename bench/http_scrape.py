"""The bench's side of the broker's HTTP endpoint (issue 11): a broker started with `--http`
and an admin token, a scraper that pulls `/metrics` and `/api/sessions` every second while a
scenario runs, and timed `GET`s of the admin API.

The scraper is a thread of the bench process (which only waits on its generators meanwhile):
what it costs the broker is what a Prometheus server and a fleet page polling it would cost.
Requests go over one kept-alive HTTP/1.1 connection, as Prometheus' do, so a timing is the
broker's answer, not a TCP handshake.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import HOST, BenchError, Server, broker_process, free_port

__all__ = [
    "SCRAPE_INTERVAL",
    "HttpBroker",
    "HttpClient",
    "ScrapeStats",
    "Scraper",
    "http_broker_process",
]

SCRAPE_INTERVAL = 1.0  # seconds, as the issue asks (Prometheus' default is 15 s)
SESSION_PAGES = 10  # a scrape of /api/sessions follows at most this many pages, as the page does


@dataclass
class HttpBroker:
    """A broker process serving HTTP on `http` with `token` accepted on /api/*."""

    server: Server
    http: tuple[str, int]
    token: str

    def client(self, timeout: float = 30.0) -> HttpClient:
        return HttpClient(self.http, self.token, timeout=timeout)


@contextlib.contextmanager
def http_broker_process(*extra: str, in_memory: bool = False) -> Iterator[HttpBroker]:
    """`broker_process` with `--http` on a free loopback port and a fresh admin token."""
    from tether.broker.admin_tokens import append_token, new_token

    with tempfile.TemporaryDirectory(prefix="tether-bench-http-") as tmp_name:
        tokens = Path(tmp_name) / "admin-tokens"
        token = new_token()
        append_token(tokens, token)
        port = free_port()
        args = ("--http", f"{HOST}:{port}", "--admin-token-file", str(tokens), *extra)
        with broker_process(*args, in_memory=in_memory) as server:
            broker = HttpBroker(server, (HOST, port), token)
            _wait_http(broker)
            yield broker


def _wait_http(broker: HttpBroker, timeout: float = 20.0) -> None:
    """Until /health answers 200 (the TCP port listens a moment before, or after, HTTP)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with contextlib.closing(broker.client(timeout=2)) as client:
                status, _ = client.get("/health")
            if status == 200:
                return
        except OSError:
            pass
        broker.server.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"the broker's /health did not answer 200 within {timeout:.0f} s")
        time.sleep(0.05)


class HttpClient:
    """GETs over one kept-alive connection (reopened if the server closed it)."""

    def __init__(self, address: tuple[str, int], token: str, *, timeout: float = 30.0) -> None:
        self.address = address
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
            try:
                self._conn.request("GET", path, headers=self.headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # a kept-alive connection the server timed out: once more
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise BenchError(f"GET {path} answered {status}: {body[:200]!r}")
        return json.loads(body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class ScrapeStats:
    scrapes: int = 0
    failures: list[str] = field(default_factory=list)
    metrics_ms: list[float] = field(default_factory=list)
    sessions_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def mean(values: list[float]) -> float:
            return round(sum(values) / len(values), 3) if values else 0.0

        return {
            "scrapes": self.scrapes,
            "failures": len(self.failures),
            "failure_examples": self.failures[:3],
            "metrics_mean_ms": mean(self.metrics_ms),
            "metrics_max_ms": round(max(self.metrics_ms, default=0.0), 3),
            "sessions_mean_ms": mean(self.sessions_ms),
            "sessions_max_ms": round(max(self.sessions_ms, default=0.0), 3),
        }


class Scraper:
    """Every `interval` seconds: GET /metrics, then GET /api/sessions (following `next` up to
    SESSION_PAGES pages), until stopped. Use as a context manager around the measured run."""

    def __init__(self, broker: HttpBroker, interval: float = SCRAPE_INTERVAL) -> None:
        self.broker = broker
        self.interval = interval
        self.stats = ScrapeStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        client = self.broker.client(timeout=10)
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                self._scrape(client)
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            client.close()

    def _scrape(self, client: HttpClient) -> None:
        stats = self.stats
        try:
            t0 = time.perf_counter()
            status, body = client.get("/metrics")
            stats.metrics_ms.append((time.perf_counter() - t0) * 1e3)
            if status != 200 or b"tether_" not in body:
                stats.failures.append(f"/metrics answered {status}")
            t0 = time.perf_counter()
            after = ""
            for _ in range(SESSION_PAGES):
                query = "?after=" + urllib.parse.quote(after, safe="") if after else ""
                page = client.get_json("/api/sessions" + query)
                after = page.get("next") or ""
                if not after:
                    break
            stats.sessions_ms.append((time.perf_counter() - t0) * 1e3)
            stats.scrapes += 1
        except (OSError, BenchError, ValueError, http.client.HTTPException) as exc:
            stats.failures.append(f"{type(exc).__name__}: {exc}")
