"""The fleet page (`GET /`, broker/web/) in a real headless browser against a real broker: a
connected client's id and health appear, what the device sent is shown as text and never
parsed as HTML, and the token is asked for when missing or refused.

Debian's `chromium` runs with `--dump-dom`, which prints the DOM once the page's scripts have
run for `--virtual-time-budget` (virtual) milliseconds; the subprocess timeout bounds it in real
time. Without chromium on PATH the tests are skipped, saying so (`.ci/run` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.wire import WireClient, wait_for
from tether.broker.admin_tokens import append_token, new_token
from tether.broker.server import Broker
from tether.protocol import Ping, Pong, Registered

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What the page's scripts may run in virtual time: the first refresh and the next.
VIRTUAL_MS = 5000
REAL_TIMEOUT_S = 90  # a wall-clock bound on the browser, on a loaded machine

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not on PATH (apt-get install chromium; .ci/run does): "
    "the fleet page is not tested in a browser",
)


class Dom(HTMLParser):
    """The dumped DOM: each element by id (its tag, attributes and text) and the tags seen
    inside the sessions table's body."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, dict[str, object]] = {}
        self.rows_tags: list[str] = []
        self.tags: list[str] = []
        self.attr_names: list[str] = []
        self._pressed: list[str] = []
        self._button_pressed = False
        self.rows_text: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element_id = dict(attrs).get("id")
        self._button_pressed = tag == "button" and dict(attrs).get("aria-pressed") == "true"
        self.tags.append(tag)
        self.attr_names += [name for name, _ in attrs]
        if self._inside("rows"):
            self.rows_tags.append(tag)
        if element_id:
            self.by_id[element_id] = {"tag": tag, "attrs": dict(attrs), "text": ""}
        if tag not in ("meta", "link", "input", "br", "img"):
            self._open.append((tag, element_id))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._button_pressed and data.strip():
            self._pressed.append(data.strip())
            self._button_pressed = False
        for _, element_id in self._open:
            if element_id:
                entry = self.by_id[element_id]
                entry["text"] = str(entry["text"]) + data
        if self._inside("rows"):
            self.rows_text.append(data)

    def pressed(self) -> list[str]:
        """The filter buttons shown as pressed, by their text."""
        return self._pressed

    def _inside(self, element_id: str) -> bool:
        return any(open_id == element_id for _, open_id in self._open)

    def text(self, element_id: str) -> str:
        return " ".join(str(self.by_id[element_id]["text"]).split())

    def hidden(self, element_id: str) -> bool:
        attrs = self.by_id[element_id]["attrs"]
        assert isinstance(attrs, dict)
        return "hidden" in attrs


def dump_dom(url: str, profile: Path) -> Dom:
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={VIRTUAL_MS}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=REAL_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<html" in done.stdout, done.stderr[-2000:]
    return Dom(done.stdout)


@pytest.fixture
def fleet_broker(start_broker: Callable[..., Broker], tmp_path: Path) -> tuple[Broker, str]:
    tokens = tmp_path / "admin-tokens"
    token = new_token()
    append_token(tokens, token)
    broker = start_broker(http=("127.0.0.1", 0), admin_token_file=tokens)
    return broker, token


def page_url(broker: Broker) -> str:
    assert broker.http_address is not None
    host, port = broker.http_address
    return f"http://{host}:{port}/"


@needs_chromium
def test_the_page_shows_a_connected_client_and_its_health_as_text(
    fleet_broker: tuple[Broker, str], tmp_path: Path
) -> None:
    broker, token = fleet_broker
    assert broker.address is not None
    with WireClient(broker.address) as device:
        registered = device.register(
            "fleet-dev-1", metadata={"model": "<b>x</b>", "site": "north&<i>"}
        )
        assert isinstance(registered, Registered)
        device.send(Ping(req=9, status="degraded", details={"battery": "<img src=x>"}))
        assert device.recv() == Pong(req=9)

        dom = dump_dom(page_url(broker) + "#token=" + token, tmp_path / "profile")

    assert dom.hidden("token-form") and not dom.hidden("fleet"), dom.text("token-why")
    rows = " ".join(" ".join(dom.rows_text).split())
    assert "fleet-dev-1" in rows
    assert "degraded" in rows
    # Sent as markup, shown as text: no element was made of it.
    assert "<b>x</b>" in rows
    assert "north&<i>" in rows
    assert "<img src=x>" in rows
    assert {"b", "i", "img", "script"}.isdisjoint(dom.rows_tags), dom.rows_tags
    # The counters of /api/stats are there too.
    assert "sessions" in dom.text("counters")


@needs_chromium
def test_the_status_filter_shows_only_the_sessions_in_that_state(
    fleet_broker: tuple[Broker, str], tmp_path: Path
) -> None:
    broker, token = fleet_broker
    assert broker.address is not None
    with WireClient(broker.address) as online, WireClient(broker.address) as gone:
        assert isinstance(online.register("still-here"), Registered)
        assert isinstance(gone.register("went-away"), Registered)
        gone.close()
        wait_for(lambda: broker.stats()["connected"] == 1)

        away = dump_dom(f"{page_url(broker)}#token={token}&status=away", tmp_path / "a")
        everyone = dump_dom(f"{page_url(broker)}#token={token}", tmp_path / "b")

    assert away.rows_text and "went-away" in away.rows_text and "still-here" not in away.rows_text
    assert away.pressed() == ["away"]
    assert {"went-away", "still-here"} <= set(everyone.rows_text)
    assert everyone.pressed() == ["all"]


@needs_chromium
def test_without_a_token_the_page_asks_for_one(
    fleet_broker: tuple[Broker, str], tmp_path: Path
) -> None:
    broker, _ = fleet_broker
    dom = dump_dom(page_url(broker), tmp_path / "profile")
    assert not dom.hidden("token-form")
    assert dom.hidden("fleet")
    assert dom.text("rows") == ""


@needs_chromium
def test_a_refused_token_is_forgotten_and_asked_again(
    fleet_broker: tuple[Broker, str], tmp_path: Path
) -> None:
    broker, _ = fleet_broker
    dom = dump_dom(page_url(broker) + "#token=not-a-token", tmp_path / "profile")
    assert not dom.hidden("token-form")
    assert "refused" in dom.text("token-why")
    assert dom.hidden("fleet")


def test_the_page_is_served_with_a_strict_policy_and_no_inline_code(
    fleet_broker: tuple[Broker, str],
) -> None:
    """The page works under the CSP because nothing in it is inline (the browser tests above
    prove it runs); here, that the policy is sent and the HTML holds no script or style."""
    broker, _ = fleet_broker
    with urllib.request.urlopen(page_url(broker), timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
        html = response.read().decode()
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    dom = Dom(html)
    assert "style" not in dom.tags and "style" not in dom.attr_names
    assert not [name for name in dom.attr_names if name.startswith("on")]  # no onclick=...
    assert dom.tags.count("script") == 1 and 'src="/fleet.js"' in html
    for path in ("/fleet.js", "/fleet.css"):
        with urllib.request.urlopen(page_url(broker) + path[1:], timeout=10) as response:
            assert response.status == 200
