"""Issue 12, fair logins under a flood (docs/protocol.md 6.6): the password-check queue as pure
data (`broker/auth_queue.py`: round robin across addresses, known devices first, bounded, FIFO
per address), and a real broker under floods of slow (bcrypt cost 12) wrong passwords. Nothing
here measures time: each flood test asserts what was answered while checks were still queued.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import assert_error, registered, resume_frame
from tests.test_fleet_sessions import Fleet, _Take
from tests.wire import WireClient, wait_for
from tether.broker.auth_queue import AuthQueue, KnownDevices, RegisterAbandoned
from tether.broker.config import BrokerConfig
from tether.broker.messages import ConnHandle, GetMetrics, RegisterRejected, RegisterRequest
from tether.broker.metrics import BrokerMetrics
from tether.broker.ratelimit import FailureLimiter
from tether.broker.server import Broker
from tether.broker.supervisor import BrokerSupervisor
from tether.broker.users import UserStore, add_user
from tether.protocol import Error, ErrorCode, Register

# --- the queue, pure ----------------------------------------------------------------------

ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")

_op = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(ADDRESSES), st.booleans()),
    st.tuples(st.just("pop"), st.just(""), st.just(False)),
    st.tuples(st.just("remove"), st.sampled_from(ADDRESSES), st.just(False)),
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 8), ops=st.lists(_op, max_size=80))
def test_the_queue_is_bounded_loses_nothing_and_serves_known_devices_first(
    capacity: int, ops: list[tuple[str, str, bool]]
) -> None:
    queue: AuthQueue[int] = AuthQueue(capacity)
    where: dict[int, tuple[str, bool]] = {}  # item -> (address, priority)
    waiting: set[int] = set()
    gone: list[int] = []  # popped, refused or removed: each item once
    served: dict[tuple[str, bool], list[int]] = {}
    for number, (op, address, priority) in enumerate(ops):
        if op == "push":
            where[number] = (address, priority)
            refused = queue.push(number, address=address, priority=priority)
            waiting.add(number)
            if refused is not None:
                assert refused in waiting
                # A known device's check is only ever refused as the newcomer itself, and
                # only when every waiting check is a known device's.
                if refused != number:
                    assert not where[refused][1]
                if where[refused][1]:
                    assert refused == number
                    assert all(where[i][1] for i in waiting - {number})
                waiting.discard(refused)
                gone.append(refused)
        elif op == "pop":
            item = queue.pop()
            if item is None:
                assert not waiting
                continue
            assert item in waiting
            # Priority first: an ordinary check never goes while a known device's waits.
            if not where[item][1]:
                assert not any(where[i][1] for i in waiting)
            waiting.discard(item)
            gone.append(item)
            served.setdefault(where[item], []).append(item)
        else:
            first = queue.remove(address, lambda item: item % 2 == 0)
            if first is not None:
                assert first in waiting and where[first][0] == address
                waiting.discard(first)
                gone.append(first)
        assert len(queue) == len(waiting) <= capacity
        for a in ADDRESSES:
            assert queue.waiting(a) == sum(1 for i in waiting if where[i][0] == a)
    # FIFO per address within a tier (an eviction takes the newest: order is kept).
    for items in served.values():
        assert items == sorted(items)
    drained = []
    while (item := queue.pop()) is not None:
        drained.append(item)
    assert sorted(gone + drained) == sorted(where)
    assert len(set(gone + drained)) == len(where)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=len(ADDRESSES)))
def test_addresses_are_served_round_robin(counts: list[int]) -> None:
    queue: AuthQueue[tuple[str, int]] = AuthQueue(1_000)
    for address, count in zip(ADDRESSES, counts, strict=False):
        for n in range(count):
            queue.push((address, n), address=address)
    taken = dict.fromkeys(ADDRESSES, 0)
    while (item := queue.pop()) is not None:
        address, n = item
        assert n == taken[address]  # FIFO per address
        taken[address] += 1
        # No address is ever two turns ahead of one that still has something waiting.
        for other, count in zip(ADDRESSES, counts, strict=False):
            if taken[other] < count:
                assert taken[address] <= taken[other] + 1
    assert [taken[a] for a in ADDRESSES[: len(counts)]] == counts


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(2, 10), extra=st.integers(1, 20))
def test_a_full_queue_makes_the_flooder_pay_and_keeps_room_for_known_devices(
    capacity: int, extra: int
) -> None:
    queue: AuthQueue[str] = AuthQueue(capacity)
    flood = capacity + extra
    refused = [queue.push(f"f{n}", address="flood") for n in range(flood)]
    # One address alone: the newcomers over the bound are refused, the oldest kept.
    assert [r for r in refused if r is not None] == [f"f{n}" for n in range(capacity, flood)]
    # A stranger from another address takes the flooder's newest place...
    victim = queue.push("stranger", address="other")
    assert victim == f"f{capacity - 1}"
    # ...and a known device always gets in while any stranger's check waits.
    assert queue.push("known", address="flood", priority=True) is not None
    assert queue.pop() == "known"
    assert len(queue) == capacity - 1


def test_rotating_addresses_with_one_check_each_refuse_the_newcomer() -> None:
    queue: AuthQueue[str] = AuthQueue(3)
    for n in range(3):
        assert queue.push(f"a{n}", address=f"127.1.0.{n}") is None
    assert queue.push("late", address="127.1.0.9") == "late"
    # A known device evicts a stranger (of the longest; on a tie, the address queued first).
    assert queue.push("known", address="127.1.0.9", priority=True) == "a0"


def test_known_devices_expire_are_bounded_and_forgotten_on_failure() -> None:
    known = KnownDevices(ttl=3600.0, max_pairs=3)
    known.remember("a", "alice", 0.0)
    assert known.known("a", "alice", 3599.0)
    assert not known.known("a", "alice", 3600.0)
    assert not known.known("a", "bob", 1.0) and not known.known("b", "alice", 1.0)
    for n, name in enumerate(("b", "c", "d")):
        known.remember(name, "alice", 10.0 + n)
    assert len(known) == 3 and not known.known("a", "alice", 20.0)  # the oldest forgotten
    known.remember("b", "alice", 30.0)  # a success refreshes the pair: now the newest
    known.remember("e", "alice", 31.0)
    assert known.known("b", "alice", 32.0) and not known.known("c", "alice", 32.0)
    known.forget("b", "alice")
    assert not known.known("b", "alice", 32.0)
    known.remember("f", "alice", 5000.0)  # the expired pairs go as new ones come
    assert len(known) == 1


# --- a real broker under a flood ------------------------------------------------------------

SLOW = "victim"  # a user whose hash has bcrypt cost 12: each wrong guess is a slow check


@pytest.fixture(scope="module")
def flood_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flood") / "users.json"
    add_user(path, "alice", "secret", cost=4)
    add_user(path, "bob", "hunter2", cost=4)
    add_user(path, SLOW, "right", cost=12)
    return path


@pytest.fixture
def flood_broker(flood_users: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(users: UserStore | None = None, **overrides: Any) -> Broker:
        config = replace(BrokerConfig(port=0, users_path=flood_users, data_dir=None), **overrides)
        broker = Broker(config, users=users or UserStore.load(flood_users))
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        # Not waiting for the closes: a Listener whose register is still queued for a check
        # finishes only once answered (see `RegisterAbandoned`).
        broker.stop(drain=0)


@pytest.fixture
def dial_from() -> Iterator[Callable[[Broker, str], WireClient]]:
    """A WireClient whose connection comes from the loopback address `source` (127.0.0.0/8
    is all local on Linux): the broker sees a different peer address per source."""
    made: list[WireClient] = []

    def make(broker: Broker, source: str) -> WireClient:
        assert broker.address is not None
        client = WireClient(broker.address, timeout=5.0)
        client.sock.close()
        client.sock = socket.create_connection(broker.address, 5.0, source_address=(source, 0))
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def taken(conn: ConnHandle, count: int) -> list[Any]:
    """What `conn`'s recorder was told, once it holds at least `count` messages."""
    got: list[Any] = []

    def enough() -> bool:
        got.extend(conn.ref.ask(_Take(), timeout=10))
        return len(got) >= count

    wait_for(enough, timeout=20)
    return got


