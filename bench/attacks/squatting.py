"""client_id squatting (issue 12: bob registered `alice-sensor` first; alice's client failed
with `conflict`, even with takeover). alice's users-file entry allows only the client-id
prefix `alice-`; bob's allows any. Target: bob is refused `not_authorized`, alice registers."""

from __future__ import annotations

from bench.attacks.common import AttackResult, SourcedClient, User, attack_broker
from bench.attacks.measure import attack_run
from bench.attacks.partial_flood import ATTACKER_ADDR
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.report import Console
from tether.protocol import BrokerFrame, Error, Registered

ALICE = User("alice", "alice-password", client_id_prefixes=("alice-",))
BOB = User("bob", "bob-password")
ALICE_ADDR = "127.0.0.4"


def _what(frame: BrokerFrame) -> str:
    if isinstance(frame, Registered):
        return "registered"
    return frame.code if isinstance(frame, Error) else type(frame).__name__


def run(sizes: AttackSizes, console: Console) -> AttackResult:
    res = AttackResult("squatting", "bob registers alice-sensor first; then alice, with takeover")
    with attack_broker([PROBE_USER, ALICE, BOB]) as broker:
        with attack_run(res, broker, settle=0) as r:
            r.begin()
            with SourcedClient(broker.address, ATTACKER_ADDR) as bob:
                squat = _what(bob.register("alice-sensor", BOB.name, BOB.password))
                with SourcedClient(broker.address, ALICE_ADDR) as alice:
                    own = _what(
                        alice.register("alice-sensor", ALICE.name, ALICE.password, takeover=True)
                    )
            r.end()
        prefixes = broker.prefixes_supported
    res.check("bob is refused not_authorized", squat, squat == "not_authorized")
    res.check("alice registers alice-sensor", own, own == "registered")
    res.figures.update(bob=squat, alice=own, users_file_has_prefixes=prefixes)
    return res
