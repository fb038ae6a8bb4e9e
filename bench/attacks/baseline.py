"""No attack: the probe alone against a fresh broker, for as long as a short attack. Its max
is the noise floor of the machine at the time of the run (other processes, wake-ups); compare
the attacks' probe figures with it before reading a MISS of a few tens of ms as the broker's."""

from __future__ import annotations

import time

from bench.attacks.common import AttackResult, attack_broker
from bench.attacks.measure import attack_run
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.report import Console


def run(sizes: AttackSizes, console: Console) -> AttackResult:
    res = AttackResult("baseline", f"no attack: the probe alone for {sizes.baseline_s:g} s")
    with (
        attack_broker([PROBE_USER]) as broker,
        attack_run(res, broker, settle=sizes.settle_s) as r,
    ):
        r.begin()
        time.sleep(sizes.baseline_s)
        r.end()
    return res
