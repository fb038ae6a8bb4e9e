"""Open-file exhaustion (issue 12: ~1,000 idle connections with the open-file limit at 1024
gave 228,436 traceback lines in 25 s, 100 % CPU and 6-11 s logins: the asyncio accept loop
spinning on EMFILE). The broker runs with RLIMIT_NOFILE 1024 (soft and hard). Targets: fewer
than 100 log lines, probe max <= 1 s after the flood."""

from __future__ import annotations

import socket
import time

from bench.attacks.common import AttackResult, attack_broker
from bench.attacks.measure import attack_run
from bench.attacks.partial_flood import ATTACKER_ADDR
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.report import Console

LOG_LINES_TARGET = 100
PROBE_AFTER_S = 1.0


def run(sizes: AttackSizes, console: Console) -> AttackResult:
    n, limit = sizes.nofile_conns, sizes.nofile_limit
    res = AttackResult(
        "open-files",
        f"{n:,} idle connections for {sizes.nofile_hold_s:g} s, broker open-file limit {limit}",
    )
    socks: list[socket.socket] = []
    failed = 0
    with (
        attack_broker([PROBE_USER], nofile=limit) as broker,
        attack_run(res, broker, probe_timeout=2.0, settle=sizes.settle_s) as r,
    ):
        lines0 = broker.log_lines()
        r.begin()
        deadline = r.t0 + min(15.0, sizes.nofile_hold_s + 10)
        try:
            # A broker that stops accepting lets the backlog fill: then connects hang.
            while len(socks) < n and failed < 20 and time.monotonic() < deadline:
                try:
                    s = socket.create_connection(
                        broker.address, timeout=1, source_address=(ATTACKER_ADDR, 0)
                    )
                except OSError:
                    failed += 1
                    continue
                socks.append(s)
            opened_s = time.monotonic() - r.t0
            time.sleep(max(0.0, r.t0 + sizes.nofile_hold_s - time.monotonic()))
        finally:
            for s in socks:
                s.close()
        r.judge_from = time.monotonic()
        time.sleep(sizes.nofile_after_s)
        r.end()
        lines = broker.log_lines() - lines0
        tail = broker.server.log_tail(2)
    res.check(f"fewer than {LOG_LINES_TARGET} log lines", f"{lines:,}", lines < LOG_LINES_TARGET)
    pmax = res.probe_max_ms
    res.check(
        f"probe max <= {PROBE_AFTER_S:g} s after the flood",
        "no round"
        if pmax is None
        else f"{pmax / 1000:.2f} s" + (f" ({res.probe_failed} failed)" if res.probe_failed else ""),
        pmax is not None and pmax <= PROBE_AFTER_S * 1000 and not res.probe_failed,
        timing=True,
    )
    res.figures.update(
        connections=len(socks),
        connect_failures=failed,
        open_seconds=round(opened_s, 2),
        log_lines=lines,
        log_tail=tail[-500:],
    )
    return res
