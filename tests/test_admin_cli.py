"""`tether sessions ...` and `tether stats` (client/admin_cli.py, client/admin.py) against a real
broker serving its HTTP API, with real clients connected over TCP; and the commands' argument
handling and rendering on their own.

The commands run in this process (tether.cli.main, output captured), except one run of
`tether stats` as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.harness import free_port
from tests.helpers import subscribe
from tests.test_client_chaos import wait_until
from tests.test_client_restart import REPO, cli_env
from tests.wire import WireClient
from tether.broker.admin_tokens import append_token, new_token
from tether.broker.server import Broker
from tether.cli import main
from tether.client.admin import AdminClient, AdminError, NoSuchSession, read_token
from tether.client.admin_cli import COLUMNS, age, describe, session_rows, table
from tether.protocol import Error, Ping, Pong, Publish, Registered

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, str]:
    """The broker's token file (hashes) and one token it accepts."""
    tokens = tmp_path / "admin-tokens"
    token = new_token()
    append_token(tokens, token)
    return tokens, token


@pytest.fixture
def api_broker(start_broker: Callable[..., Broker], token_file: tuple[Path, str]) -> Broker:
    return start_broker(http=("127.0.0.1", 0), admin_token_file=token_file[0])


def http_url(broker: Broker) -> str:
    assert broker.http_address is not None
    host, port = broker.http_address
    return f"http://{host}:{port}"


@pytest.fixture
def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    token_file: tuple[Path, str],
) -> Run:
    """Run `tether ARGS...` here with the token in $TETHER_ADMIN_TOKEN (unless `token` says
    otherwise: None unsets it); returns (status, stdout, stderr)."""

    def go(*args: str, token: str | None = token_file[1]) -> tuple[int, str, str]:
        if token is None:
            monkeypatch.delenv("TETHER_ADMIN_TOKEN", raising=False)
        else:
            monkeypatch.setenv("TETHER_ADMIN_TOKEN", token)
        capsys.readouterr()
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse refusals
            status = int(exc.code or 0)
        out, err = capsys.readouterr()
        return status, out, err

    return go


@pytest.fixture
def devices(api_broker: Broker) -> Iterator[Callable[[str], WireClient]]:
    """Connect a registered device (as alice) to the API broker; closed after the test."""
    made: list[WireClient] = []

    def connect(client_id: str, **register: object) -> WireClient:
        assert api_broker.address is not None
        client = WireClient(api_broker.address)
        made.append(client)
        assert isinstance(client.register(client_id, **register), Registered)
        return client

    yield connect  # type: ignore[misc]
    for client in made:
        client.close()


def _state(broker: Broker, token: str, client_id: str) -> str | None:
    """The session's status as the API tells it; None when there is no such session."""
    try:
        return str(AdminClient(http_url(broker), token).session(client_id)["status"])
    except NoSuchSession:
        return None


# --- against a real broker --------------------------------------------------------------------


def test_sessions_lists_every_session_with_its_health_and_queue(
    api_broker: Broker, devices: Callable[..., WireClient], run: Run
) -> None:
    sensor = devices("sensor-7", metadata={"model": "x1"})
    sensor.send(Ping(req=50, status="degraded", details={"battery": 12}))
    assert sensor.recv() == Pong(req=50)
    subscribe(sensor, "fleet/sensor-7/cmd")
    sensor.close()  # away, with its subscription: what is published now waits for it
    wait_until(lambda: api_broker.stats()["connected"] == 0, 5, lambda: "the disconnect")
    other = devices("pump-1")
    other.send(Publish(topic="fleet/sensor-7/cmd", payload=b"a", req=60))
    other.send(Publish(topic="fleet/sensor-7/cmd", payload=b"b", req=61))
    other.recv_many(2)

    status, out, err = run("sessions", "--http", http_url(api_broker))
    assert status == 0, err
    header, *rows = out.splitlines()
    assert header.split("   ")[0].strip() == "CLIENT ID"
    assert [h for h in COLUMNS if h not in header] == []
    assert [r.split()[0] for r in rows] == ["pump-1", "sensor-7"]  # sorted by client id
    pump, sensor_row = (r.split() for r in rows)
    assert pump[1:3] == ["alice", "online"]
    assert sensor_row[1:4] == ["alice", "away", "degraded"]
    assert sensor_row[-2:] == ["2", "-"]  # 2 queued; no peer while away
    assert pump[-1].startswith("127.0.0.1:")

    status, out, _ = run("sessions", "--status", "away", "--http", http_url(api_broker))
    assert status == 0 and [r.split()[0] for r in out.splitlines()[1:]] == ["sensor-7"]
    status, out, _ = run("sessions", "--username", "bob", "--http", http_url(api_broker))
    assert status == 0 and out.splitlines()[1:] == []

    status, out, _ = run("sessions", "--json", "--http", http_url(api_broker))
    assert status == 0
    answer = json.loads(out)
    assert answer["next"] is None
    by_id = {s["client_id"]: s for s in answer["sessions"]}
    assert by_id["sensor-7"]["metadata"] == {"model": "x1"}
    assert by_id["sensor-7"]["health"]["details"] == {"battery": 12}
    assert by_id["sensor-7"]["subscriptions"][0]["queued"] == 2


