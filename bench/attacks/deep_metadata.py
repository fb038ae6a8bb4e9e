"""Metadata that breaks logging (issue 12: nested 1,000 deep, or with a binary map key, the
session worked but its `session_registered` audit line was lost with a traceback). Target:
the audit line is written (or the register is refused with bad_request, once limits exist)
and the session works."""

from __future__ import annotations

import json
import struct
import time

import msgpack

from bench.attacks.common import AttackBroker, AttackResult, SourcedClient, User, attack_broker
from bench.attacks.measure import attack_run
from bench.attacks.partial_flood import ATTACKER_ADDR
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.report import Console
from bench.wire import Closed, WireClient
from tether.protocol import Deliver, Error, Ok, Publish, Registered, Subscribe

ODD = User("odd", "odd-password")


def register_bytes(client_id: str, metadata: bytes) -> bytes:
    """A register frame whose metadata is given already encoded (msgpack's own packer refuses
    to nest 1,000 deep, which is exactly what is sent)."""
    base = {
        "type": "register",
        "req": 1,
        "client_id": client_id,
        "username": ODD.name,
        "password": ODD.password,
        "keepalive": 3600,
    }
    packed: bytes = msgpack.packb(base, use_bin_type=True)
    assert packed[0] == 0x80 | len(base)  # a fixmap: one more key fits the same header form
    key: bytes = msgpack.packb("metadata")
    body = bytes([0x80 | (len(base) + 1)]) + packed[1:] + key + metadata
    return struct.pack(">I", len(body)) + body


def nested(levels: int) -> bytes:
    """{"a": {"a": ... {}}}, `levels` maps deep."""
    return b"\x81\xa1a" * (levels - 1) + b"\x80"


def binary_key() -> bytes:
    packed: bytes = msgpack.packb({b"\x00\xff\xfe": "x", "fine": 1}, use_bin_type=True)
    return packed


def _works(c: WireClient, topic: str) -> bool:
    """subscribe, a confirmed publish, its deliver."""
    req = c.next_req()
    c.send(Subscribe(req=req, topic=topic))
    if c.recv() != Ok(req=req):
        return False
    req = c.next_req()
    c.send(Publish(topic=topic, payload=b"hi", req=req))
    got = c.recv_many(2)
    return Ok(req=req) in got and any(isinstance(f, Deliver) for f in got)


def _audit_line(broker: AttackBroker, client_id: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        for line in broker.log_text().splitlines():
            if "session_registered" not in line or client_id not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "session_registered" and event.get("client_id") == client_id:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _try(broker: AttackBroker, client_id: str, metadata: bytes) -> tuple[bool, str]:
    try:
        with SourcedClient(broker.address, ATTACKER_ADDR) as c:
            c.send_raw(register_bytes(client_id, metadata))
            answer = c.recv()
            if isinstance(answer, Error):
                return answer.code == "bad_request", f"refused: {answer.code}"
            if not isinstance(answer, Registered):
                return False, f"answered {type(answer).__name__}"
            works = _works(c, f"odd/{client_id}")
    except (OSError, Closed) as e:
        return False, type(e).__name__
    logged = _audit_line(broker, client_id)
    what = ("works" if works else "broken") + (", logged" if logged else ", audit line lost")
    return works and logged, what


def run(sizes: AttackSizes, console: Console) -> AttackResult:
    res = AttackResult(
        "deep-metadata",
        f"register metadata nested {sizes.deep_levels:,} deep; one with a binary map key",
    )
    with attack_broker([PROBE_USER, ODD], log_level="info") as broker:
        with attack_run(res, broker, settle=0) as r:
            r.begin()
            deep = _try(broker, "deep-1", nested(sizes.deep_levels))
            binkey = _try(broker, "binkey-1", binary_key())
            r.end()
        tracebacks = broker.log_text().count("Traceback")
    res.check(
        f"nested {sizes.deep_levels:,} deep: logged and works (or bad_request)", deep[1], deep[0]
    )
    res.check("binary map key: logged and works (or bad_request)", binkey[1], binkey[0])
    res.figures.update(deep=deep[1], binary_key=binkey[1], traceback_lines=tracebacks)
    return res
