"""2,000 connections that never register, each sending all but the last byte of a declared
1 MiB frame (issue 12: 3.46 GiB RSS, still 3.39 GiB after they closed). Targets: RSS growth
<= 64 MiB, probe max <= 0.5 s."""

from __future__ import annotations

import selectors
import socket
import struct
import time

from bench.attacks.common import AttackResult, attack_broker, mib
from bench.attacks.measure import attack_run
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.harness import HOST
from bench.report import Console

ATTACKER_ADDR = HOST  # one address; the probe has its own


def open_many(
    address: tuple[str, int], n: int, source: str, deadline: float
) -> list[socket.socket]:
    """Up to `n` connections from `source`, stopping at `deadline` or the first refusal."""
    socks: list[socket.socket] = []
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        try:
            s = socket.create_connection(address, timeout=5, source_address=(source, 0))
        except OSError:
            break
        s.setblocking(False)
        socks.append(s)
    return socks


def send_all(socks: list[socket.socket], data: bytes, deadline: float) -> tuple[int, int]:
    """Send `data` on every socket, interleaved, until all is sent or `deadline`. Returns
    (bytes sent in all, sockets the broker closed or reset)."""
    view = memoryview(data)
    sel = selectors.DefaultSelector()
    offsets: dict[int, int] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE)
        offsets[s.fileno()] = 0
    sent = closed = 0
    try:
        while offsets and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                s = ready
                fd = s.fileno()
                try:
                    n = s.send(view[offsets[fd] : offsets[fd] + (256 << 10)])
                except BlockingIOError:
                    continue
                except OSError:
                    n = -1
                if n <= 0:
                    closed += 1
                    sel.unregister(s)
                    del offsets[fd]
                    continue
                sent += n
                offsets[fd] += n
                if offsets[fd] >= len(data):
                    sel.unregister(s)
                    del offsets[fd]
    finally:
        sel.close()
    return sent, closed


def run(sizes: AttackSizes, console: Console) -> AttackResult:
    n, size = sizes.flood_conns, sizes.flood_frame
    res = AttackResult(
        "partial-flood",
        f"{n:,} unregistered connections, each all but 1 byte of a declared"
        f" {size / (1 << 20):g} MiB frame",
    )
    frame = struct.pack(">I", size) + bytes(size - 1)
    with attack_broker([PROBE_USER]) as broker, attack_run(res, broker, settle=sizes.settle_s) as r:
        r.begin()
        deadline = time.monotonic() + sizes.flood_send_s
        socks = open_many(broker.address, n, ATTACKER_ADDR, deadline)
        try:
            sent, closed = send_all(socks, frame, deadline)
            send_s = time.monotonic() - r.t0
            time.sleep(sizes.flood_hold_s)
        finally:
            for s in socks:
                s.close()
        r.end()
    growth = res.rss_peak_kib - res.rss_base_kib
    res.check(
        f"RSS growth <= {sizes.flood_rss_mib} MiB",
        mib(growth),
        growth <= sizes.flood_rss_mib * 1024,
    )
    pmax = res.probe_max_ms
    res.check(
        f"probe max <= {sizes.flood_probe_max_s:g} s",
        "no round"
        if pmax is None
        else f"{pmax / 1000:.2f} s" + (f" ({res.probe_failed} failed)" if res.probe_failed else ""),
        pmax is not None and pmax <= sizes.flood_probe_max_s * 1000 and not res.probe_failed,
        timing=True,
    )
    res.figures.update(
        connections=len(socks),
        bytes_sent=sent,
        closed_by_broker=closed,
        send_seconds=round(send_s, 2),
    )
    if not socks:
        res.problems.append("no attacking connection could be opened")
    return res
