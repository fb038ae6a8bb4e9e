"""`scripts/bench --tls` and the `permissions` scenario (issue 13) at a tiny size: they run,
their generators really speak TLS to servers that really serve it, every message is checked,
and the restricted bench user really is restricted. Timing is not asserted (scripts/bench)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.harness import BenchError, RawClient, Server, broker_process, relay_process
from bench.report import Console
from bench.scenarios import TINY, run_scenario
from bench.scenarios_perms import RESTRICTED
from bench.scenarios_tls import TLS_SCENARIOS
from bench.tls_micro import BATCHES, measure
from tether.protocol import Error, Ok, Publish, Subscribe

ROOT = Path(__file__).resolve().parent.parent
QUIET = Console(quiet=True)
SERVERS = ("durable", "in-memory", "relay")


@pytest.mark.parametrize("start", [broker_process, relay_process], ids=["broker", "relay"])
def test_a_tls_server_speaks_only_tls_and_the_bench_client_checks_its_certificate(
    start: Callable[..., AbstractContextManager[Server]],
) -> None:
    with start(tls=True) as server:
        assert server.tls is not None
        client = RawClient(server.address, tls=server.tls, timeout=10)
        try:
            assert isinstance(client.sock, ssl.SSLSocket)
            assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
            client.register("tls-bench")
        finally:
            client.close()
        # The same port in plaintext: the register is never answered.
        plain = RawClient(server.address, timeout=5)
        try:
            with pytest.raises(BenchError):
                plain.register("plain-bench")
        finally:
            plain.close()
    # A client that trusts another CA is refused by its own side of the handshake.
    with (
        start(tls=True) as one,
        start(tls=True) as two,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        RawClient(one.address, tls=two.tls, timeout=5)


def test_tls_latency_runs_plaintext_and_tls_and_its_checks_hold() -> None:
    """(tls-throughput: through the command line, below.)"""
    name = "latency"
    res = run_scenario(name, TINY, QUIET, TLS_SCENARIOS)
    assert res.error is None, res.error
    assert res.problems == [], res.problems
    assert all(row.verdict != "FAIL" for row in res.rows), res.rows
    for who in SERVERS:
        for mode in ("plaintext", "tls"):
            figures = res.figures[who][mode]
            checks = figures["checks"]
            for check in checks if isinstance(checks, list) else [checks]:
                assert check["lost"] == 0 and check["received"] == check["expected"] > 0
    # Each TLS row is set beside its plaintext one.
    assert sum(1 for row in res.rows if row.vs_plain) == len(SERVERS)


def test_the_micro_bench_round_trips_through_tls() -> None:
    res = measure(budget_s=0.01)  # raises if a round trip changed the data
    assert set(res.ns_per_message) == set(BATCHES)
    assert all(v > 0 for v in res.ns_per_message.values())
    assert res.handshake_ms > 0


def test_the_restricted_bench_user_is_restricted_and_may_use_the_bench_topic() -> None:
    with broker_process(in_memory=True, bench_user=RESTRICTED) as server:
        client = RawClient(server.address, timeout=10)
        try:
            client.register("perm-probe")
            client.send(
                Subscribe(req=2, topic="bench/t"), Publish(topic="bench/t", payload=b"x", req=3)
            )
            assert isinstance(client.recv(), Ok)
            answers = [client.recv() for _ in range(2)]  # the deliver and the ok, any order
            assert any(isinstance(a, Ok) and a.req == 3 for a in answers), answers
            client.send(Publish(topic="elsewhere/t", payload=b"x", req=4))
            refused = client.recv()
            assert isinstance(refused, Error) and refused.code == "not_authorized", refused
            client.send(Subscribe(req=5, topic="fleet/other-device/commands"))
            refused = client.recv()
            assert isinstance(refused, Error) and refused.code == "not_authorized", refused
        finally:
            client.close()


def test_scripts_bench_tls_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--tls throughput` through bench/run.py's main, at the tiny size: every server
    plaintext and TLS, every message checked, and tls-cost with this run's CPU per message."""
    monkeypatch.setattr(bench_run, "FULL", TINY)
    status = bench_run.main(["--tls", "throughput", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "vs plaintext" in out and "TLS throughput as a share of plaintext" in out
    assert "Where it goes: the crypto is" in out
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["tls"] is True and latest["ok"] is True
    flows, cost = latest["scenarios"]
    assert (flows["name"], cost["name"]) == ("tls-throughput", "tls-cost")
    for who in SERVERS:
        for mode in ("plaintext", "tls"):
            for check in flows["figures"][who][mode]["checks"]:
                assert check["lost"] == 0 and check["received"] == check["expected"] > 0
        # Present for both modes; a tiny run may take less CPU than the clock's tick (0.0).
        per_message = cost["figures"][f"{who}_throughput_cpu_us_per_message"]
        assert all(per_message[mode] >= 0 for mode in ("plaintext", "tls")), per_message
    assert sum(1 for row in flows["rows"] if row["vs_plain"]) == len(SERVERS)
    assert cost["figures"]["micro"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert cost["figures"]["connection_cpu_ms"]["tls"] > 0
    held = cost["figures"]["session_rss_kib"]
    assert held["sessions"] > 0 and held["plaintext"] is not None and held["tls"] is not None


def test_tls_refuses_scenarios_it_does_not_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--tls", "drain"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--tls runs throughput and latency only" in proc.stderr