def test_the_client_follows_every_page(
    api_broker: Broker, devices: Callable[..., WireClient], token_file: tuple[Path, str]
) -> None:
    ids = [f"dev-{i:02d}" for i in range(7)]
    for client_id in ids:
        devices(client_id)
    client = AdminClient(http_url(api_broker), token_file[1])
    first = client.page(limit=3)
    assert len(first["sessions"]) == 3 and first["next"] == "dev-02"
    assert [s["client_id"] for s in client.sessions(page_size=3)] == ids
    assert [s["client_id"] for s in client.sessions(client_id_prefix="dev-0", page_size=2)] == ids


def test_show_prints_one_session_readably_or_as_json(
    api_broker: Broker, devices: Callable[..., WireClient], run: Run
) -> None:
    device = devices("lab/arm 1%", metadata={"firmware": "2.1"})  # every character encoded
    device.send(Ping(req=70, status="healthy", details={"temp": 41}))
    assert device.recv() == Pong(req=70)
    subscribe(device, "lab/arm/cmd")

    status, out, err = run("sessions", "show", "lab/arm 1%", "--http", http_url(api_broker))
    assert status == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    assert fields["client id"].strip() == "lab/arm 1%"
    assert fields["status"].strip() == "online"
    assert fields["health"].strip().startswith("healthy, reported ")
    assert json.loads(fields["metadata"]) == {"firmware": "2.1"}
    assert json.loads(fields["health details"]) == {"temp": 41}
    assert "lab/arm/cmd" in out and "QUEUED" in out

    # Options before the action work as well as after it.
    status, out, _ = run("sessions", "--http", http_url(api_broker), "show", "lab/arm 1%", "--json")
    assert status == 0 and json.loads(out)["client_id"] == "lab/arm 1%"


def test_show_of_an_unknown_session_is_one_line(api_broker: Broker, run: Run) -> None:
    status, out, err = run("sessions", "show", "nobody", "--http", http_url(api_broker))
    assert (status, out) == (1, "")
    assert err == "tether: error: no session with client id 'nobody'\n"


def test_disconnect_closes_the_connection_and_keeps_the_session(
    api_broker: Broker, devices: Callable[..., WireClient], run: Run, token_file: tuple[Path, str]
) -> None:
    device = devices("kiosk-3")
    status, out, err = run("sessions", "disconnect", "kiosk-3", "--http", http_url(api_broker))
    assert status == 0, err
    assert "kiosk-3" in out
    assert device.frames_until_closed() == []  # closed without an error frame
    wait_until(lambda: _state(api_broker, token_file[1], "kiosk-3") == "away", 5, lambda: "away")

    status, _, err = run("sessions", "disconnect", "ghost", "--http", http_url(api_broker))
    assert status == 1 and "no session with client id 'ghost'" in err


def test_end_ends_the_session_and_tells_its_client(
    api_broker: Broker, devices: Callable[..., WireClient], run: Run, token_file: tuple[Path, str]
) -> None:
    device = devices("kiosk-4")
    status, _, err = run("sessions", "end", "kiosk-4", "--http", http_url(api_broker))
    assert status == 0, err
    frames = device.frames_until_closed()
    assert [(type(f), getattr(f, "code", None)) for f in frames] == [(Error, "session_ended")]
    assert _state(api_broker, token_file[1], "kiosk-4") is None

    status, _, err = run("sessions", "end", "kiosk-4", "--http", http_url(api_broker))
    assert status == 1 and "no session with client id 'kiosk-4'" in err


def test_stats_prints_the_counters_as_json(
    api_broker: Broker, devices: Callable[..., WireClient], run: Run
) -> None:
    devices("counted")
    status, out, err = run("stats", "--http", http_url(api_broker))
    assert status == 0, err
    stats = json.loads(out)
    assert stats["sessions"] == 1 and stats["connected"] == 1
    assert {"published", "delivered", "queued", "bcrypt_hashes"} <= set(stats)
    assert out == json.dumps(stats, indent=2, sort_keys=True) + "\n"  # the format it always had
    # No session was made to ask (the old `stats` frame needed one, and a bcrypt check).
    assert api_broker.stats()["sessions"] == 1


