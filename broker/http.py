"""The broker's HTTP endpoint (`tether serve --http HOST:PORT`): /health, /metrics, the admin API
under /api/ and the fleet page. See docs/operations.md for the contract.

Theory of operation: aiohttp runs on a thread and event loop of its own (`tether-http`,
`http_server.py`), never on the broker's loop, so a slow scrape or a burst of API calls cannot
delay a message. What it needs from the broker it gets through a small `Fleet` facade whose
calls block (they `ask` actors); the handlers run them in a small thread pool
(`run_in_executor`), so the HTTP loop never blocks either. /api/* needs a bearer token listed
(as a hash) in the admin token file; failures are logged and, past the failed-login limit,
slowed like failed logins.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web

from tether.broker.admin_tokens import TokenFile
from tether.broker.http_render import dumps, session_json
from tether.broker.messages import ListSessions, SessionPage, SessionView, SubscriptionView
from tether.broker.metrics import CONTENT_TYPE
from tether.broker.ratelimit import FailureLimiter

__all__ = ["MAX_LIMIT", "Fleet", "HttpApp", "Unavailable"]

_log = structlog.get_logger("tether.http")
_audit = structlog.get_logger("tether.audit")
_T = TypeVar("_T")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_STATUSES = ("online", "away")
_WEB = Path(__file__).parent / "web"
# The page's files, by the path that serves each (no other file is ever served).
_PAGES = {
    "/": ("index.html", "text/html"),
    "/fleet.js": ("fleet.js", "text/javascript"),
    "/fleet.css": ("fleet.css", "text/css"),
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_TOKEN_KEY = web.RequestKey("token_id", str)


class Unavailable(Exception):
    """The broker cannot answer now (starting, stopping, an actor not answering)."""


class Fleet(Protocol):
    """What the HTTP side needs of a broker. Every call may block (it asks actors) and
    raises `Unavailable` when the broker cannot answer."""

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the /health body)."""
        ...

    def metrics(self) -> bytes: ...

    def list_sessions(self, query: ListSessions) -> SessionPage: ...

    def get_session(self, client_id: str) -> SessionView | None: ...

    def subscriptions(
        self, session_ids: tuple[str, ...]
    ) -> Mapping[str, tuple[SubscriptionView, ...]]: ...

    def stats(self) -> dict[str, int]: ...

    def disconnect(self, client_id: str) -> SessionView | None: ...

    def end(self, client_id: str) -> SessionView | None: ...


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, text=dumps(body), content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(status, {"error": code, "message": message})


def _peer(request: web.Request) -> str:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(request.remote)