def metrics(broker: Broker) -> dict[str, int]:
    return cast("dict[str, int]", broker._refs["supervisor"].ask(GetMetrics(), timeout=10))


def flood(
    broker: Broker, dial_from: Callable[[Broker, str], WireClient], source: str, count: int
) -> list[WireClient]:
    """`count` connections from `source`, each with one wrong-password register queued."""
    clients = []
    for n in range(count):
        client = dial_from(broker, source)
        client.send(Register(req=1, client_id=f"flood-{n}", username=SLOW, password="wrong"))
        clients.append(client)
    return clients


def login(client: WireClient, client_id: str, req: int = 1, **extra: Any) -> object:
    client.send(
        Register(req=req, client_id=client_id, username="alice", password="secret", **extra)
    )
    return client.recv(timeout=10)


def test_a_resume_during_a_flood_is_answered_while_checks_wait(
    flood_broker: Callable[..., Broker], dial_from: Callable[[Broker, str], WireClient]
) -> None:
    broker = flood_broker()
    first = dial_from(broker, "127.0.0.1")
    reg = registered(login(first, "dev"))
    first.close()
    flood(broker, dial_from, "127.0.0.2", 12)
    wait_for(lambda: metrics(broker)["auth_queue_length"] >= 10)
    back = dial_from(broker, "127.0.0.3")
    back.send(resume_frame(1, "dev", reg))
    assert registered(back.recv(timeout=10)).resumed is True
    assert metrics(broker)["auth_queue_length"] >= 8  # it never waited behind them


