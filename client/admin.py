"""A small client of the broker's admin HTTP API (`tether serve --http HOST:PORT`,
docs/operations.md): the sessions, one session, disconnect, end, and the counters of `stats`.

Standard library only (urllib.request), blocking, one request at a time: it serves the
`tether sessions` and `tether stats` commands, not an application's hot path. Every failure is
an `AdminError` whose message says what to do, so a command can print it as its one error line.
An `https://` URL is verified against the CA given (`ca`), else the system's store.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import TlsError
from .tls import TlsPeer, client_context

__all__ = [
    "DEFAULT_HTTP",
    "TOKEN_ENV",
    "AdminClient",
    "AdminError",
    "NoSuchSession",
    "TlsFailed",
    "Unauthorized",
    "Unreachable",
    "read_token",
]

DEFAULT_HTTP = "http://127.0.0.1:7879"  # where `scripts/run` serves the HTTP endpoint
TOKEN_ENV = "TETHER_ADMIN_TOKEN"
# A broken server that hands back the same `next` forever must not keep a command looping.
MAX_PAGES = 100_000

_HOW_TO_GET_A_TOKEN = (
    "make one with `tether token new --file PATH` (the broker's --admin-token-file), "
    f"then pass it in ${TOKEN_ENV} or with --token-file"
)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error here: followed, it would carry the token to another place."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    # No proxies from the environment either: the token goes to the broker and nowhere else.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), _NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


class AdminError(Exception):
    """The admin API could not answer: the message is one line saying why and what to do."""


class Unreachable(AdminError):
    """No HTTP answer at all: nothing listens there, or it does not speak HTTP."""


class Unauthorized(AdminError):
    """401: no token configured on the broker, or not one of its tokens."""


class NoSuchSession(AdminError):
    """404 on a session: no session has that client id."""


class TlsFailed(AdminError):
    """HTTPS failed in a way a retry would repeat: a certificate that does not verify, a CA
    file that cannot be used, a server that does not speak TLS."""


def read_token(token_file: Path | None) -> str:
    """The admin token from `token_file` (the token in clear, on its first line) or from
    $TETHER_ADMIN_TOKEN; never from a command-line argument, where `ps` would show it."""
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise AdminError(f"cannot read the token file: {exc}") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise AdminError(f"the token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise AdminError(f"no admin token: {_HOW_TO_GET_A_TOKEN}")
    return token


class AdminClient:
    """Requests to one broker's HTTP endpoint, with its admin token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        ca: str | os.PathLike[str] | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise AdminError(f"not an http:// URL: {base_url!r} (e.g. {DEFAULT_HTTP})")
        if ca is not None and parsed.scheme != "https":
            raise AdminError(
                f"a CA is for HTTPS, but {base_url} is plain HTTP: give the https:// URL "
                "(a broker with --tls-cert serves HTTPS on --http)"
            )
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._https = parsed.scheme == "https"
        context = None
        if self._https:
            try:
                context = client_context(ca=ca)
            except TlsError as exc:
                raise TlsFailed(str(exc)) from None
        self._opener = _opener(context)
        host = parsed.hostname or ""
        self._peer = TlsPeer(f"the HTTPS endpoint {self.base_url}", host, has_cert=False)

    # --- the API -----------------------------------------------------------------------------

    def page(
        self,
        *,
        status: str | None = None,
        username: str | None = None,
        client_id_prefix: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """One page of GET /api/sessions: {"sessions": [...], "next": CLIENT_ID | None}."""
        query = {
            "status": status,
            "username": username,
            "client_id_prefix": client_id_prefix,
            "after": after,
            "limit": None if limit is None else str(limit),
        }
        answer = self._json("GET", "/api/sessions", query)
        if not isinstance(answer, dict) or not isinstance(answer.get("sessions"), list):
            raise AdminError(f"{self.base_url}/api/sessions answered something else than a page")
        return answer

    def sessions(
        self,
        *,
        status: str | None = None,
        username: str | None = None,
        client_id_prefix: str | None = None,
        page_size: int | None = None,
        max_pages: int = MAX_PAGES,
    ) -> Iterator[dict[str, Any]]:
        """Every session that matches, following `next` page after page (`page_size` per
        page: the broker's default, 100, unless given)."""
        after: str | None = None
        for _ in range(max_pages):
            page = self.page(
                status=status,
                username=username,
                client_id_prefix=client_id_prefix,
                after=after,
                limit=page_size,
            )
            yield from page["sessions"]
            following = page.get("next")
            if following is None:
                return
            if not isinstance(following, str) or following == after:
                raise AdminError(f"{self.base_url}/api/sessions: its `next` does not move on")
            after = following
        raise AdminError(f"{self.base_url}/api/sessions: more than {max_pages} pages")

    def session(self, client_id: str) -> dict[str, Any]:
        """GET /api/sessions/{client_id}; NoSuchSession when there is none."""
        answer = self._json("GET", _session_path(client_id), client_id=client_id)
        if not isinstance(answer, dict):
            raise AdminError(f"{self.base_url}: a session answered as something else")
        return answer

    def disconnect(self, client_id: str) -> None:
        """POST /api/sessions/{client_id}/disconnect: its connection closes; the session stays."""
        self._request("POST", _session_path(client_id) + "/disconnect", client_id=client_id)

    def end(self, client_id: str) -> None:
        """DELETE /api/sessions/{client_id}: the session ends, its queues are discarded."""
        self._request("DELETE", _session_path(client_id), client_id=client_id)

    def stats(self) -> dict[str, Any]:
        """GET /api/stats: the counters of the `stats` frame."""
        answer = self._json("GET", "/api/stats")
        if not isinstance(answer, dict):
            raise AdminError(f"{self.base_url}/api/stats answered something else than an object")
        return answer

    # --- HTTP --------------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        query: dict[str, str | None] | None = None,
        *,
        client_id: str | None = None,
    ) -> Any:
        body = self._request(method, path, query, client_id=client_id)
        try:
            return json.loads(body)
        except ValueError:
            raise AdminError(f"{self.base_url}{path} did not answer JSON") from None

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, str | None] | None = None,
        *,
        client_id: str | None = None,
    ) -> bytes:
        url = self.base_url + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(
            url,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Accept": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            raise self._refused(exc, client_id) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            # A timeout, or a peer that is not an HTTP server (the broker's TCP port resets
            # or answers bytes that are not HTTP).
            raise self._unreachable(exc) from None

    def _unreachable(self, reason: object) -> AdminError:
        if self._https and isinstance(reason, BaseException):
            tls = self._peer.failure(reason)
            if tls is not None:
                return TlsFailed(str(tls))
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, TimeoutError):
            why = f"no answer within {self.timeout:g} s"
        else:
            why = str(getattr(reason, "strerror", None) or reason)
        if not self._https and isinstance(
            reason, http.client.RemoteDisconnected | ConnectionResetError
        ):
            why += "; a broker started with --tls-cert serves HTTPS: use an https:// URL"
        return Unreachable(
            f"cannot reach {self.base_url} ({why}): is the broker running, and does it serve "
            "HTTP there (`tether serve --http HOST:PORT`)? Give its address with --http URL"
        )

    def _refused(self, exc: urllib.error.HTTPError, client_id: str | None) -> AdminError:
        try:
            detail = _reason(exc.read())
        except OSError:
            detail = ""
        finally:
            exc.close()
        if exc.code == 401:
            return Unauthorized(
                f"{self.base_url} refused the admin token (401"
                f"{': ' + detail if detail else ''}): {_HOW_TO_GET_A_TOKEN}"
            )
        if exc.code == 404 and client_id is not None:
            return NoSuchSession(f"no session with client id {client_id!r}")
        return AdminError(
            f"{self.base_url} answered {exc.code} {exc.reason}{': ' + detail if detail else ''}"
        )


def _session_path(client_id: str) -> str:
    # Every character of a client id may occur (`/`, `?`, `%`, spaces): all of them encoded.
    return "/api/sessions/" + urllib.parse.quote(client_id, safe="")


def _reason(body: bytes) -> str:
    """What an error answer says, in a few words: its JSON `error`/`reason`, or its text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("error", "reason", "message"):
            if isinstance(parsed.get(key), str):
                text = parsed[key]
                break
    line = " ".join(text.split())
    return line[:200]
