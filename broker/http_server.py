"""`HttpServer`: the HTTP endpoint's aiohttp application (`http.HttpApp`) served on a thread and
event loop of its own (`tether-http`), so nothing it does runs on the broker's loop. With an
`ssl_context` it serves HTTPS (the broker's certificate, issue 13)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
import threading
from pathlib import Path

import structlog
from aiohttp import web

from tether.broker.http import Fleet, HttpApp
from tether.broker.ratelimit import FailureLimiter

__all__ = ["HttpServer"]

_log = structlog.get_logger("tether.http")


class HttpServer:
    """aiohttp on its own thread and loop. `start()` binds (raises OSError if it cannot) and
    returns the address; `stop()` closes it. Both from outside its loop."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        host: str,
        port: int,
        token_file: Path | None,
        limiter: FailureLimiter,
        penalty: float,
        ask_workers: int = 4,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._ssl = ssl_context
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=ask_workers, thread_name_prefix="tether-http-ask"
        )
        self._app = HttpApp(
            fleet, token_file=token_file, limiter=limiter, penalty=penalty, executor=self._executor
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tether-http", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self.address = asyncio.run_coroutine_threadsafe(self._serve(), loop).result(10)
        except BaseException:
            self.stop()
            raise
        return self.address

    async def _serve(self) -> tuple[str, int]:
        # Requests in flight at the stop get a moment, not aiohttp's default minute.
        runner = web.AppRunner(
            self._app.build(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(
            runner, self._host, self._port, reuse_address=True, ssl_context=self._ssl
        )
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server private; its socket says the port
        assert isinstance(server, asyncio.Server) and server.sockets
        sockname = server.sockets[0].getsockname()
        return (str(sockname[0]), int(sockname[1]))

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def reload_tls(self, cert: Path, key: Path) -> None:
        """Load a renewed certificate and key into the live context, on this server's loop
        (between two handshakes): the next handshakes use it, open connections keep theirs.
        Raises what `load_cert_chain` raises; the caller checked the files just before."""
        context, loop = self._ssl, self._loop
        if context is None or loop is None:
            return

        async def load() -> None:
            context.load_cert_chain(cert, key)

        asyncio.run_coroutine_threadsafe(load(), loop).result(10)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        self._loop = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            except (concurrent.futures.TimeoutError, RuntimeError) as exc:
                _log.warning("http_stop_failed", error=repr(exc))
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
