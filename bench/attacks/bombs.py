"""Metadata bombs (issue 12: 30 wrong-password `register`s carrying a 1 MiB `metadata` of
`{0: {}}` x 350k, waiting for bcrypt, took 1.94 GiB; the same through ping `details`).
Target: <= 1 MiB of broker RSS per session (or connection) holding one."""

from __future__ import annotations

import socket
import time
from typing import Any

import msgpack

from bench.attacks.common import (
    MIB,
    AttackResult,
    SourcedClient,
    User,
    attack_broker,
    first_answers,
    mib,
)
from bench.attacks.measure import attack_run
from bench.attacks.partial_flood import ATTACKER_ADDR, send_all
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.harness import BenchError
from bench.report import Console
from tether.protocol import Registered, encode_map

VICTIM = User("mallory-target", "the-right-password", cost=12)
EVE = User("eve", "eve-password", cost=4)  # a legitimate user who sends ping bombs


def bomb(encoded_bytes: int) -> dict[str, Any]:
    """A map that decodes into ~100 Python objects per encoded byte: `{0: {}}` (3 bytes)
    repeated to fill `encoded_bytes`."""
    return {"b": [{0: {}}] * max(1, (encoded_bytes - 8) // 3)}


def _register_map(metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "register",
        "req": 1,
        "client_id": "bomb",  # the same for all: the password is wrong anyway
        "username": VICTIM.name,
        "password": "wrong-password",
        "metadata": metadata,
    }


def _per_session(res: AttackResult, n: int) -> None:
    growth = max(0, res.rss_peak_kib - res.rss_base_kib)
    res.check(
        "<= 1 MiB RSS per session held",
        f"{mib(growth / max(1, n))} ({n} held)",
        growth / max(1, n) <= 1024,
    )


def run_metadata(sizes: AttackSizes, console: Console) -> AttackResult:
    n = sizes.bombs
    victim = User(VICTIM.name, VICTIM.password, cost=sizes.bomb_cost)
    metadata = bomb(sizes.bomb_bytes)
    encoded = len(msgpack.packb(metadata))
    res = AttackResult(
        "metadata-bomb",
        f"{n} wrong-password registers (bcrypt cost {victim.cost}), each with"
        f" {encoded / MIB:.2f} MiB of metadata {{0: {{}}}} x {len(metadata['b']):,}",
    )
    frame = encode_map(_register_map(metadata))
    with (
        attack_broker([PROBE_USER, victim]) as broker,
        attack_run(res, broker, settle=sizes.settle_s) as r,
    ):
        r.begin()
        deadline = time.monotonic() + sizes.bomb_wait_s
        socks: list[socket.socket] = []
        try:
            for _ in range(n):
                socks.append(
                    socket.create_connection(
                        broker.address, timeout=5, source_address=(ATTACKER_ADDR, 0)
                    )
                )
            # Interleaved: a broker that stops reading one costs no time per connection.
            send_all(socks, frame, deadline)
            answers = first_answers(socks, deadline)
        finally:
            for s in socks:
                s.close()
        r.end()
    _per_session(res, n)
    res.figures.update(metadata_bytes=encoded, answers=answers, bcrypt_cost=victim.cost)
    return res


def run_details(sizes: AttackSizes, console: Console) -> AttackResult:
    n = sizes.bombs
    details = bomb(sizes.bomb_bytes)
    ping = encode_map({"type": "ping", "req": 2, "details": details})
    encoded = len(msgpack.packb(details))
    res = AttackResult(
        "details-bomb",
        f"{n} sessions, each a ping with {encoded / MIB:.2f} MiB of details"
        f" {{0: {{}}}} x {len(details['b']):,}",
    )
    with attack_broker([PROBE_USER, EVE]) as broker:
        clients: list[SourcedClient] = []
        try:
            for i in range(n):
                c = SourcedClient(broker.address, ATTACKER_ADDR)
                clients.append(c)
                reg = c.register(f"eve-{i}", EVE.name, EVE.password, keepalive=3600)
                if not isinstance(reg, Registered):
                    raise BenchError(f"eve could not register: {reg!r}")
            with attack_run(res, broker, settle=sizes.settle_s) as r:
                r.begin()
                deadline = time.monotonic() + sizes.bomb_wait_s
                socks = [c.sock for c in clients]
                for s in socks:
                    s.setblocking(False)
                send_all(socks, ping, deadline)
                answers = first_answers(socks, deadline)
                time.sleep(0.5)  # held while the sessions live, if the broker keeps them
                r.end()
        finally:
            for c in clients:
                c.close()
    _per_session(res, n)
    res.figures.update(details_bytes=encoded, answers=answers)
    return res