def test_a_known_device_is_served_before_strangers_even_from_its_own_address(
    flood_broker: Callable[..., Broker], dial_from: Callable[[Broker, str], WireClient]
) -> None:
    broker = flood_broker()
    device = dial_from(broker, "127.0.0.4")
    registered(login(device, "k-1"))  # the pair (127.0.0.4, alice) is now a known device
    flood(broker, dial_from, "127.0.0.2", 6)
    flood(broker, dial_from, "127.0.0.4", 6)  # strangers behind the device's own address
    wait_for(lambda: metrics(broker)["auth_queue_length"] >= 10)
    again = dial_from(broker, "127.0.0.4")
    # Round robin alone would serve it after the 5 or 6 checks ahead of it from its address.
    assert registered(login(again, "k-2")).req == 1
    assert metrics(broker)["auth_queue_length"] >= 9


def test_a_stranger_from_another_address_waits_for_one_turn_not_the_flood(
    flood_broker: Callable[..., Broker], dial_from: Callable[[Broker, str], WireClient]
) -> None:
    broker = flood_broker()
    flood(broker, dial_from, "127.0.0.2", 12)
    wait_for(lambda: metrics(broker)["auth_queue_length"] >= 10)
    stranger = dial_from(broker, "127.0.0.5")  # never logged in from there
    assert registered(login(stranger, "s-1")).req == 1
    # Served after at most the check under way and one more of the flooder's.
    assert metrics(broker)["auth_queue_length"] >= 8


def test_a_correct_password_from_a_blocked_address_logs_in_with_its_checks_queued(
    flood_broker: Callable[..., Broker], dial_from: Callable[[Broker, str], WireClient]
) -> None:
    broker = flood_broker(auth_fail_limit=2, auth_fail_penalty=0.05)
    guesser = dial_from(broker, "127.0.0.6")
    for req in (1, 2):
        guesser.send(Register(req=req, client_id="g", username="alice", password="bad"))
        assert_error(guesser.recv(timeout=10), "auth_failed", req)
    guesser.send(Register(req=3, client_id="g", username="alice", password="bad"))
    verdict = guesser.recv(timeout=10)
    assert_error(verdict, "rate_limited", 3)  # past the limit: slowed
    assert cast("Error", verdict).retry_after is None  # a verdict on the password: no retry
    flood(broker, dial_from, "127.0.0.6", 6)  # more checks under way than it used to be allowed
    wait_for(lambda: metrics(broker)["auth_queue_length"] >= 4)
    device = dial_from(broker, "127.0.0.6")
    # Checked in its turn (no longer refused outright past 2 checks under way) and logged in.
    assert registered(login(device, "d-1")).req == 1


def test_a_full_queue_answers_rate_limited_at_once_and_without_a_check(
    flood_broker: Callable[..., Broker], dial_from: Callable[[Broker, str], WireClient]
) -> None:
    broker = flood_broker(auth_queue=3)
    clients = flood(broker, dial_from, "127.0.0.2", 10)
    # One check under way and three waiting: the others (six, unless a check ended before
    # they all came) were refused on arrival, and none of them cost a check.
    answers = [cast("Error", client.recv(timeout=20)) for client in clients]
    codes = [answer.code for answer in answers]
    refused = codes.count("rate_limited")
    assert refused >= 1 and codes.count("auth_failed") == 10 - refused
    # Refused unchecked: "try again in a second", which a refused password never says.
    assert {a.retry_after for a in answers if a.code == "rate_limited"} == {1}
    assert {a.retry_after for a in answers if a.code == "auth_failed"} == {None}
    seen = metrics(broker)
    assert seen["auth_queue_refused"] == seen["registrations_rate_limited"] == refused
    assert (seen["password_checks"], seen["auth_queue_length"]) == (10 - refused, 0)
    # A correct password from another address still gets in (the flooder's newest check
    # makes room for it if the queue is still full).
    newcomer = dial_from(broker, "127.0.0.7")
    assert registered(login(newcomer, "n-1")).req == 1


