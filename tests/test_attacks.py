"""The attack suite (bench/attacks/) at its small size, so it never rots: each attack runs
against its own real broker, within its bounds, and the probe is answered.

Each attack runs once (cached for the module); two tests look at its result. `..._runs`
checks the attack itself: it ran to the end and did what it says (so a PASS is not an attack
that never happened). `..._holds` checks the issue's targets where they are about
correctness (memory bounds with the small sizes' margins, log lines, refusals, the audit line,
the probe and the known device answered at all); latency targets are for `scripts/bench
attacks`. The details bomb's 1 MiB target is not met yet: its test checks what holds (see
there), and the bench reports the target.
"""

from __future__ import annotations

import pytest

from bench.attacks.common import AttackResult
from bench.attacks.runner import main, markdown, run_attack, table
from bench.attacks.sizes import SMALL
from bench.report import Console

QUIET = Console(quiet=True)
_results: dict[str, AttackResult] = {}


def result(name: str) -> AttackResult:
    if name not in _results:
        _results[name] = run_attack(name, SMALL, QUIET)
    res = _results[name]
    assert res.error is None, res.error
    assert res.problems == [], res.problems
    assert res.checks or name == "baseline", "every attack checks at least one target"
    return res


def answered(res: AttackResult) -> None:
    """The probe got answered at all during the attack (or, for open-files, after it)."""
    assert res.probe_rounds > res.probe_failed, (res.probe_rounds, res.figures["probe"])


def targets_hold(res: AttackResult) -> None:
    """Every target that is not a latency holds; latency ones: the probe was answered."""
    missed = [c for c in res.checks if not c.ok and not c.timing]
    assert not missed, missed
    answered(res)


# --- each attack ran, and did what it says ------------------------------------------------


def test_baseline_runs() -> None:
    res = result("baseline")  # no attack, no target: the probe alone
    answered(res)
    assert res.probe_failed == 0 and res.resume_max_ms is not None


def test_partial_flood_runs() -> None:
    res = result("partial-flood")
    assert res.figures["connections"] > 0
    assert res.figures["bytes_sent"] > 0
    assert res.rss_peak_kib >= res.rss_base_kib > 0


def test_metadata_bomb_runs() -> None:
    res = result("metadata-bomb")
    assert res.figures["metadata_bytes"] > 1_000_000  # ~1 MiB, under the frame limit
    answers = res.figures["answers"]
    assert sum(answers.values()) == SMALL.bombs and "no answer" not in answers, answers
    assert "registered" not in answers  # every password was wrong


def test_details_bomb_runs() -> None:
    res = result("details-bomb")
    answers = res.figures["answers"]
    assert sum(answers.values()) == SMALL.bombs and "no answer" not in answers, answers


def test_big_topics_runs() -> None:
    res = result("big-topics")
    assert res.figures["published"] == SMALL.topics * SMALL.topic_publishes
    assert res.figures["subscriptions_refused"] == 0


def test_login_burst_runs() -> None:
    res = result("login-burst")
    assert res.figures["first_login"][1] == "registered"
    answers = res.figures["burst_answers"]
    assert sum(answers.values()) == SMALL.login_burst and "no answer" not in answers, answers
    assert "registered" not in answers  # every password was wrong
    assert res.figures["device_logins"]


def test_rotating_flood_runs() -> None:
    res = result("rotating-flood")
    assert res.figures["connections"] > SMALL.rotating_rate  # more than a second's worth
    assert not any(k.startswith("connect") for k in res.figures["answers"])  # 127.1.x.y works
    assert res.figures["device_logins"]


def test_stats_flood_runs() -> None:
    res = result("stats-flood")
    assert res.figures["subscriptions"] == SMALL.stats_sessions * SMALL.stats_subs_each
    assert sum(res.figures["answers"].values()) == SMALL.stats_requests


def test_many_subs_runs() -> None:
    res = result("many-subs")
    assert res.figures["subscribes_refused"] == 0
    assert 0 < res.figures["received"] <= res.figures["published"]


def test_open_files_runs() -> None:
    res = result("open-files")
    # More connections than the broker may open files: the limit was really reached.
    assert res.figures["connections"] + res.figures["connect_failures"] > SMALL.nofile_limit


def test_deep_metadata_runs() -> None:
    res = result("deep-metadata")
    # The broker answered both registers (refused, or registered and then tried).
    for what in (res.figures["deep"], res.figures["binary_key"]):
        assert what.startswith(("refused: ", "works", "broken")), what


def test_squatting_runs() -> None:
    res = result("squatting")
    assert res.figures["bob"] in ("registered", "not_authorized")
    assert res.figures["alice"] in ("registered", "conflict", "not_authorized")


# --- the targets ------------------------------------------------------------------


def test_partial_flood_holds() -> None:
    targets_hold(result("partial-flood"))


def test_metadata_bomb_holds() -> None:
    targets_hold(result("metadata-bomb"))


def test_details_bomb_holds() -> None:
    """A registered client's 1 MiB ping is refused (`bad_request`) once the decoder has seen
    64 KiB of its details, and the rest is discarded unread (protocol/scan.py), so a session
    holds far less than the frame."""
    res = result("details-bomb")
    answers = res.figures["answers"]
    assert set(answers) == {"error:bad_request"}, answers
    targets_hold(res)
    answered(res)


def test_big_topics_holds() -> None:
    targets_hold(result("big-topics"))


def test_login_burst_holds() -> None:
    res = result("login-burst")
    targets_hold(res)
    assert all(w == "registered" for _, w in res.figures["device_logins"])


def test_rotating_flood_holds() -> None:
    res = result("rotating-flood")
    targets_hold(res)
    assert all(w == "registered" for _, w in res.figures["device_logins"])


def test_stats_flood_holds() -> None:
    res = result("stats-flood")
    targets_hold(res)


def test_many_subs_holds() -> None:
    targets_hold(result("many-subs"))


def test_open_files_holds() -> None:
    targets_hold(result("open-files"))


def test_deep_metadata_holds() -> None:
    targets_hold(result("deep-metadata"))


def test_squatting_holds() -> None:
    targets_hold(result("squatting"))


# --- the runner ---------------------------------------------------------------------------


def test_the_table_has_a_line_per_target_and_the_failures_loudly() -> None:
    res = AttackResult("x", "an attack", probe_p50_ms=1.0, probe_max_ms=2500.0, probe_failed=1)
    res.check("RSS <= 1 MiB", "3 MiB", False)
    res.check("probe max <= 1 s", "2.50 s", True, timing=True)
    broken = AttackResult("y", "another", error="BenchError: the broker exited")
    text = table([res, broken], QUIET)
    lines = text.splitlines()
    assert len(lines) == 2 + 3  # heads, rule, two checks, one failure
    assert "MISS" in lines[2] and "2.50 s (1 failed)" in lines[2]
    assert lines[3].split()[-1] == "PASS"
    assert "FAIL" in lines[4] and "the broker exited" in lines[4]
    md = markdown([res, broken]).splitlines()
    assert len(md) == 2 + 3 and all(line.startswith("| ") for line in md)
    assert md[2].startswith("| `x` | 1.0 ms / 2.50 s |") and md[2].endswith("| MISS |")
    assert md[4].endswith("| FAIL |")


def test_an_unknown_attack_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2
    assert "unknown attack" in capsys.readouterr().err