def test_stats_as_a_user_runs_it_with_a_token_file(
    api_broker: Broker, token_file: tuple[Path, str], tmp_path: Path
) -> None:
    mine = tmp_path / "my-token"
    mine.write_text(token_file[1] + "\n")
    env = {k: v for k, v in cli_env().items() if k != "TETHER_ADMIN_TOKEN"}
    hashes = api_broker.stats()["bcrypt_hashes"]
    done = subprocess.run(
        [sys.executable, "-m", "tether", "stats", "--http", http_url(api_broker),
         "--token-file", str(mine)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # No login: not a bcrypt hash more than before (the old `stats` frame cost one a call).
    assert json.loads(done.stdout)["bcrypt_hashes"] == hashes == api_broker.stats()["bcrypt_hashes"]


def test_the_token_goes_to_the_broker_and_nowhere_else(
    api_broker: Broker, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy from the environment is not used (it would see the token): the broker answers
    although the proxy named there does not exist."""
    port = free_port()
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    status, out, err = run("stats", "--http", http_url(api_broker))
    assert status == 0, err
    assert "sessions" in json.loads(out)


def test_a_refused_token_says_how_to_get_one(api_broker: Broker, run: Run) -> None:
    status, out, err = run("sessions", "--http", http_url(api_broker), token="wrong")
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and "401" in err and "tether token new --file" in err
    status, _, err = run("stats", "--http", http_url(api_broker), token="wrong")
    assert status == 1 and "401" in err


def test_nothing_listening_says_where_and_what_to_check(run: Run) -> None:
    port = free_port()  # bound, never listened on, then freed
    status, out, err = run("sessions", "--http", f"http://127.0.0.1:{port}")
    assert (status, out) == (1, "")
    assert err.count("\n") == 1
    assert f"http://127.0.0.1:{port}" in err and "connection refused" in err
    assert "--http" in err


def test_the_brokers_tcp_port_is_not_its_http_endpoint(api_broker: Broker, run: Run) -> None:
    assert api_broker.address is not None
    status, _, err = run("sessions", "--http", f"http://127.0.0.1:{api_broker.address[1]}")
    assert status == 1 and err.startswith("tether: error: cannot reach") and "--http" in err


# --- arguments, tokens and rendering, no broker ---------------------------------------------


def test_no_token_is_an_error_before_any_request(run: Run) -> None:
    status, out, err = run("sessions", token=None)
    assert (status, out) == (1, "")
    assert "TETHER_ADMIN_TOKEN" in err and "--token-file" in err


def test_the_token_is_never_an_argument(run: Run) -> None:
    for command in (["sessions"], ["sessions", "show", "x"], ["stats"]):
        status, _, err = run(*command, "--token", "abc")
        assert status == 2 and "usage:" in err, err  # refused, not taken for --token-file


def test_bad_arguments_are_refused(run: Run) -> None:
    assert run("sessions", "--status", "gone")[0] == 2
    assert run("sessions", "show")[0] == 2  # no client id
    assert run("sessions", "frobnicate", "x")[0] == 2
    status, _, err = run("sessions", "--http", "127.0.0.1:7879")
    assert status == 1 and "not an http:// URL" in err


def test_the_token_file_holds_the_token_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret-token \n")
    assert read_token(path) == "s3cret-token"
    path.write_text("\n")
    with pytest.raises(AdminError, match="empty"):
        read_token(path)
    with pytest.raises(AdminError, match="cannot read the token file"):
        read_token(tmp_path / "missing")


def test_ages_read_like_docker_ps() -> None:
    now = datetime(2026, 11, 29, 16, 10, 0, tzinfo=UTC)

    def ago(**delta: float) -> str:
        return age((now - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ"), now)

    assert ago(seconds=12) == "12s ago"
    assert ago(seconds=125) == "2m ago"
    assert ago(hours=3, minutes=59) == "3h ago"
    assert ago(days=2, hours=1) == "2d ago"
    assert ago(seconds=-5) == "just now"
    assert age(None, now) == "-" and age("not a time", now) == "-"


def test_show_says_when_an_away_session_expires() -> None:
    now = datetime(2026, 11, 29, 16, 10, 0, tzinfo=UTC)
    away = {
        "client_id": "sensor-9",
        "status": "away",
        "away_since": "2026-11-29T16:09:00Z",
        "expires_at": "2026-11-29T16:14:00Z",
        "health": {"status": None, "details": None, "at": None, "stale": False},
        "subscriptions": [],
    }
    lines = dict(line.split(":", 1) for line in describe(away, now).splitlines())
    assert lines["away since"].strip() == "2026-11-29T16:09:00Z (1m ago)"
    assert lines["expires at"].strip() == "2026-11-29T16:14:00Z (in 4m)"
    assert lines["health"].strip() == "-"  # never reported
    assert lines["subscriptions"].strip() == "none"


def test_what_a_device_sent_cannot_rewrite_the_terminal() -> None:
    now = datetime(2026, 11, 29, 16, 10, 0, tzinfo=UTC)
    evil = {
        "client_id": "dev\x1b[2J\nfake-row",
        "username": "alice",
        "status": "online",
        "last_seen": "2026-11-29T16:09:58Z",
        "peer": None,
        "health": {"status": "degraded\r", "stale": True},
        "subscriptions": [{"queued": 2}, {"queued": 3}],
    }
    [row] = session_rows([evil], now)
    assert row == ["dev\\x1b[2J\\nfake-row", "alice", "online", "degraded\\r (stale)", "2s ago",
                   "5", "-"]  # fmt: skip
    text = table(COLUMNS, [row])
    assert len(text.splitlines()) == 2 and "\x1b" not in text
