"""`scripts/bench --tls` (issue 13): the throughput and latency scenarios over TLS, each beside
the same scenario in plaintext, in the same run, and what TLS itself costs.

Every server runs plaintext, then TLS (`--tls-cert`/`--tls-key` with a certificate from
bench/certs.py, in the server's temporary directory), back to back so the machine's drift falls
on both alike: `tls_repeats` such pairs for throughput (means and spreads reported), one for
latency. The generators speak TLS to the TLS one with the ssl module's client defaults (the
certificate and host name are checked). The servers are the durable broker, `--in-memory`, and
the relay (bench/relay.py) serving TLS through asyncio's TLS layer too: the relay's ratio is
what TLS costs a Python server that does nothing else.

`tls-cost` says where the time goes: what encrypting and decrypting a message costs on its
own (bench/tls_micro.py, no sockets), the broker's CPU per connection with and without a
handshake, and the servers' CPU per message with and without TLS (from the throughput runs).
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import time
from collections.abc import Callable
from typing import Any

from bench.harness import RawClient, Server, broker_process, raise_nofile, relay_process
from bench.report import FAIL, Console, Row, ScenarioResult, verdict
from bench.scenarios import (
    DURABLE,
    IN_MEMORY,
    T_MEMORY_P99_MS,
    T_P99_MS,
    T_THROUGHPUT,
    FlowRun,
    Sizes,
    _latency_run,
    _rate,
    one_to_one,
    percentile,
)
from bench.tls_micro import BATCHES, measure

RELAY = "relay"
Start = Callable[..., contextlib.AbstractContextManager[Server]]
SERVERS: tuple[tuple[str, Start], ...] = (
    (DURABLE, broker_process),
    (IN_MEMORY, functools.partial(broker_process, in_memory=True)),
    (RELAY, relay_process),
)
# scripts/bench's targets, for both modes: a fleet that turns TLS on should not lose them,
# and the plaintext verdict of the same run says whether the machine could meet them then.
TARGETS_RATE = {DURABLE: T_THROUGHPUT}
TARGETS_P99_MS = {DURABLE: T_P99_MS, IN_MEMORY: T_MEMORY_P99_MS}


def _share(tls: float, plain: float) -> str:
    return f"{tls / plain:.0%}" if plain else ""


def _label(who: str) -> str:
    return {DURABLE: "durable, --sync full", IN_MEMORY: "--in-memory", RELAY: "relay"}[who]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def tls_throughput(sizes: Sizes, console: Console) -> ScenarioResult:
    """1 -> 1, `sizes.throughput` messages, acks on: msg/s in plaintext and over TLS, each
    server `tls_repeats` times interleaved (plaintext, TLS, plaintext, TLS, ...)."""
    res = ScenarioResult("tls-throughput")
    runs: dict[tuple[str, bool], list[FlowRun]] = {}
    for who, start in SERVERS:
        for rep in range(sizes.tls_repeats):
            for tls in (False, True):
                with start(tls=tls) as server:
                    mode = "TLS" if tls else "plaintext"
                    label = f"throughput ({who}, {mode}, {rep + 1})"
                    runs.setdefault((who, tls), []).append(
                        one_to_one(server, console, label, sizes)
                    )
    repeats = f"mean of {sizes.tls_repeats}" if sizes.tls_repeats > 1 else "one run"
    for who, _ in SERVERS:
        rates = {tls: [r.rate for r in runs[who, tls]] for tls in (False, True)}
        plain_rate, tls_rate = _mean(rates[False]), _mean(rates[True])
        target = TARGETS_RATE.get(who)
        figures: dict[str, Any] = {}
        for tls in (False, True):
            mine = runs[who, tls]
            ok = all(r.tally.ok for r in mine)
            judged = target is not None
            result = verdict(_mean(rates[tls]) >= (target or 0)) if judged else ""
            spread = f" (spread {_rate(_spread(rates[tls]))})" if len(mine) > 1 else ""
            cpu = sum(r.server_cpu for r in mine)
            res.rows.append(
                Row(
                    "tls-throughput",
                    f"{'TLS' if tls else 'plaintext'} msg/s ({_label(who)}, {repeats})",
                    _rate(_mean(rates[tls])) + spread,
                    f">= {target:,.0f}" if judged else "",
                    server_cpu=cpu,
                    gen_cpu=sum(r.gen_cpu for r in mine),
                    verdict=result if ok else FAIL,
                    vs_plain=_share(tls_rate, plain_rate) if tls else "",
                )
            )
            received = sum(r.tally.received for r in mine)
            figures["tls" if tls else "plaintext"] = {
                "rates": [round(r) for r in rates[tls]],
                "mean": round(_mean(rates[tls])),
                "server_cpu": round(cpu, 3),
                "gen_cpu": round(sum(r.gen_cpu for r in mine), 3),
                "server_cpu_us_per_message": round(cpu / received * 1e6, 3) if received else None,
                "checks": [r.tally.to_dict() for r in mine],
            }
            for r in mine:
                res.problems += [
                    f"{who} {'TLS' if tls else 'plaintext'}: {p}" for p in r.tally.problems()
                ]
        figures["tls_to_plaintext"] = round(tls_rate / plain_rate, 4) if plain_rate else 0
        res.figures[who] = figures
    res.figures["repeats"] = sizes.tls_repeats
    return res


def tls_latency(sizes: Sizes, console: Console) -> ScenarioResult:
    """The latency run (a paced publisher -> 1 subscriber) in plaintext and over TLS."""
    res = ScenarioResult("tls-latency")
    rate = f"{sizes.latency_rate:,} msg/s for {sizes.latency_s:g} s"
    for who, start in SERVERS:
        pcts: dict[bool, tuple[float, float, float, float]] = {}
        for tls in (False, True):
            with start(tls=tls) as server:
                label = f"latency ({who}, {'TLS' if tls else 'plaintext'})"
                run = _latency_run(server, console, label, sizes, sizes.latency_s)
            lat = sorted(run.lat_ns)
            p50, p99, p999 = (percentile(lat, q) for q in (50, 99, 99.9))
            pcts[tls] = (p50, p99, p999, float(lat[-1]) if lat else math.nan)
            mode = "TLS" if tls else "plaintext"
            target = TARGETS_P99_MS.get(who)
            res.rows.append(
                Row(
                    "tls-latency",
                    f"{mode} p50 / p99 / p99.9 / max ({_label(who)}, {rate})",
                    " / ".join(f"{v / 1e6:.3f}" for v in pcts[tls]) + " ms",
                    f"p99 <= {target:g} ms" if target is not None else "",
                    server_cpu=run.server_cpu,
                    gen_cpu=run.gen_cpu,
                    verdict=(
                        FAIL
                        if not run.tally.ok
                        else verdict(p99 <= target * 1e6)
                        if target is not None
                        else ""
                    ),
                    vs_plain=f"p99 {_share(p99, pcts[False][1])}" if tls else "",
                )
            )
            res.figures.setdefault(who, {})["tls" if tls else "plaintext"] = {
                "p50_ms": round(p50 / 1e6, 4),
                "p99_ms": round(p99 / 1e6, 4),
                "p99_9_ms": round(p999 / 1e6, 4),
                "max_ms": round(pcts[tls][3] / 1e6, 4),
                "server_cpu": round(run.server_cpu, 3),
                "late_batches": run.late_batches,
                "server_cpu_us_per_message": (
                    round(run.server_cpu / run.tally.received * 1e6, 3)
                    if run.tally.received
                    else None
                ),
                "checks": run.tally.to_dict(),
            }
            res.problems += [f"{who} {mode}: {p}" for p in run.tally.problems()]
    return res


def _connection_cpu(tls: bool, count: int) -> float:
    """The broker's CPU per connection opened and closed (a TLS handshake, or none), in ms:
    `count` connections one after another from this process, no register."""
    with broker_process(tls=tls, in_memory=True) as server:
        address = server.address
        cpu0 = server.cpu()
        for _ in range(count):
            with socket.create_connection(address, timeout=10) as sock:
                if server.tls is not None:
                    server.tls.wrap(sock).close()
        time.sleep(0.2)  # let the broker see the last closes
        return (server.cpu() - cpu0) / count * 1e3


def _session_rss(tls: bool, count: int) -> float:
    """The broker's RSS per session held open (registered, idle), in KiB: `count` sessions
    registered one after another from this process and kept while RSS is read."""
    raise_nofile()
    with broker_process(tls=tls, in_memory=True) as server:
        before = server.rss_kib()
        clients = []
        try:
            for n in range(count):
                client = RawClient(server.address, tls=server.tls)
                clients.append(client)
                client.register(f"held-{n}")
            time.sleep(0.5)  # the last registrations' work done
            return (server.rss_kib() - before) / count
        finally:
            for client in clients:
                client.close()


def tls_cost(
    sizes: Sizes,
    console: Console,
    flows: dict[str, Any] | None = None,
    paced: dict[str, Any] | None = None,
) -> ScenarioResult:
    """Where TLS's time goes: the crypto alone (bench/tls_micro.py), the broker's CPU per
    connection with and without a handshake, and, when the same run measured them (`flows`:
    tls-throughput's figures, `paced`: tls-latency's), the servers' CPU per message with and
    without TLS, in big batches and in the latency run's small ones."""
    res = ScenarioResult("tls-cost")
    small = sizes.throughput < 10_000
    micro = measure(0.05 if small else 0.3)
    res.figures["micro"] = micro.to_dict()
    big = max(BATCHES)
    crypto = micro.ns_per_message[big] / 1e3
    connections = 20 if small else 300
    plain_ms, tls_ms = _connection_cpu(False, connections), _connection_cpu(True, connections)
    res.rows += [
        Row(
            "tls-cost",
            f"{micro.version} {micro.cipher}: a handshake alone, both ends' CPU",
            f"{micro.handshake_ms:.2f} ms",
        ),
        Row(
            "tls-cost",
            f"broker CPU per connection, plaintext / TLS ({connections} opened and closed)",
            f"{plain_ms:.2f} / {tls_ms:.2f} ms",
            vs_plain=_share(tls_ms, plain_ms),
        ),
        Row(
            "tls-cost",
            f"encrypt + decrypt a {micro.frame_bytes} B publish frame, alone / {big:,} a write",
            f"{micro.ns_per_message[1] / 1e3:.2f} / {crypto:.3f} us",
        ),
    ]
    res.figures["connection_cpu_ms"] = {
        "connections": connections,
        "plaintext": round(plain_ms, 3),
        "tls": round(tls_ms, 3),
    }
    held = 50 if small else 1000
    plain_kib, tls_kib = _session_rss(False, held), _session_rss(True, held)
    res.rows.append(
        Row(
            "tls-cost",
            f"broker RSS per session held open, plaintext / TLS ({held:,} idle sessions)",
            f"{plain_kib:.1f} / {tls_kib:.1f} KiB",
            vs_plain=_share(tls_kib, plain_kib),
        )
    )
    res.figures["session_rss_kib"] = {
        "sessions": held,
        "plaintext": round(plain_kib, 1),
        "tls": round(tls_kib, 1),
    }
    runs = (("throughput", "1,000 a batch", flows), ("latency", "10 a batch", paced))
    for kind, batch, figures in runs:
        for who in (DURABLE, IN_MEMORY, RELAY):
            if not figures or who not in figures:
                continue
            plain = figures[who]["plaintext"]["server_cpu_us_per_message"]
            tls = figures[who]["tls"]["server_cpu_us_per_message"]
            if plain is None or tls is None:
                continue
            # Per message a server decrypts a publish and encrypts a deliver: about one
            # frame's encrypt + decrypt as the micro-bench times it, when batched.
            res.rows.append(
                Row(
                    "tls-cost",
                    f"server CPU per message, plaintext / TLS ({_label(who)}, {kind}: {batch})",
                    f"{plain:.2f} / {tls:.2f} us ({tls - plain:+.2f})",
                    vs_plain=_share(tls, plain),
                )
            )
            res.figures[f"{who}_{kind}_cpu_us_per_message"] = {
                "plaintext": plain,
                "tls": tls,
                "difference": round(tls - plain, 3),
                "crypto_estimate": round(crypto, 3),
            }
    return res


