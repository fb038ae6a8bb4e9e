"""How big each attack is: FULL is the issue's (each attack at most 60 s), SMALL is what
tests/test_attacks.py runs (seconds each). Targets that scale with the attack are here too."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class AttackSizes:
    settle_s: float = 1.0  # after an attack, before its retained RSS is read
    baseline_s: float = 10.0  # the probe alone, no attack
    # unregistered partial-frame flood
    flood_conns: int = 2_000
    flood_frame: int = 1 << 20  # the declared frame: all but its last byte is sent
    flood_send_s: float = 30.0  # sending stops here whatever is left
    flood_hold_s: float = 3.0  # connections held open once sent, the probe running
    flood_rss_mib: int = 64  # the target: RSS growth
    flood_probe_max_s: float = 0.5
    # metadata / details bombs
    bombs: int = 30
    bomb_bytes: int = (1 << 20) - 1024  # encoded metadata, just under the 1 MiB frame limit
    bomb_cost: int = 12  # the attacked user's bcrypt cost: the bombs wait that long each
    bomb_wait_s: float = 40.0
    # one session, many big topics, away
    topics: int = 60
    topic_publishes: int = 5  # per topic, 1 MiB each
    topic_payload: int = (1 << 20) - 4096
    session_quota_mib: int = 64  # --session-queue-bytes for this broker
    # logins: a burst and a sustained flood of wrong passwords at cost 12
    login_cost: int = 12
    login_burst: int = 100
    login_burst_wait_s: float = 45.0
    rotating_s: float = 30.0
    rotating_rate: float = 20.0  # new connections a second (bcrypt at cost 12: ~4 a second)
    rotating_open: int = 300  # at most this many open at once
    rotating_max: int = 5_000  # connections in all
    device_every_s: float = 3.0  # the known device logs in again this often
    device_logins: int = 20  # and at most this many times (each costs a hash)
    # pipelined stats with many subscriptions; a session with many subscriptions receiving
    stats_sessions: int = 200
    stats_subs_each: int = 1_000
    stats_requests: int = 300
    stats_wait_s: float = 45.0
    receiver_subs: int = 1_000
    receiver_s: float = 15.0
    receiver_rate: int = 200  # messages per second to it
    # open-file exhaustion
    nofile_limit: int = 1024
    nofile_conns: int = 1_100
    nofile_hold_s: float = 20.0
    nofile_after_s: float = 5.0
    # metadata nested deep, binary key
    deep_levels: int = 1_000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = AttackSizes()
SMALL = replace(
    FULL,
    settle_s=0.3,
    baseline_s=1.0,
    flood_conns=200,
    flood_send_s=10.0,
    flood_hold_s=0.5,
    flood_rss_mib=32,  # 200 x 1 MiB sent: an unbounded broker grows ~200 MiB
    bombs=10,
    bomb_wait_s=15.0,
    topics=6,
    topic_publishes=3,
    session_quota_mib=4,
    login_burst=10,
    login_burst_wait_s=15.0,
    rotating_s=2.5,
    rotating_rate=10.0,
    rotating_open=50,
    rotating_max=300,
    device_every_s=1.0,
    device_logins=2,
    stats_sessions=4,
    stats_subs_each=250,
    stats_requests=30,
    stats_wait_s=15.0,
    receiver_subs=200,
    receiver_s=1.5,
    receiver_rate=100,
    nofile_conns=1_100,
    nofile_hold_s=2.0,
    nofile_after_s=3.0,
)
