"""Topic permissions without a broker: the matcher against a reference matcher (hypothesis),
pattern validation, the users file's `publish`/`subscribe` lists and version rules, and
`tether user add|set|list` with `--pub`/`--sub` through main()."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.broker.permissions import (
    ALLOW_ALL,
    CACHE_SIZE,
    PatternError,
    compile_grants,
    validate_pattern,
)
from tether.broker.users import (
    FILE_VERSION,
    KEEP,
    UserFileError,
    UserNotFoundError,
    UserStore,
    add_user,
    set_user,
)
from tether.cli import main
from tether.client import ClientMachine, MachineConfig
from tether.client import events as ev
from tether.protocol import (
    BROKER_FRAME_TYPES,
    CLIENT_FRAME_TYPES,
    ClientFrame,
    Error,
    FrameDecoder,
    LocalProtocolError,
    Ok,
    Register,
    Registered,
    Subscribe,
    encode,
)

COST = 4

# --- the reference matcher: level by level, recursive, no trie and no cache ----------------


def _literal(value: str) -> bool:
    return value != "" and not any(c in value for c in "/+#")


def reference(pattern: str, topic: str, username: str, client_id: str) -> bool:
    levels = pattern.split("/")
    for index, level in enumerate(levels):
        for placeholder, value in (("{username}", username), ("{client_id}", client_id)):
            if level == placeholder:
                if not _literal(value):
                    return False
                levels[index] = value
    words = topic.split("/")
    dollar = topic.startswith("$")

    def match(i: int, j: int) -> bool:
        if i == len(levels):
            return j == len(words)
        # Note: a placeholder's value is never "+" or "#" (refused above).
        if levels[i] == "#" and pattern.split("/")[i] == "#":
            return not (i == 0 and dollar)
        if j == len(words):
            return False
        if levels[i] == "+" and pattern.split("/")[i] == "+":
            return not (i == 0 and dollar) and match(i + 1, j + 1)
        return levels[i] == words[j] and match(i + 1, j + 1)

    return match(0, 0)


def reference_any(patterns: list[str], topic: str, username: str, client_id: str) -> bool:
    return any(reference(p, topic, username, client_id) for p in patterns)


# Small alphabets so that patterns and topics often meet; ids that try to widen a grant.
TOPIC_LEVELS = st.sampled_from(["a", "b", "", "$s", "dev-1", "alice", "a#", "x+y"])
PATTERN_LEVELS = st.sampled_from(["a", "b", "", "$s", "+", "{username}", "{client_id}", "alice"])
IDS = st.sampled_from(["alice", "a", "dev-1", "", "a/#", "#", "+", "a/b", "$s", "x+y", "b#"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    levels = draw(st.lists(PATTERN_LEVELS, min_size=0, max_size=4))
    if draw(st.booleans()) or levels in ([], [""]):
        levels.append("#")
    return "/".join(levels)


@st.composite
def topics(draw: st.DrawFn) -> str:
    topic = "/".join(draw(st.lists(TOPIC_LEVELS, min_size=1, max_size=5)))
    return topic or "a"


@settings(max_examples=400, deadline=None)
@given(
    pubs=st.lists(patterns(), max_size=4),
    subs=st.lists(patterns(), max_size=4),
    probes=st.lists(topics(), min_size=1, max_size=8),
    username=IDS,
    client_id=IDS,
)
def test_matcher_agrees_with_the_reference(
    pubs: list[str], subs: list[str], probes: list[str], username: str, client_id: str
) -> None:
    for pattern in (*pubs, *subs):
        validate_pattern(pattern)
    matcher = compile_grants(pubs, subs, username=username, client_id=client_id)
    # Topics a placeholder builds, so the ids meet the patterns that use them.
    probes = [*probes, f"a/{client_id}", f"{username}/a", client_id or "a", f"a/{client_id}/b"]
    for _ in range(2):  # the second round answers from the cache
        for topic in probes:
            assert matcher.may_publish(topic) == reference_any(pubs, topic, username, client_id)
            assert matcher.may_subscribe(topic) == reference_any(subs, topic, username, client_id)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab/+#{}$", max_size=20))
def test_any_text_is_a_valid_pattern_or_refused(text: str) -> None:
    try:
        validate_pattern(text)
    except PatternError:
        return
    for level in text.split("/"):
        # What is accepted has wildcards only as whole levels, `#` only last.
        assert level in ("+", "#") or not any(c in level for c in "+#{}")
    assert "#" not in text.split("/")[:-1]


def test_mqtt_examples() -> None:
    m = compile_grants(["sport/tennis/#", "+/news", "$sys/x/+"], None, username="u", client_id="c")
    assert m.may_publish("sport/tennis") and m.may_publish("sport/tennis/p1/ranking")
    assert not m.may_publish("sport/tennisx") and not m.may_publish("sport")
    assert m.may_publish("a/news") and m.may_publish("/news") and not m.may_publish("a/b/news")
    assert not m.may_publish("$sys/news")  # `+` at the first level skips `$` topics
    assert m.may_publish("$sys/x/y") and not m.may_publish("$sys/x")
    everything = compile_grants(["#"], ["+/+"], username="u", client_id="c")
    assert everything.may_publish("a/b/c") and not everything.may_publish("$sys/x")
    assert everything.may_subscribe("a/") and not everything.may_subscribe("$s/a")


@pytest.mark.parametrize(
    ("client_id", "allowed"),
    [
        ("dev-7", ["devices/dev-7/cmd", "devices/dev-7/cmd/a"]),
        ("a/#", []),  # would widen devices/{client_id}/# to devices/a/#/...
        ("+", []),
        ("#", []),
        ("", []),
    ],
)
def test_placeholders_match_literally(client_id: str, allowed: list[str]) -> None:
    m = compile_grants(None, ["devices/{client_id}/#"], username="u", client_id=client_id)
    probes = [
        "devices/dev-7/cmd",
        "devices/dev-7/cmd/a",
        "devices/a/#/cmd",
        "devices/a/x/cmd",
        "devices/+/cmd",
        "devices/#/cmd",
        "devices//cmd",
        "devices/other/cmd",
    ]
    assert [t for t in probes if m.may_subscribe(t)] == allowed
    assert m.may_publish("anything")  # no publish list: no restriction


def test_no_list_empty_list_and_default_deny() -> None:
    assert compile_grants(None, None, username="u", client_id="c") is ALLOW_ALL
    nothing = compile_grants([], [], username="u", client_id="c")
    assert not nothing.may_publish("a") and not nothing.may_subscribe("a")
    denied = compile_grants(None, ["a"], username="u", client_id="c", default_deny=True)
    assert not denied.may_publish("a") and denied.may_subscribe("a")
    assert not denied.may_subscribe("b")


def test_cache_stays_bounded_and_right() -> None:
    m = compile_grants(["t/+"], None, username="u", client_id="c")
    for i in range(CACHE_SIZE * 2 + 5):
        assert m.may_publish(f"t/{i}") and not m.may_publish(f"u/{i}")
    assert m.publish is not None and len(m.publish._cache) <= CACHE_SIZE


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("", "1 to"),
        ("a/#/b", "last level"),
        ("a#", "whole level"),
        ("a/b+", "whole level"),
        ("dev-{client_id}", "placeholder must be a whole level"),
        ("{client_id}x/a", "placeholder must be a whole level"),
        ("{user}/a", "unknown placeholder"),
        ("a/{", "unknown placeholder"),
        ("a\nb", "control characters"),
        ("x" * 2000, "1 to"),
    ],
)
def test_invalid_patterns_are_refused(pattern: str, match: str) -> None:
    with pytest.raises(PatternError, match=match):
        validate_pattern(pattern)


# --- the users file ------------------------------------------------------------------------


def test_users_file_round_trip_and_versions(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "plain", "pw", cost=COST)
    assert json.loads(path.read_text())["version"] == 1
    add_user(path, "dev", "pw", cost=COST, publish=["t/{client_id}", "t/{client_id}"], subscribe=[])
    doc = json.loads(path.read_text())
    assert doc["version"] == FILE_VERSION == 4
    assert doc["users"]["dev"]["publish"] == ["t/{client_id}"]  # repeats dropped
    assert doc["users"]["dev"]["subscribe"] == []  # empty: nothing, kept as such
    assert "publish" not in doc["users"]["plain"]
    record = UserStore.load(path).get("dev")
    assert record is not None and record.publish == ("t/{client_id}",) and record.subscribe == ()
    # A password change keeps the lists; set_user changes them and keeps the password.
    add_user(path, "dev", "new", cost=COST, replace=True)
    before = UserStore.load(path).get("dev")
    assert before is not None and before.publish == ("t/{client_id}",)
    after = set_user(path, "dev", subscribe=["cmd/#"])
    assert after.publish == ("t/{client_id}",) and after.subscribe == ("cmd/#",)
    assert after.hash == before.hash and after.created == before.created
    set_user(path, "dev", publish=None, subscribe=None)  # lifted: no restriction
    assert json.loads(path.read_text())["version"] == 1  # nothing of version 4 left
    with pytest.raises(UserNotFoundError):
        set_user(path, "nobody", publish=["a"])
    with pytest.raises(PatternError):
        set_user(path, "dev", publish=["a/#/b"])
    with pytest.raises(PatternError):
        add_user(path, "bad", "pw", cost=COST, subscribe=["dev-{client_id}"])
    assert set_user(path, "dev", publish=KEEP) == UserStore.load(path).get("dev")  # unchanged


@pytest.mark.parametrize(
    ("version", "value", "match"),
    [
        (3, ["a"], "needs"),
        (4, "a/#", "must be a list"),
        (4, ["a/#/b"], "last level"),
        (4, [7], "must be a string"),
        (4, ["x-{username}"], "whole level"),
    ],
)
def test_users_file_lists_are_validated(
    tmp_path: Path, version: int, value: object, match: str
) -> None:
    path = tmp_path / "users.json"
    add_user(path, "dev", "pw", cost=COST)
    doc = json.loads(path.read_text())
    doc["version"] = version
    doc["users"]["dev"]["subscribe"] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(UserFileError, match=match):
        UserStore.load(path)


def test_a_newer_version_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"version": FILE_VERSION + 1, "users": {}}))
    with pytest.raises(UserFileError, match="newer than this broker reads"):
        UserStore.load(path)


# --- the command line ------------------------------------------------------------------------


def _run(monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = "pw\n") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(list(args))


def test_cli_add_set_list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    users = str(tmp_path / "users.json")
    common = ("--users", users)
    assert (
        _run(
            monkeypatch,
            "user",
            "add",
            "dev",
            *common,
            "--cost",
            "4",
            "--pub",
            "devices/{client_id}/telemetry",
            "--sub",
            "devices/{client_id}/cmd/#",
            "--sub",
            "fleet/broadcast",
        )
        == 0
    )
    record = UserStore.load(users).get("dev")
    assert record is not None
    assert record.publish == ("devices/{client_id}/telemetry",)
    assert record.subscribe == ("devices/{client_id}/cmd/#", "fleet/broadcast")
    assert _run(monkeypatch, "user", "add", "ops", *common, "--cost", "4") == 0
    capsys.readouterr()
    assert _run(monkeypatch, "user", "list", *common) == 0
    lines = capsys.readouterr().out.splitlines()
    dev = next(line for line in lines if line.startswith("dev\t"))
    assert "publish 'devices/{client_id}/telemetry'" in dev
    assert "subscribe 'devices/{client_id}/cmd/#', 'fleet/broadcast'" in dev
    ops = next(line for line in lines if line.startswith("ops\t"))
    assert "publish" not in ops  # no lists: nothing shown

    # set: --pub-none empties a list, --sub-any lifts one; the password stays.
    hash_before = UserStore.load(users).lookup("dev")
    assert _run(monkeypatch, "user", "set", "dev", *common, "--pub-none", "--sub-any") == 0
    record = UserStore.load(users).get("dev")
    assert record is not None and record.publish == () and record.subscribe is None
    assert record.hash == hash_before
    capsys.readouterr()
    assert _run(monkeypatch, "user", "list", *common) == 0
    assert "publish none; subscribe any" in capsys.readouterr().out
    assert _run(monkeypatch, "user", "set", "dev", *common, "--sub", "a/+") == 0
    record = UserStore.load(users).get("dev")
    assert record is not None and record.publish == () and record.subscribe == ("a/+",)
    # add --replace keeps the lists unless told.
    assert _run(monkeypatch, "user", "add", "dev", *common, "--cost", "4", "--replace") == 0
    replaced = UserStore.load(users).get("dev")
    assert replaced is not None and replaced.hash != record.hash
    assert replaced.publish == () and replaced.subscribe == ("a/+",)


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("user", "add", "x", "--pub", "a/#/b"), 2),
        (("user", "add", "x", "--sub", "dev-{client_id}"), 2),
        (("user", "set", "dev", "--pub", "a#"), 2),
        (("user", "set", "dev"), 1),  # nothing to change
        (("user", "set", "nobody", "--pub", "a"), 1),
    ],
)
def test_cli_refuses_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: tuple[str, ...],
    status: int,
) -> None:
    users = tmp_path / "users.json"
    add_user(users, "dev", "pw", cost=COST)
    before = users.read_bytes()
    capsys.readouterr()
    cost = ("--cost", "4") if args[1] == "add" else ()
    assert _run(monkeypatch, *args, "--users", str(users), *cost) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tether: error:")
    assert users.read_bytes() == before  # nothing written


# --- the client's state machine ---------------------------------------------------------------


def test_the_client_machine_forgets_a_revoked_subscription() -> None:
    config = MachineConfig(client_id="dev-7", username="dev", password="pw")
    machine = ClientMachine(config)
    machine.subscribe("a")
    machine.subscribe("b")
    machine.connection_made()

    def sent() -> list[ClientFrame]:
        decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
        decoder.receive_data(machine.data_to_send())
        return list(decoder.frames())  # type: ignore[arg-type]

    def feed(*frames: Any) -> list[ev.Event]:
        return machine.receive_data(b"".join(encode(f) for f in frames))

    def registered(req: int, session_id: str) -> Registered:
        return Registered(
            req=req,
            session_id=session_id,
            resume_token="T",
            resumed=False,
            keepalive=30,
            expiry=300,
            queued=0,
            dropped=0,
        )

    (reg,) = sent()
    assert isinstance(reg, Register)
    feed(registered(reg.req, "S1"))
    subs = sent()
    assert [f.topic for f in subs if isinstance(f, Subscribe)] == ["a", "b"]
    feed(*(Ok(req=f.req) for f in subs if isinstance(f, Subscribe)))
    # A refusal without `topic` (a fire-and-forget publish) is only a broker error.
    plain = Error(code="not_authorized", message="this user may not publish to topic 'a'")
    assert feed(plain) == [ev.BrokerError("not_authorized", plain.message)]
    assert machine.topics == ("a", "b")
    # The broker ended `a`: one event, and the topic is forgotten.
    revoked = Error(code="not_authorized", message="ended", topic="a")
    assert feed(revoked) == [ev.SubscriptionRevoked("a", "ended")]
    assert machine.topics == ("b",)
    # A new session (the old one expired) subscribes to `b` only.
    machine.connection_lost()
    machine.connection_made()
    (resume,) = sent()
    assert isinstance(resume, Register) and resume.session_id == "S1"
    feed(Error(req=resume.req, code="unknown_session", message="gone"))
    (fresh,) = sent()
    assert isinstance(fresh, Register)
    feed(registered(fresh.req, "S2"))
    assert [f.topic for f in sent() if isinstance(f, Subscribe)] == ["b"]


def test_the_revocation_frame_round_trips() -> None:
    frame = Error(code="not_authorized", message="m", topic="fleet/cmd")
    decoder = FrameDecoder(accept=BROKER_FRAME_TYPES)
    decoder.receive_data(encode(frame))
    assert list(decoder.frames()) == [frame]
    # Absent `topic` is not put on the wire.
    assert b"topic" not in encode(Error(code="not_authorized", message="m"))
    with pytest.raises(LocalProtocolError):
        Error(code="not_authorized", message="m", topic=7)  # type: ignore[arg-type]