def tls_summary(results: list[ScenarioResult]) -> list[str]:
    """How much TLS cost in this run and where the time went, in a few lines under the table."""
    ran = {r.name: r.figures for r in results if r.ok}
    lines = []
    flows = ran.get("tls-throughput")
    if flows:
        shares = ", ".join(
            f"{_label(who)} {flows[who]['tls_to_plaintext']:.0%}" for who, _ in SERVERS
        )
        lines.append(f"TLS throughput as a share of plaintext: {shares}.")
    paced = ran.get("tls-latency")
    if paced:
        p50 = {
            who: (paced[who]["plaintext"]["p50_ms"], paced[who]["tls"]["p50_ms"]) for who in paced
        }
        adds = ", ".join(f"{_label(who)} {tls - plain:+.3f}" for who, (plain, tls) in p50.items())
        lines.append(f"TLS adds to the p50 latency (ms): {adds}.")
    cost = ran.get("tls-cost")
    if cost:
        crypto = cost["micro"]["ns_per_message"][str(max(BATCHES))] / 1e3
        for kind, what in (("throughput", "in big batches"), ("latency", "in small batches")):
            extra = [
                f"{_label(who)} {cost[key]['difference']:+.2f}"
                for who, _ in SERVERS
                if (key := f"{who}_{kind}_cpu_us_per_message") in cost
            ]
            if extra:
                lines.append(f"Server CPU per message with TLS, {what} (us): {', '.join(extra)}.")
        handshake = cost["connection_cpu_ms"]
        lines.append(
            f"Where it goes: the crypto is {crypto:.2f} us a message (bench/tls_micro.py); the "
            "rest of the per-message cost is asyncio's TLS layer, per read and per write; a new "
            f"connection costs the broker {handshake['tls'] - handshake['plaintext']:.2f} ms "
            "more CPU (the handshake)."
        )
    return lines


TLS_SCENARIOS: dict[str, Callable[[Sizes, Console], ScenarioResult]] = {
    "throughput": tls_throughput,
    "latency": tls_latency,
}