class HttpApp:
    """The routes, with what they share: the facade, the token file, the failure limiter."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        token_file: Path | None,
        limiter: FailureLimiter,
        penalty: float,
        executor: concurrent.futures.Executor,
    ) -> None:
        self._fleet = fleet
        self._tokens = TokenFile(token_file) if token_file is not None else None
        self._limiter = limiter
        self._penalty = penalty
        self._executor = executor

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(_add_headers)
        routes = app.router
        for path in _PAGES:
            routes.add_get(path, self._page)
        routes.add_get("/health", self._health)
        routes.add_get("/metrics", self._metrics)
        routes.add_get("/api/stats", self._stats)
        routes.add_get("/api/sessions", self._sessions)
        routes.add_get("/api/sessions/{client_id}", self._session)
        routes.add_delete("/api/sessions/{client_id}", self._end)
        routes.add_post("/api/sessions/{client_id}/disconnect", self._disconnect)
        return app

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- the guard: tokens for /api/*, JSON errors there ----------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # By the path asked and by the route it matched: no spelling of a path reaches an
        # /api/ handler without the token check.
        resource = request.match_info.route.resource
        routed = resource.canonical if resource is not None else ""
        api = any(p == "/api" or p.startswith("/api/") for p in (request.path, routed))
        if api:
            refused = await self._authorize(request)
            if refused is not None:
                return refused
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if not api or exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        except Unavailable as exc:
            return _error(503, "unavailable", str(exc))

    async def _authorize(self, request: web.Request) -> web.Response | None:
        """None if the request carries a listed token (its id kept on the request), else
        the 401 to answer, after the penalty when its address is past the failure limit."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if self._tokens is None:
            reason = "no_token_file"
        elif scheme.lower() != "bearer" or not token:
            reason = "missing"
        else:
            found = self._tokens.check(token)
            if found is not None:
                request[_TOKEN_KEY] = found
                return None
            reason = "wrong"
        address = str(request.remote)
        now = time.monotonic()
        blocked = self._limiter.blocked(address, now)
        self._limiter.record_failure(address, now)
        _log.warning(
            "http_auth_failed",
            peer=_peer(request),
            path=request.path,
            reason=reason,
            rate_limited=blocked,
        )
        if blocked:
            await asyncio.sleep(self._penalty)
        message = (
            "the broker has no admin tokens: start it with --admin-token-file"
            if reason == "no_token_file"
            else "a valid admin token is needed: Authorization: Bearer TOKEN"
        )
        response = _error(401, "unauthorized", message)
        response.headers["WWW-Authenticate"] = 'Bearer realm="tether"'
        return response

    # --- no token needed -------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        name, kind = _PAGES[request.path]
        try:
            body = (_WEB / name).read_bytes()
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        return web.Response(body=body, content_type=kind, charset="utf-8")

    async def _health(self, _request: web.Request) -> web.StreamResponse:
        try:
            healthy, body = await self._call(self._fleet.health)
        except Unavailable as exc:
            healthy, body = False, {"status": "unavailable", "reason": str(exc)}
        return _json(200 if healthy else 503, body)

    async def _metrics(self, _request: web.Request) -> web.StreamResponse:
        text = await self._call(self._fleet.metrics)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})

    # --- /api/* ---------------------------------------------------------------------------

    async def _stats(self, _request: web.Request) -> web.StreamResponse:
        return _json(200, await self._call(self._fleet.stats))

    async def _sessions(self, request: web.Request) -> web.StreamResponse:
        query = request.query

        def text(name: str) -> str | None:
            return query.get(name) or None  # empty: as if absent

        status = text("status")
        if status is not None and status not in _STATUSES:
            return _error(400, "bad_request", "status must be online or away")
        limit = DEFAULT_LIMIT
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_LIMIT:
                return _error(400, "bad_request", f"limit must be a number 1..{MAX_LIMIT}")
        wanted = ListSessions(
            status=status,
            username=text("username"),
            client_id_prefix=text("client_id_prefix"),
            after=text("after"),
            limit=limit,
        )
        return _json(200, await self._call(self._page_of, wanted))

    def _page_of(self, wanted: ListSessions) -> dict[str, Any]:
        # In the executor: two asks, one after the other (sessions, then their queues).
        page = self._fleet.list_sessions(wanted)
        subs = self._fleet.subscriptions(tuple(v.session_id for v in page.sessions))
        return {
            "sessions": [session_json(v, subs.get(v.session_id, ())) for v in page.sessions],
            "next": page.next,
        }

    def _one(self, client_id: str) -> dict[str, Any] | None:
        view = self._fleet.get_session(client_id)
        if view is None:
            return None
        subs = self._fleet.subscriptions((view.session_id,))
        return session_json(view, subs.get(view.session_id, ()))

    async def _session(self, request: web.Request) -> web.StreamResponse:
        client_id = request.match_info["client_id"]
        found = await self._call(self._one, client_id)
        if found is None:
            return _no_session(client_id)
        return _json(200, found)

    async def _disconnect(self, request: web.Request) -> web.StreamResponse:
        return await self._act(request, "disconnect", self._fleet.disconnect)

    async def _end(self, request: web.Request) -> web.StreamResponse:
        return await self._act(request, "end", self._fleet.end)

    async def _act(
        self, request: web.Request, action: str, act: Callable[[str], SessionView | None]
    ) -> web.StreamResponse:
        client_id = request.match_info["client_id"]
        view = await self._call(act, client_id)
        _audit.info(
            "admin_action",
            action=action,
            client_id=client_id,
            session_id=None if view is None else view.session_id,
            found=view is not None,
            token_id=request.get(_TOKEN_KEY),
            peer=_peer(request),
        )
        if view is None:
            return _no_session(client_id)
        return web.Response(status=204)


def _no_session(client_id: str) -> web.Response:
    return _error(404, "not_found", f"no session with client id {client_id!r}")


async def _add_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(_SECURITY_HEADERS)
