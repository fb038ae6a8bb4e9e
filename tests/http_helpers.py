"""Helpers for the HTTP endpoint's tests: a broker started with `--http` and an admin token, and
a small urllib client for it."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tether.broker.admin_tokens import append_token, new_token
from tether.broker.server import Broker


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        return json.loads(self.body)


class Api:
    """Requests to one broker's HTTP endpoint, with `token` unless told otherwise."""

    def __init__(self, broker: Broker, token: str | None) -> None:
        assert broker.http_address is not None
        self.base = "http://{}:{}".format(*broker.http_address)
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "default",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        token = self.token if token == "default" else token
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base + path, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return Reply(reply.status, reply.headers, reply.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.headers, exc.read())

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def sessions(self, **query: str | int) -> Any:
        """GET /api/sessions with `query`: the JSON body (asserting a 200)."""
        reply = self.get("/api/sessions?" + urllib.parse.urlencode(query))
        assert reply.status == 200, reply
        return reply.json()

    def session_path(self, client_id: str) -> str:
        return "/api/sessions/" + urllib.parse.quote(client_id, safe="")


@dataclass
class HttpBroker:
    broker: Broker
    api: Api
    token: str
    tokens: Path  # the admin token file


@pytest.fixture
def start_http_broker(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> Iterator[Callable[..., HttpBroker]]:
    """Start a broker (conftest's `start_broker`) with its HTTP endpoint on a free port and
    an admin token file holding one token."""
    made = 0

    def start(**overrides: Any) -> HttpBroker:
        nonlocal made
        made += 1
        tokens = tmp_path / f"admin-tokens-{made}"
        token = new_token()
        append_token(tokens, token)
        overrides.setdefault("admin_token_file", tokens)
        broker = start_broker(http=("127.0.0.1", 0), **overrides)
        return HttpBroker(broker, Api(broker, token), token, tokens)

    yield start


@pytest.fixture
def web(start_http_broker: Callable[..., HttpBroker]) -> HttpBroker:
    return start_http_broker()
