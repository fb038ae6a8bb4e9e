"""The HTTP endpoint (`--http`) against a real in-process broker: /health and its 503s, the admin
API's sessions (shape, filters, paging, one session, disconnect, end), /api/stats, the tokens
it needs, and the fleet page's files and headers."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.helpers import subscribe
from tests.http_helpers import Api, HttpBroker, start_http_broker, web
from tests.wire import WireClient, wait_for
from tether.broker.admin_tokens import append_token, hash_token, new_token, token_id
from tether.broker.config import BrokerConfig
from tether.broker.server import Broker, StartupError
from tether.broker.store import Snapshot
from tether.broker.store_memory import MemoryStore
from tether.broker.users import UserStore
from tether.files import write_atomic
from tether.protocol import Error, Ping, Pong, Registered

__all__ = ["start_http_broker", "web"]  # fixtures, imported for pytest

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SESSION_KEYS = [
    "client_id",
    "username",
    "session_id",
    "status",
    "connected_since",
    "away_since",
    "last_seen",
    "expires_at",
    "peer",
    "keepalive",
    "metadata",
    "health",
    "subscriptions",
]


def dial(broker: Broker, clients: list[WireClient]) -> WireClient:
    assert broker.address is not None
    client = WireClient(broker.address)
    clients.append(client)
    return client


@pytest.fixture
def clients() -> Any:
    made: list[WireClient] = []
    yield made
    for client in made:
        client.close()


PASSWORDS = {"alice": "secret", "bob": "hunter2"}  # conftest's users file


def register(
    broker: Broker, clients: list[WireClient], client_id: str, username: str = "alice", **kw: Any
) -> tuple[WireClient, Registered]:
    client = dial(broker, clients)
    reg = client.register(client_id, username, PASSWORDS[username], **kw)
    assert isinstance(reg, Registered), reg
    return client, reg


# --- /health --------------------------------------------------------------------------------


def test_health_is_ok_while_accepting(web: HttpBroker, clients: list[WireClient]) -> None:
    register(web.broker, clients, "one")
    reply = web.api.get("/health", token=None)
    assert reply.status == 200
    body = reply.json()
    assert body == {"status": "ok", "mode": "in-memory", "connections": 1, "sessions": 1}


def test_health_is_503_while_draining(web: HttpBroker) -> None:
    web.broker.draining.set()
    reply = web.api.get("/health", token=None)
    assert reply.status == 503
    assert reply.json() == {"status": "unavailable", "reason": "shutting_down"}


class SwitchStore(MemoryStore):
    """A MemoryStore whose `failing` the test sets, and whose `load` can be held back."""

    def __init__(self) -> None:
        super().__init__()
        self.why: str | None = None
        self.loading = threading.Event()
        self.release = threading.Event()
        self.release.set()

    @property
    def failing(self) -> str | None:
        return self.why

    def load(self) -> Snapshot:
        self.loading.set()
        assert self.release.wait(10)
        return super().load()


def on_store(users_file: Path, tmp_path: Path, store: SwitchStore) -> tuple[Broker, str]:
    """A broker (not started) on `store`, with the HTTP endpoint and a token."""
    token = new_token()
    append_token(tmp_path / "tokens", token)
    config = BrokerConfig(
        port=0,
        users_path=users_file,
        data_dir=None,
        http=("127.0.0.1", 0),
        admin_token_file=tmp_path / "tokens",
    )
    return Broker(config, users=UserStore.load(users_file), store=store), token


def test_health_is_503_while_the_store_fails_and_200_once_it_commits_again(
    users_file: Path, tmp_path: Path
) -> None:
    store = SwitchStore()
    broker, token = on_store(users_file, tmp_path, store)
    broker.start()
    try:
        api = Api(broker, token)
        assert api.get("/health").json()["mode"] == "durable"
        store.why = "disk I/O error"
        reply = api.get("/health")
        assert reply.status == 503
        assert reply.json() == {"status": "unavailable", "reason": "store_failing: disk I/O error"}
        store.why = None
        assert api.get("/health").status == 200
    finally:
        broker.stop()


def test_health_says_starting_while_the_store_loads(users_file: Path, tmp_path: Path) -> None:
    store = SwitchStore()
    store.release.clear()
    broker, token = on_store(users_file, tmp_path, store)
    started = threading.Thread(target=broker.start, daemon=True)
    started.start()
    try:
        assert store.loading.wait(10)
        api = Api(broker, token)
        reply = api.get("/health")
        assert reply.status == 503
        assert reply.json() == {"status": "unavailable", "reason": "starting"}
        # The API answers too, without hanging: the actors are not there yet.
        assert api.get("/api/sessions").status == 503
    finally:
        store.release.set()
        started.join(10)
    try:
        assert Api(broker, token).get("/health").status == 200
    finally:
        broker.stop()


# --- /api/sessions ----------------------------------------------------------------------------


def test_a_session_has_exactly_the_documented_shape(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    client, reg = register(web.broker, clients, "sensor-7", metadata={"model": "x1"}, keepalive=30)
    subscribe(client, "fleet/sensor-7/cmd")
    req = client.next_req()
    client.send(Ping(req=req, status="degraded", details={"battery": 12}))
    assert client.recv() == Pong(req=req)
    body = web.api.sessions()
    assert list(body) == ["sessions", "next"] and body["next"] is None
    [session] = body["sessions"]
    assert list(session) == SESSION_KEYS
    host, port = client.sock.getsockname()[:2]
    assert session["client_id"] == "sensor-7"
    assert session["username"] == "alice"
    assert session["session_id"] == reg.session_id
    assert session["status"] == "online"
    assert TIME.match(session["connected_since"]) and TIME.match(session["last_seen"])
    assert session["away_since"] is None and session["expires_at"] is None
    assert session["peer"] == f"{host}:{port}"
    assert session["keepalive"] == 30
    assert session["metadata"] == {"model": "x1"}
    health = session["health"]
    assert list(health) == ["status", "details", "at", "stale"]
    assert health["status"] == "degraded" and health["details"] == {"battery": 12}
    assert TIME.match(health["at"]) and health["stale"] is False
    assert session["subscriptions"] == [
        {"topic": "fleet/sensor-7/cmd", "queued": 0, "unacked": 0, "dropped": 0}
    ]


def test_device_data_json_cannot_hold_is_rendered_safely(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    register(web.broker, clients, "odd", metadata={"raw": b"\x00\xff", 7: "seven", "f": 1.5})
    [session] = web.api.sessions()["sessions"]
    assert session["metadata"] == {"raw": "AP8=", "7": "seven", "f": 1.5}


def test_an_away_session_has_its_times_and_no_peer(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    client, _ = register(web.broker, clients, "gone")
    client.close()
    wait_for(lambda: web.api.sessions(status="away")["sessions"] != [])
    [session] = web.api.sessions(status="away")["sessions"]
    assert session["status"] == "away" and session["peer"] is None
    assert session["connected_since"] is None
    assert TIME.match(session["away_since"]) and TIME.match(session["expires_at"])


def test_filters_by_status_username_and_client_id_prefix(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    register(web.broker, clients, "fleet-a")
    register(web.broker, clients, "fleet-b", "bob")
    gone, _ = register(web.broker, clients, "other")
    gone.close()

    def ids(**query: str) -> list[str]:
        return [s["client_id"] for s in web.api.sessions(**query)["sessions"]]

    wait_for(lambda: ids(status="away") == ["other"])
    assert ids() == ["fleet-a", "fleet-b", "other"]
    assert ids(status="online") == ["fleet-a", "fleet-b"]
    assert ids(username="bob") == ["fleet-b"]
    assert ids(username="alice") == ["fleet-a", "other"]
    assert ids(client_id_prefix="fleet-") == ["fleet-a", "fleet-b"]
    assert ids(client_id_prefix="fleet-", username="alice", status="online") == ["fleet-a"]
    assert ids(client_id_prefix="nobody") == []


def test_pages_chain_through_next_sorted_by_client_id(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    names = ["d4", "a1", "e5", "c3", "b2"]
    for name in names:
        register(web.broker, clients, name)
    seen: list[str] = []
    pages = 0
    query: dict[str, str | int] = {"limit": 2}
    while True:
        body = web.api.sessions(**query)
        pages += 1
        seen += [s["client_id"] for s in body["sessions"]]
        if body["next"] is None:
            break
        assert len(body["sessions"]) == 2
        query = {"limit": 2, "after": body["next"]}
    assert seen == sorted(names) and pages == 3
    assert [s["client_id"] for s in web.api.sessions(after="b2")["sessions"]] == ["c3", "d4", "e5"]


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=ten", "limit=", "status=gone", "status=ONLINE"]
)
def test_a_bad_query_is_a_400_with_a_json_error(web: HttpBroker, query: str) -> None:
    reply = web.api.get("/api/sessions?" + query)
    assert reply.status == 400
    body = reply.json()
    assert body["error"] == "bad_request" and body["message"]


def test_limit_bounds_are_accepted(web: HttpBroker) -> None:
    for limit in (1, 1000):
        assert web.api.get(f"/api/sessions?limit={limit}").status == 200


def test_one_session_by_its_percent_encoded_client_id(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    odd = "plant 4/line?2#é%"
    _, reg = register(web.broker, clients, odd)
    register(web.broker, clients, "plant 4")
    reply = web.api.get(web.api.session_path(odd))
    assert reply.status == 200
    session = reply.json()
    assert list(session) == SESSION_KEYS
    assert session["client_id"] == odd and session["session_id"] == reg.session_id
    missing = web.api.get(web.api.session_path("nobody"))
    assert missing.status == 404 and missing.json()["error"] == "not_found"


# --- /api/stats -------------------------------------------------------------------------------


def test_stats_are_the_stats_frames_counters(web: HttpBroker, clients: list[WireClient]) -> None:
    register(web.broker, clients, "one")
    stats = web.api.get("/api/stats").json()
    everything = web.broker.stats()
    assert stats and all(everything[key] == value for key, value in stats.items())
    assert stats["sessions"] == 1 and stats["connected"] == 1
    # Only the SubscriberManager's (the frame's), not the listeners' or the supervisor's.
    assert "accepted" not in stats and "auth_ok" not in stats


# --- admin actions ----------------------------------------------------------------------------


def test_disconnect_closes_the_connection_and_the_session_lingers(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    client, reg = register(web.broker, clients, "dev/1")
    with capture_logs() as logs:
        reply = web.api.request("POST", web.api.session_path("dev/1") + "/disconnect")
    assert reply.status == 204 and reply.body == b""
    assert client.frames_until_closed() == []
    wait_for(lambda: web.api.get(web.api.session_path("dev/1")).json()["status"] == "away")
    [audit] = [entry for entry in logs if entry["event"] == "admin_action"]
    assert audit["action"] == "disconnect" and audit["client_id"] == "dev/1"
    assert audit["session_id"] == reg.session_id
    assert audit["token_id"] == token_id(hash_token(web.token))
    assert audit["peer"].startswith("127.0.0.1:")
    missing = web.api.request("POST", web.api.session_path("nobody") + "/disconnect")
    assert missing.status == 404 and missing.json()["error"] == "not_found"


def test_delete_ends_the_session_with_session_ended(
    web: HttpBroker, clients: list[WireClient]
) -> None:
    client, reg = register(web.broker, clients, "dev/2")
    with capture_logs() as logs:
        reply = web.api.request("DELETE", web.api.session_path("dev/2"))
    assert reply.status == 204
    frames = client.frames_until_closed()
    assert [f.code for f in frames if isinstance(f, Error)] == ["session_ended"]
    assert web.api.get(web.api.session_path("dev/2")).status == 404
    assert web.api.sessions()["sessions"] == []
    [audit] = [entry for entry in logs if entry["event"] == "admin_action"]
    assert audit["action"] == "end" and audit["session_id"] == reg.session_id
    assert web.api.request("DELETE", web.api.session_path("dev/2")).status == 404


# --- tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/sessions"),
        ("GET", "/api/sessions/x"),
        ("GET", "/api/stats"),
        ("POST", "/api/sessions/x/disconnect"),
        ("DELETE", "/api/sessions/x"),
        ("GET", "/api/nothing-here"),
    ],
)
def test_the_api_needs_a_listed_token(web: HttpBroker, method: str, path: str) -> None:
    for token in (None, "wrong", ""):
        reply = web.api.request(method, path, token=token)
        assert reply.status == 401, (token, reply)
        assert reply.json()["error"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    basic = web.api.request(method, path, token=None, headers={"Authorization": "Basic eDp5"})
    assert basic.status == 401


def test_a_refused_token_is_logged_without_the_token(web: HttpBroker) -> None:
    with capture_logs() as logs:
        assert web.api.get("/api/stats", token="not-the-token").status == 401
    [entry] = [e for e in logs if e["event"] == "http_auth_failed"]
    assert entry["path"] == "/api/stats" and entry["reason"] == "wrong"
    assert entry["peer"].startswith("127.0.0.1:")
    assert "not-the-token" not in repr(logs)


def test_repeated_failures_from_one_address_are_rate_limited(
    start_http_broker: Callable[..., HttpBroker],
) -> None:
    web = start_http_broker(auth_fail_limit=2, auth_fail_penalty=0.05)
    with capture_logs() as logs:
        for _ in range(4):
            assert web.api.get("/api/stats", token="guess").status == 401
    flags = [e["rate_limited"] for e in logs if e["event"] == "http_auth_failed"]
    assert flags == [False, False, True, True]
    # A right token is still accepted from that address.
    assert web.api.get("/api/stats").status == 200


def test_without_a_token_file_the_api_answers_401_and_the_start_says_how(
    start_broker: Callable[..., Broker],
) -> None:
    with capture_logs() as logs:
        broker = start_broker(http=("127.0.0.1", 0))
    [hint] = [e for e in logs if e["event"] == "admin_api_disabled"]
    assert "token new" in hint["hint"]
    api = Api(broker, "anything")
    reply = api.get("/api/sessions")
    assert reply.status == 401 and "--admin-token-file" in reply.json()["message"]
    assert api.get("/health").status == 200


def test_the_token_file_is_read_again_when_it_changes(web: HttpBroker) -> None:
    second = new_token()
    assert web.api.get("/api/stats", token=second).status == 401
    append_token(web.tokens, second)
    assert web.api.get("/api/stats", token=second).status == 200
    assert web.api.get("/api/stats").status == 200
    # The first token revoked: the file rewritten with the second's hash only.
    write_atomic(web.tokens, f"# kept\n{hash_token(second)}\n".encode())
    assert web.api.get("/api/stats").status == 401
    assert web.api.get("/api/stats", token=second).status == 200
    web.tokens.unlink()
    assert web.api.get("/api/stats", token=second).status == 401


# --- the page and what needs no token ---------------------------------------------------------

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
WEB = Path(__file__).resolve().parent.parent / "broker" / "web"


@pytest.mark.parametrize(
    ("path", "name", "kind"),
    [
        ("/", "index.html", "text/html"),
        ("/fleet.js", "fleet.js", "text/javascript"),
        ("/fleet.css", "fleet.css", "text/css"),
    ],
)
def test_the_page_files_are_served_with_strict_headers(
    web: HttpBroker, path: str, name: str, kind: str
) -> None:
    reply = web.api.get(path, token=None)
    assert reply.status == 200
    assert reply.body == (WEB / name).read_bytes()
    assert reply.headers["Content-Type"].startswith(kind)
    for header, value in PAGE_HEADERS.items():
        assert reply.headers[header] == value


@pytest.mark.parametrize("path", ["/index.html", "/web/fleet.js", "/../server.py", "/fleet.json"])
def test_no_other_file_is_served(web: HttpBroker, path: str) -> None:
    assert web.api.get(path, token=None).status == 404


def test_an_unusable_http_address_is_a_one_line_startup_error(
    start_broker: Callable[..., Broker], users_file: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = BrokerConfig(
            port=0, users_path=users_file, data_dir=None, http=("127.0.0.1", port)
        )
        broker = Broker(config, users=UserStore.load(users_file))
        with pytest.raises(StartupError) as caught:
            broker.start()
    message = str(caught.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "--http" in message
    assert broker.address is None  # nothing else started
