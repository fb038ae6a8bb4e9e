"""The bench at a tiny size, so it never rots: every scenario runs and its checks hold.

Timing is not asserted (the figures are for `scripts/bench`); what is asserted is what the bench
checks: nothing lost, duplicated or reordered, every session alive, no bcrypt hash in the storm.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.checks import MARK, Stream, Tally
from bench.fastwire import DeliverDecoder
from bench.harness import broker_process
from bench.loadgen import PublishEncoder
from bench.report import Console
from bench.scenarios import SCENARIOS, TINY, run_scenario
from tether.protocol import (
    BROKER_FRAME_TYPES,
    CLIENT_FRAME_TYPES,
    Deliver,
    Dropped,
    FrameDecoder,
    Ok,
    Publish,
    Registered,
    encode,
    encode_deliver,
)

ROOT = Path(__file__).resolve().parent.parent
QUIET = Console(quiet=True)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_runs_and_its_checks_hold(name: str) -> None:
    res = run_scenario(name, TINY, QUIET)
    assert res.error is None, res.error
    assert res.problems == [], res.problems
    assert res.rows, "a scenario reports at least one row"
    assert all(row.verdict != "FAIL" for row in res.rows), res.rows
    if name == "storm":
        assert res.figures["bcrypt_hashes"] == 0
        assert res.figures["checks"]["received"] == TINY.storm * TINY.storm_queued
    if name == "drain":
        assert res.figures["queued_reported"] == TINY.drain
        assert res.figures["in_memory"]["queued_reported"] == TINY.drain
    if name == "connections":
        assert res.figures["liveness_alive"] == res.figures["liveness_asked"] > 0
    if name in ("throughput", "fan-out", "fan-in"):
        # Durable, in-memory and the relay, each measured and checked.
        for who in ("tether", "tether_in_memory", "relay"):
            checks = res.figures[who]["checks"]
            assert checks["lost"] == 0 and checks["received"] == checks["expected"] > 0
        assert res.figures["ratio_to_in_memory"] > 0
    if name == "latency":
        assert res.figures["in_memory_checks"]["lost"] == 0
    if name == "restart":
        queued = TINY.restart_sessions * TINY.restart_queued
        assert res.figures["queued_reported_before_kill"] == queued
        assert res.figures["checks"]["received"] == queued  # every one after the SIGKILL
        assert 0 < res.figures["listen_seconds"] <= res.figures["recover_seconds"]
    if name == "offline-fleet":
        queued = TINY.fleet_sessions * TINY.fleet_queued
        assert res.figures["queued_reported"] == res.figures["checks"]["received"] == queued
        assert res.figures["rss_waiting_kib"] > 0


def test_burst_uses_the_cost_it_is_given() -> None:
    sizes = replace(TINY, burst=2, burst_cost=5)
    res = run_scenario("burst", sizes, QUIET)
    assert res.ok, (res.error, res.problems)
    assert res.figures["bcrypt_cost"] == 5
    assert len(res.figures["registration_seconds"]) == 2


def test_command_line_writes_json_and_latest(tmp_path: Path) -> None:
    """`python -m bench.run` end to end on one scenario (at --quick size: drain is small)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "drain", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "drain" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)
    assert "vs plaintext" not in proc.stdout  # the TLS column is for `--tls` runs only
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["ok"] is True
    assert [s["name"] for s in latest["scenarios"]] == ["drain"]
    assert len(list(tmp_path.glob("bench-*.json"))) == 1


def test_each_bench_broker_has_its_own_data_directory() -> None:
    with broker_process() as one, broker_process() as two, broker_process(in_memory=True) as mem:
        dirs = [s.cmd[s.cmd.index("--data-dir") + 1] for s in (one, two)]
        assert dirs[0] != dirs[1]
        assert all(Path(d).is_dir() for d in dirs)  # created by the brokers
        assert "--in-memory" in mem.cmd and "--data-dir" not in mem.cmd
        assert one.cmd[one.cmd.index("--sync") + 1] == "full"


def test_unknown_scenario_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown scenario" in proc.stderr


# --- the checker catches what it must ---------------------------------------------------------


def _payload(pub: int, counter: int) -> bytes:
    return MARK.pack(pub, counter, 0) + bytes(48)


def _run(deliveries: list[tuple[int, int, int]], expected: int) -> Tally:
    tally = Tally(expected=expected)
    stream = Stream(tally)
    for seq, pub, counter in deliveries:
        stream.deliver(seq, _payload(pub, counter), False)
    return tally


def test_checker_accepts_an_orderly_stream() -> None:
    tally = _run([(i, 1, i) for i in range(1, 11)], 10)
    assert tally.ok and tally.received == 10


def test_checker_flags_loss_duplicates_and_reordering() -> None:
    lost = _run([(1, 1, 1), (2, 1, 2), (4, 1, 4)], 4)
    assert not lost.ok and lost.lost == 1 and lost.seq_skipped == 1
    assert any("LOST" in p for p in lost.problems())

    duplicated = _run([(1, 1, 1), (2, 1, 2), (2, 1, 2), (3, 1, 3)], 3)
    assert not duplicated.ok and duplicated.late == 1

    # The broker numbers correctly but swaps two payloads: caught by the publisher counter.
    swapped = _run([(1, 1, 1), (2, 1, 3), (3, 1, 2)], 3)
    assert not swapped.ok and swapped.reordered >= 1

    # Fan-in: each publisher's own order counts, interleaving between publishers does not.
    interleaved = _run([(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 1, 2)], 4)
    assert interleaved.ok


def test_checker_allows_flagged_redelivery() -> None:
    tally = Tally(expected=2)
    stream = Stream(tally)
    stream.deliver(1, _payload(0, 1), False)
    stream.deliver(1, _payload(0, 1), True)  # at-least-once: a repeat flagged redelivered
    stream.deliver(2, _payload(0, 2), False)
    assert tally.ok and tally.redelivered == 1


# --- the fast subscriber decoder agrees with the protocol's --------------------------------


def test_fast_decoder_agrees_with_frame_decoder() -> None:
    frames = [
        encode_deliver("a/b", i, _payload(3, i), redelivered=i % 3 == 0) for i in range(1, 50)
    ]
    frames.insert(7, encode(Ok(req=4)))
    frames.insert(20, encode(Dropped(topic="a/b", count=2)))
    frames.append(
        encode(
            Registered(
                req=1,
                session_id="s",
                resume_token="t",
                resumed=True,
                keepalive=30,
                expiry=300,
                queued=0,
                dropped=0,
            )
        )
    )
    stream = b"".join(frames)
    reference = FrameDecoder(accept=BROKER_FRAME_TYPES)
    reference.receive_data(stream)
    want = [
        (f.topic, f.seq, f.payload, f.redelivered) if isinstance(f, Deliver) else f
        for f in reference.frames()
    ]
    for chunk in (1, 7, 100, len(stream)):  # any split of the stream
        fast = DeliverDecoder()
        got = []
        for i in range(0, len(stream), chunk):
            got += fast.feed(stream[i : i + chunk])
        assert got == want


def test_publish_encoder_matches_the_codec() -> None:
    enc = PublishEncoder("t/1", 64)
    for frame, counter in ((enc.frame(9, 5, 77), 5), (enc.confirmed(9, 6, req=1, sent_ns=77), 6)):
        decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
        decoder.receive_data(frame)
        (publish,) = list(decoder.frames())
        assert isinstance(publish, Publish) and publish.topic == "t/1"
        assert len(publish.payload) == 64
        assert MARK.unpack_from(publish.payload) == (9, counter, 77)