def test_a_client_id_outside_the_users_prefixes_is_not_authorized_before_any_check(
    flood_broker: Callable[..., Broker],
    dial_from: Callable[[Broker, str], WireClient],
    tmp_path: Path,
) -> None:
    path = tmp_path / "users.json"
    add_user(path, "alice", "secret", cost=4, client_id_prefixes=["sensor-", "cam-"])
    add_user(path, "bob", "hunter2", cost=4)
    broker = flood_broker(users=UserStore.load(path))
    client = dial_from(broker, "127.0.0.1")
    error = assert_error(login(client, "bob-squat", req=1), "not_authorized", 1)
    assert "bob-squat" in error.message
    assert metrics(broker)["password_checks"] == 0
    reg = registered(login(client, "sensor-1", req=2))
    # bob has no prefixes: any id but those alice's prefixes reserve (no squatting).
    other = dial_from(broker, "127.0.0.1")
    other.send(Register(req=1, client_id="cam-9", username="bob", password="hunter2"))
    assert_error(other.recv(timeout=10), "not_authorized", 1)
    other.send(Register(req=2, client_id="bob-1", username="bob", password="hunter2"))
    registered(other.recv(timeout=10))
    # A resume is checked too (before the session is looked up).
    back = dial_from(broker, "127.0.0.1")
    back.send(
        Register(
            req=3,
            client_id="bob-squat",
            username="alice",
            session_id=reg.session_id,
            resume_token=reg.resume_token,
        )
    )
    assert_error(back.recv(timeout=10), "not_authorized", 3)
    # An unknown user is never told apart: auth_failed after a check, as any wrong password.
    back.send(Register(req=4, client_id="x", username="nobody", password="pw"))
    assert_error(back.recv(timeout=10), "auth_failed", 4)
    seen = metrics(broker)
    assert seen["client_id_refused"] == 3
    assert seen["password_checks"] == 3


def test_a_check_whose_connection_closed_while_queued_is_dropped_unmade(
    flood_users: Path,
) -> None:
    """`RegisterAbandoned` (from a Listener whose connection closed while registering) takes
    the check out of the queue; the Listener is answered, so it can finish."""
    fleet = Fleet()  # its recorders stand in for the SessionManager and the Listeners
    supervisor = BrokerSupervisor.start(
        fleet.loop,
        fleet.ident,
        users=UserStore.load(flood_users),
        session_manager=fleet.subscribers,
        auth_workers=1,
        limiter=FailureLimiter(limit=5, window=60),
        auth_queue=10,
    )
    fleet.refs.append(supervisor)
    try:
        conns: list[ConnHandle] = []
        for n in range(4):
            conn = fleet.connect()
            conns.append(conn)
            frame = Register(req=n, client_id=f"c{n}", username=SLOW, password="wrong")
            supervisor.tell(RegisterRequest(frame, conn))
        last = conns[-1]
        supervisor.tell(RegisterAbandoned(last.conn_id, last.peer))
        [dropped] = taken(last, 1)
        assert isinstance(dropped, RegisterRejected) and dropped.code is ErrorCode.RATE_LIMITED
        # The other three are each checked and answered auth_failed.
        for conn in conns[:3]:
            [answer] = taken(conn, 1)
            assert isinstance(answer, RegisterRejected) and answer.code is ErrorCode.AUTH_FAILED
        assert taken(last, 0) == []
        seen = cast("dict[str, int]", supervisor.ask(GetMetrics(), timeout=10))
        assert seen["password_checks"] == 3
    finally:
        fleet.stop()


def test_the_new_figures_are_exported_to_prometheus(
    flood_broker: Callable[..., Broker], dial_from: Callable[[Broker, str], WireClient]
) -> None:
    broker = flood_broker(auth_queue=1)
    flood(broker, dial_from, "127.0.0.2", 3)  # one checked, one waiting, one refused at least
    wait_for(lambda: metrics(broker)["auth_queue_refused"] >= 1)
    figures: dict[str, float] = {}
    for name in ("supervisor", "sessions"):
        figures.update(cast("dict[str, float]", broker._refs[name].ask(GetMetrics(), timeout=10)))
    text = BrokerMetrics(lambda: figures, durable=False).render().decode()
    refused = float(figures["auth_queue_refused"])
    assert refused >= 1 and f"tether_auth_queue_refused_total {refused}" in text
    for line in (
        "# TYPE tether_auth_queue_length gauge",
        "# TYPE tether_auth_queue_refused_total counter",
        "tether_client_id_refused_total 0.0",
        "tether_sessions_quota_refused_total 0.0",
    ):
        assert line in text
