"""First measurements of the core: 1 publisher -> 1 subscriber throughput, and resume drain.

    .venv/bin/python -m bench.core [--messages N] [--drain N]

Each scenario starts its own broker process on loopback; the subscriber runs in its own
process so the load generator shares no GIL with the publisher. Everything received is
checked: all messages, in order, no duplicates.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from typing import Any

from bench.harness import RawClient, broker_process
from protocol import Deliver, Ok, Publish, Subscribe, encode

TOPIC = "bench/t"
PAYLOAD = b"x" * 64


def _subscriber(address: tuple[str, int], n: int, ready: Any, results: Any) -> None:
    client = RawClient(address)
    client.register("bench-sub")
    client.send(Subscribe(req=1, topic=TOPIC))
    assert isinstance(client.recv(), Ok)
    ready.set()
    expected = 1
    first = 0.0
    while expected <= n:
        frames = client.read_frames()
        if not first:
            first = time.perf_counter()
        for f in frames:
            if isinstance(f, Deliver):
                if f.seq != expected:
                    results.put({"error": f"seq {f.seq}, expected {expected}"})
                    return
                expected += 1
        client.ack(TOPIC, expected - 1)  # one cumulative ack per read
    results.put({"received": expected - 1, "end": time.perf_counter()})
    client.close()


def throughput(n: int) -> dict[str, Any]:
    with broker_process() as (host, port, _proc):
        ready = mp.Event()
        results: mp.Queue[dict[str, Any]] = mp.Queue()
        sub = mp.Process(target=_subscriber, args=((host, port), n, ready, results))
        sub.start()
        ready.wait(30)
        pub = RawClient((host, port))
        pub.register("bench-pub")
        batch = b"".join(encode(Publish(topic=TOPIC, payload=PAYLOAD)) for _ in range(1000))
        start = time.perf_counter()
        sent = 0
        while sent < n:
            pub.sock.sendall(
                batch if n - sent >= 1000 else batch[: (n - sent) * len(batch) // 1000]
            )
            sent += min(1000, n - sent)
        outcome = results.get(timeout=600)
        sub.join()
        pub.close()
    if "error" in outcome:
        raise AssertionError(outcome["error"])
    elapsed = outcome["end"] - start
    return {
        "scenario": "throughput",
        "messages": n,
        "seconds": round(elapsed, 3),
        "msg_per_s": round(n / elapsed),
    }


def drain(n: int) -> dict[str, Any]:
    with broker_process() as (host, port, _proc):
        sub = RawClient((host, port))
        reg = sub.register("bench-drain")
        sub.send(Subscribe(req=1, topic=TOPIC))
        assert isinstance(sub.recv(), Ok)
        sub.close()
        pub = RawClient((host, port))
        pub.register("bench-pub")
        pub.send(
            *[Publish(topic=TOPIC, payload=PAYLOAD) for _ in range(n - 1)],
            Publish(topic=TOPIC, payload=PAYLOAD, req=1),
        )
        assert isinstance(pub.recv(), Ok)  # every message is queued for the subscriber
        sub = RawClient((host, port))
        start = time.perf_counter()
        again = sub.register(
            "bench-drain", session_id=reg.session_id, resume_token=reg.resume_token, password=None
        )
        assert again.queued == n, again
        expected = 1
        while expected <= n:
            for f in sub.read_frames():
                assert isinstance(f, Deliver) and f.seq == expected, f
                expected += 1
        elapsed = time.perf_counter() - start
        sub.close()
        pub.close()
    return {"scenario": "drain", "messages": n, "seconds": round(elapsed, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--drain", type=int, default=10_000)
    args = parser.parse_args()
    for result in (throughput(args.messages), drain(args.drain)):
        print(json.dumps(result))


if __name__ == "__main__":
    main()
