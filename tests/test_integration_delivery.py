"""Integration tests over real TCP: publish/subscribe, DLQ drain on resume, redelivery, acks,
overflow (`registered.dropped` and the `dropped` frame), seq numbering, answer ordering."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.helpers import (
    Dial,
    ack,
    delivers,
    publish_confirmed,
    recv_acking,
    registered,
    resume_frame,
    subscribe,
    wait_connected,
)
from tests.wire import WireClient
from tether.broker.server import Broker
from tether.protocol import (
    Ack,
    BrokerFrame,
    Deliver,
    Dropped,
    Error,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Registered,
    Subscribe,
    Unsubscribe,
)


@pytest.fixture
def pub(broker: Broker, dial: Dial) -> WireClient:
    client = dial(broker)
    registered(client.register("publisher"))
    return client


# --- pub/sub ----------------------------------------------------------------------------------


def test_publish_reaches_every_subscriber_with_its_own_seq(
    broker: Broker, dial: Dial, pub: WireClient
) -> None:
    early = dial(broker)
    registered(early.register("early"))
    subscribe(early, "news")
    publish_confirmed(pub, "news", [b"one"])
    assert early.recv() == Deliver(topic="news", seq=1, payload=b"one")

    late = dial(broker)
    registered(late.register("late"))
    subscribe(late, "news")
    binary = bytes(range(256))
    publish_confirmed(pub, "news", [binary, b""])
    assert early.recv_many(2) == [
        Deliver(topic="news", seq=2, payload=binary),
        Deliver(topic="news", seq=3, payload=b""),
    ]
    # Seq is per session and subscription: the late subscriber starts at 1.
    assert late.recv_many(2) == [
        Deliver(topic="news", seq=1, payload=binary),
        Deliver(topic="news", seq=2, payload=b""),
    ]
    # Exact-match topics: nothing from other topics, not even similar names.
    publish_confirmed(pub, "news/sub", [b"x"])
    publish_confirmed(pub, "new", [b"x"])
    assert early.sync() == []
    assert late.sync() == []


def test_seq_is_per_topic(broker: Broker, dial: Dial, pub: WireClient) -> None:
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "a")
    subscribe(sub, "b")
    pub.send(Publish(topic="a", payload=b"a1"), Publish(topic="b", payload=b"b1"))
    publish_confirmed(pub, "a", [b"a2"])
    got = delivers(sub.recv_many(3))
    assert sorted((d.topic, d.seq, d.payload) for d in got) == [
        ("a", 1, b"a1"),
        ("a", 2, b"a2"),
        ("b", 1, b"b1"),
    ]
    # Per topic, in publish order.
    assert [d.seq for d in got if d.topic == "a"] == [1, 2]


def test_publisher_receives_its_own_messages_when_subscribed(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("loop"))
    subscribe(client, "echo")
    client.send(Publish(topic="echo", payload=b"me", req=5))
    frames = client.recv_many(2)
    assert Ok(req=5) in frames
    assert Deliver(topic="echo", seq=1, payload=b"me") in frames


def test_publisher_confirm(broker: Broker, dial: Dial, pub: WireClient) -> None:
    # No subscriber at all: still confirmed.
    pub.send(Publish(topic="void", payload=b"x", req=11))
    assert pub.recv() == Ok(req=11)
    # Without req: no answer at all.
    pub.send(Publish(topic="void", payload=b"x"))
    assert pub.sync() == []
    # With a subscriber: confirmed, and delivered.
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "t")
    pub.send(Publish(topic="t", payload=b"y", req=12))
    assert pub.recv() == Ok(req=12)
    assert sub.recv() == Deliver(topic="t", seq=1, payload=b"y")


def test_subscribe_twice_changes_nothing(broker: Broker, dial: Dial, pub: WireClient) -> None:
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"1"])
    assert sub.recv() == Deliver(topic="t", seq=1, payload=b"1")
    subscribe(sub, "t")  # answered ok
    publish_confirmed(pub, "t", [b"2"])
    # Exactly one delivery, and the numbering was not restarted.
    assert sub.recv() == Deliver(topic="t", seq=2, payload=b"2")
    assert sub.sync() == []


def test_resubscribe_continues_seq(broker: Broker, dial: Dial, pub: WireClient) -> None:
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"1", b"2"])
    assert [d.seq for d in delivers(sub.recv_many(2))] == [1, 2]
    ack(sub, "t", 2)
    sub.send(Unsubscribe(req=50, topic="t"))
    assert sub.recv() == Ok(req=50)
    publish_confirmed(pub, "t", [b"missed"])  # nobody subscribed: not for us
    assert sub.sync() == []
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"3"])
    assert sub.recv() == Deliver(topic="t", seq=3, payload=b"3")
    # Unsubscribing a topic never subscribed is fine too.
    sub.send(Unsubscribe(req=51, topic="never"))
    assert sub.recv() == Ok(req=51)


# --- resume and the DLQ drain -----------------------------------------------------------------


def test_resume_drains_queue_before_live_traffic(
    broker: Broker, dial: Dial, pub: WireClient
) -> None:
    sub = dial(broker)
    reg = registered(sub.register("sub"))
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"live-1", b"live-2"])
    assert [d.seq for d in delivers(sub.recv_many(2))] == [1, 2]
    ack(sub, "t", 2)
    sub.close()
    wait_connected(broker, 1)  # only the publisher

    queued = [f"queued-{i}".encode() for i in range(25)]
    publish_confirmed(pub, "t", queued)

    back = dial(broker)
    back.send(resume_frame(1, "sub", reg))
    # Live traffic published right behind the resume request must still queue up behind.
    live = [f"live-{i}".encode() for i in range(3, 23)]
    live_req = pub.next_req()
    pub.send(
        *[Publish(topic="t", payload=p) for p in live[:-1]],
        Publish(topic="t", payload=live[-1], req=live_req),
    )
    again = registered(back.recv())
    assert again.resumed is True
    assert again.session_id == reg.session_id
    # Everything waiting when the resume took effect: the queued ones, perhaps some live ones.
    assert len(queued) <= again.queued <= len(queued) + len(live)
    assert again.dropped == 0
    got = delivers(back.recv_many(len(queued) + len(live)))
    assert [d.seq for d in got] == list(range(3, 3 + len(queued) + len(live)))
    assert [d.payload for d in got] == queued + live
    assert not any(d.redelivered for d in got)
    assert pub.recv() == Ok(req=live_req)
    assert back.sync() == []


def test_unacked_deliveries_are_redelivered_first(
    broker: Broker, dial: Dial, pub: WireClient
) -> None:
    sub = dial(broker)
    reg = registered(sub.register("sub"))
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"m1", b"m2", b"m3", b"m4", b"m5"])
    assert [d.seq for d in delivers(sub.recv_many(5))] == [1, 2, 3, 4, 5]
    ack(sub, "t", 2)  # cumulative: 1 and 2 are done
    sub.close()
    wait_connected(broker, 1)
    publish_confirmed(pub, "t", [b"m6", b"m7"])

    back = dial(broker)
    back.send(resume_frame(1, "sub", reg))
    again = registered(back.recv())
    assert again.resumed is True
    assert again.queued == 5  # 3 unacked + 2 new
    assert back.recv_many(5) == [
        Deliver(topic="t", seq=3, payload=b"m3", redelivered=True),
        Deliver(topic="t", seq=4, payload=b"m4", redelivered=True),
        Deliver(topic="t", seq=5, payload=b"m5", redelivered=True),
        Deliver(topic="t", seq=6, payload=b"m6"),
        Deliver(topic="t", seq=7, payload=b"m7"),
    ]
    publish_confirmed(pub, "t", [b"m8"])
    assert back.recv() == Deliver(topic="t", seq=8, payload=b"m8")
    assert back.sync() == []


def test_fully_acked_session_resumes_with_nothing_queued(
    broker: Broker, dial: Dial, pub: WireClient
) -> None:
    sub = dial(broker)
    reg = registered(sub.register("sub"))
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"a", b"b", b"c"])
    assert len(sub.recv_many(3)) == 3
    ack(sub, "t", 1)
    ack(sub, "t", 3)
    ack(sub, "t", 2)  # an old ack after a newer one changes nothing
    sub.close()
    wait_connected(broker, 1)
    back = dial(broker)
    back.send(resume_frame(1, "sub", reg))
    again = registered(back.recv())
    assert again.queued == 0
    assert back.sync() == []
    publish_confirmed(pub, "t", [b"d"])
    assert back.recv() == Deliver(topic="t", seq=4, payload=b"d")


def test_redelivery_survives_repeated_drops(broker: Broker, dial: Dial, pub: WireClient) -> None:
    sub = dial(broker)
    reg = registered(sub.register("sub"))
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"x", b"y"])
    assert len(sub.recv_many(2)) == 2
    for _ in range(2):
        sub.close()
        wait_connected(broker, 1)
        sub = dial(broker)
        sub.send(resume_frame(1, "sub", reg))
        reg = registered(sub.recv())
        assert reg.queued == 2
        assert sub.recv_many(2) == [
            Deliver(topic="t", seq=1, payload=b"x", redelivered=True),
            Deliver(topic="t", seq=2, payload=b"y", redelivered=True),
        ]
    ack(sub, "t", 2)


# --- overflow -----------------------------------------------------------------------------------


def test_queue_overflow_while_away_is_reported_on_resume(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(queue_limit=5)
    pub = dial(broker)
    registered(pub.register("publisher"))
    sub = dial(broker)
    reg = registered(sub.register("sub"))
    subscribe(sub, "t")
    sub.close()
    wait_connected(broker, 1)
    publish_confirmed(pub, "t", [f"m{i}".encode() for i in range(1, 13)])

    back = dial(broker)
    back.send(resume_frame(1, "sub", reg))
    again = registered(back.recv())
    assert again.resumed is True
    assert again.dropped == 7
    assert again.queued == 5
    got = recv_acking(back, 5)  # a window of queue_limit // 2 in flight: acks open it
    assert [(d.seq, d.payload) for d in got] == [(i, f"m{i}".encode()) for i in range(8, 13)]
    assert not any(d.redelivered for d in got)
    # Overflow while away is told in `registered`, not as a `dropped` frame.
    assert back.sync() == []

    # `dropped` counts the last absence only.
    ack(back, "t", 12)
    back.close()
    wait_connected(broker, 1)
    publish_confirmed(pub, "t", [b"m13", b"m14"])
    third = dial(broker)
    third.send(resume_frame(1, "sub", again))
    last = registered(third.recv())
    assert last.dropped == 0
    assert last.queued == 2
    assert [d.seq for d in delivers(third.recv_many(2))] == [13, 14]


def test_unacked_deliveries_count_towards_queue_limit_while_away(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(queue_limit=5)
    pub = dial(broker)
    registered(pub.register("publisher"))
    sub = dial(broker)
    reg = registered(sub.register("sub"))
    subscribe(sub, "t")
    publish_confirmed(pub, "t", [b"1", b"2"])
    assert len(sub.recv_many(2)) == 2  # the whole window (5 // 2), not acked
    sub.close()
    wait_connected(broker, 1)
    publish_confirmed(pub, "t", [b"3", b"4", b"5", b"6"])
    back = dial(broker)
    back.send(resume_frame(1, "sub", reg))
    again = registered(back.recv())
    assert again.queued == 5
    assert again.dropped == 1
    assert recv_acking(back, 5) == [
        Deliver(topic="t", seq=2, payload=b"2", redelivered=True),
        Deliver(topic="t", seq=3, payload=b"3"),
        Deliver(topic="t", seq=4, payload=b"4"),
        Deliver(topic="t", seq=5, payload=b"5"),
        Deliver(topic="t", seq=6, payload=b"6"),
    ]


def test_slow_consumer_gets_dropped_frame(start_broker: Callable[..., Broker], dial: Dial) -> None:
    limit, total = 5, 40
    window = limit // 2  # sent-but-unacked deliveries in flight at most
    broker = start_broker(queue_limit=limit, publish_wait=0.2)
    pub = dial(broker)
    registered(pub.register("publisher"))
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "t")
    # The subscriber reads but does not ack: it gets the window, then its queue fills; the
    # publisher is held back `publish_wait`, then the oldest unsent messages make room.
    for i in range(1, total + 1, 8):
        publish_confirmed(pub, "t", [f"m{j}".encode() for j in range(i, min(i + 8, total + 1))])
    first = sub.recv_many(window)
    assert [f.seq for f in first if isinstance(f, Deliver)] == list(range(1, window + 1))
    sub.send(Ack(topic="t", seq=window))
    frames: list[BrokerFrame] = []
    while not (frames and isinstance(frames[-1], Deliver) and frames[-1].seq == total):
        frames.append(sub.recv())
        if isinstance(frames[-1], Deliver):
            sub.send(Ack(topic="t", seq=frames[-1].seq))
    assert not [f for f in frames if not isinstance(f, Deliver | Dropped)], frames
    drops = [f for f in frames if isinstance(f, Dropped)]
    assert drops, "overflow while connected must be told with a `dropped` frame"
    assert all(d.topic == "t" and d.count > 0 for d in drops), drops
    seqs = [f.seq for f in frames if isinstance(f, Deliver)]
    # What arrives after the gap is the newest `limit - window` messages, in order...
    assert seqs == list(range(total - (limit - window) + 1, total + 1))
    for f in frames:
        if isinstance(f, Deliver):
            assert f.payload == f"m{f.seq}".encode()
    # ...and the drop count is exactly the gap: nothing delivered is counted as dropped.
    assert sum(d.count for d in drops) == total - window - len(seqs)
    assert frames.index(drops[0]) < frames.index(next(f for f in frames if isinstance(f, Deliver)))
    assert sub.sync() == []


def test_publisher_waits_for_a_live_subscriber_instead_of_dropping(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    # A burst far larger than the queue, to a subscriber that keeps acking: nothing is lost,
    # the publisher is simply read more slowly.
    limit, total = 10, 400
    broker = start_broker(queue_limit=limit, publish_wait=30)
    pub = dial(broker)
    registered(pub.register("publisher"))
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "t")
    pub.send(*[Publish(topic="t", payload=b"%d" % i) for i in range(1, total)],
             Publish(topic="t", payload=b"%d" % total, req=99))  # fmt: skip
    seen: list[int] = []
    while len(seen) < total:
        frame = sub.recv()
        assert isinstance(frame, Deliver), frame
        assert frame.payload == b"%d" % frame.seq
        seen.append(frame.seq)
        sub.send(Ack(topic="t", seq=frame.seq))
    assert seen == list(range(1, total + 1))
    assert pub.recv() == Ok(req=99)
    assert broker.stats()["dropped"] == 0


def test_slow_consumer_that_acks_loses_nothing(
    start_broker: Callable[..., Broker], dial: Dial
) -> None:
    broker = start_broker(queue_limit=5)
    pub = dial(broker)
    registered(pub.register("publisher"))
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "t")
    for batch in range(6):
        publish_confirmed(pub, "t", [f"{batch}-{i}".encode() for i in range(4)])
        got = recv_acking(sub, 4)
        assert [d.seq for d in got] == list(range(batch * 4 + 1, batch * 4 + 5))
        ack(sub, "t", got[-1].seq)


# --- pipelining and answer order --------------------------------------------------------------


def test_frames_pipelined_behind_register_are_answered_after_it(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    client.send(
        Register(req=1, client_id="pipe", username="alice", password="secret"),
        Subscribe(req=2, topic="p"),
        Publish(topic="p", payload=b"self", req=3),
        Ping(req=4),
    )
    first = client.recv()
    assert registered(first).req == 1
    frames = client.recv_until(lambda f: isinstance(f, Pong))
    frames += client.sync()  # the delivery may come before or after the pong
    assert [f for f in frames if not isinstance(f, Deliver)] == [Ok(req=2), Ok(req=3), Pong(req=4)]
    assert [f for f in frames if isinstance(f, Deliver)] == [
        Deliver(topic="p", seq=1, payload=b"self")
    ]


def test_frames_pipelined_behind_failed_register_are_not_registered(
    broker: Broker, dial: Dial
) -> None:
    client = dial(broker)
    client.send(
        Register(req=1, client_id="pipe", username="alice", password="wrong"),
        Subscribe(req=2, topic="p"),
        Register(req=3, client_id="pipe", username="alice", password="secret"),
        Ping(req=4),
    )
    frames = client.recv_many(4)
    assert [type(f) for f in frames] == [Error, Error, Registered, Pong]
    assert frames[0].code == "auth_failed" and frames[0].req == 1  # type: ignore[union-attr]
    assert frames[1].code == "not_registered" and frames[1].req == 2  # type: ignore[union-attr]
    assert frames[2].req == 3  # type: ignore[union-attr]
    assert frames[3] == Pong(req=4)


def test_answers_come_back_in_request_order(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("orderly"))
    frames = []
    expected = []
    for i in range(200):
        req = 1000 + i
        if i % 3 == 0:
            frames.append(Ping(req=req))
            expected.append(Pong(req=req))
        elif i % 3 == 1:
            frames.append(Publish(topic="o", payload=b"x" * i, req=req))
            expected.append(Ok(req=req))
        else:
            frames.append(Subscribe(req=req, topic=f"o{i}"))
            expected.append(Ok(req=req))
    client.send(*frames)
    assert client.recv_many(len(expected)) == expected
    assert client.sync() == []


def test_answers_keep_order_across_many_small_writes(broker: Broker, dial: Dial) -> None:
    client = dial(broker)
    registered(client.register("orderly"))
    for i in range(100):
        if i % 2:
            client.send(Ping(req=i))
        else:
            client.send(Publish(topic="o", payload=b"x", req=i))
    got = client.recv_many(100)
    assert got == [Pong(req=i) if i % 2 else Ok(req=i) for i in range(100)]


def test_many_subscribers_each_get_everything_in_order(
    broker: Broker, dial: Dial, pub: WireClient
) -> None:
    subs = []
    for i in range(5):
        client = dial(broker)
        registered(client.register(f"sub-{i}"))
        subscribe(client, "fan")
        subs.append(client)
    payloads = [f"{i}".encode() for i in range(300)]
    publish_confirmed(pub, "fan", payloads)
    for client in subs:
        got = delivers(client.recv_many(len(payloads)))
        assert [d.seq for d in got] == list(range(1, len(payloads) + 1))
        assert [d.payload for d in got] == payloads


def test_late_subscriber_sees_nothing_published_before(
    broker: Broker, dial: Dial, pub: WireClient
) -> None:
    publish_confirmed(pub, "t", [b"old"])
    sub = dial(broker)
    registered(sub.register("sub"))
    subscribe(sub, "t")
    assert sub.sync() == []
    publish_confirmed(pub, "t", [b"new"])
    assert sub.recv() == Deliver(topic="t", seq=1, payload=b"new")
