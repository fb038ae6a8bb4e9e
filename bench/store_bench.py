"""The SQLite store on its own, no broker: batches of N appends of 64-byte messages, submitted
as fast as they are answered, for `--sync full` and `normal`. Not run by the tests.

    .venv/bin/python -m bench.store_bench [--seconds S] [--sizes 1,10,100,1000] [--inflight K]

Shapes: `run` is one `Append` of N payloads (N publishes to one subscriber in one read);
`fan` is N `Append`s of one payload to N queues (one publish to N subscribers). Latency is
from `submit` to `on_done`: what a publisher waits for its `ok` on top of routing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import structlog

from tether.broker.store import (
    Append,
    PutSession,
    SessionRecord,
    StoreError,
    StoreOp,
    Subscribe,
    token_hash,
)
from tether.broker.store_sqlite import SqliteStore

PAYLOAD = bytes(64)


def _setup(store: SqliteStore, queues: int) -> None:
    done = threading.Event()
    record = SessionRecord("bench", "bench", "bench", 30, {}, token_hash("t"), None, 0.0, 0.0)
    batch: tuple[StoreOp, ...] = (
        PutSession(record),
        *(Subscribe("bench", f"t{i}") for i in range(queues)),
    )
    store.submit(batch, lambda error: done.set())
    done.wait()


def run(sync: str, shape: str, size: int, seconds: float, inflight: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="tether-store-bench-") as tmp:
        store = SqliteStore(Path(tmp) / "data", sync=sync)  # type: ignore[arg-type]
        queues = size if shape == "fan" else 1
        _setup(store, queues)
        next_seq = [1] * queues
        slots = threading.Semaphore(inflight)
        latencies: list[float] = []
        errors: list[StoreError] = []
        commits_before = store.commits
        batches = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            if shape == "run":
                batch: tuple[StoreOp, ...] = (
                    Append("bench", "t0", next_seq[0], (PAYLOAD,) * size),
                )
                next_seq[0] += size
            else:
                batch = tuple(
                    Append("bench", f"t{i}", next_seq[i], (PAYLOAD,)) for i in range(size)
                )
                next_seq = [n + 1 for n in next_seq]
            slots.acquire()
            submitted = time.perf_counter()

            def on_done(error: StoreError | None, submitted: float = submitted) -> None:
                latencies.append(time.perf_counter() - submitted)
                if error is not None:
                    errors.append(error)
                slots.release()

            store.submit(batch, on_done)
            batches += 1
        for _ in range(inflight):
            slots.acquire()
        elapsed = time.perf_counter() - start
        commits = store.commits - commits_before
        store.close()
    if errors:
        raise SystemExit(f"{len(errors)} batches failed: {errors[0]}")
    latencies.sort()
    return {
        "commits_s": commits / elapsed,
        "batches_per_commit": batches / max(commits, 1),
        "msgs_s": batches * size / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per row (default 2)")
    parser.add_argument("--sizes", default="1,10,100,1000", help="N, comma-separated")
    parser.add_argument("--inflight", type=int, default=4, help="batches in flight (default 4)")
    parser.add_argument("--shapes", default="run,fan")
    parser.add_argument("--syncs", default="full,normal")
    args = parser.parse_args()
    # The store's own lines (opened, closed) would break up the table; faults still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(
        f"{'sync':<7}{'shape':<6}{'N':>6}{'commits/s':>11}{'batch/commit':>14}"
        f"{'msgs/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
    )
    for sync in args.syncs.split(","):
        for shape in args.shapes.split(","):
            for size in (int(n) for n in args.sizes.split(",")):
                r = run(sync, shape, size, args.seconds, args.inflight)
                print(
                    f"{sync:<7}{shape:<6}{size:>6}{r['commits_s']:>11,.0f}"
                    f"{r['batches_per_commit']:>14.1f}{r['msgs_s']:>11,.0f}"
                    f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
