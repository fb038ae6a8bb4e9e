"""`scripts/bench`: run the load tests and report them.

    scripts/bench [--quick] [--out DIR] [SCENARIO ...]
    scripts/bench --tls [--quick] [throughput] [latency]        (issue 13: over TLS)
    scripts/bench attacks [--small] [--out DIR] [ATTACK ...]   (issue 12: bench/attacks/)

Scenarios: throughput, fan-out, fan-in, connections, drain, storm, latency, burst, restart,
offline-fleet, http, api-sessions, permissions (all by default). Brokers are durable (SQLite,
`--sync full`, a data directory each in a temporary directory); throughput, fan-out, fan-in,
drain and latency are measured on an `--in-memory` broker too, in the same run. `http` runs
throughput and latency again, without the HTTP endpoint and with it on and scraped every
second, interleaved; `api-sessions` times `GET /api/sessions?limit=100` with 10,000 sessions;
`permissions` runs throughput with the bench user restricted by topic patterns and without.
`--tls` runs throughput and latency in plaintext and over TLS, back to back, on each server
(durable, in-memory, the relay), and what TLS costs (bench/scenarios_tls.py).
Exit status: 0 when every check held (a missed target is a MISS in the table, not a failure,
unless --strict), 1 when anything was lost, duplicated, reordered or failed to run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.harness import BENCH_COST
from bench.report import (
    Console,
    ScenarioResult,
    header,
    machine,
    now_iso,
    result_dict,
    summary,
    table,
    write_json,
)
from bench.scenarios import FULL, QUICK, SCENARIOS, Sizes, run_scenario

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Tether load tests (each against its own broker).",
        epilog="scripts/bench attacks [--help]: the attack suite (hostile clients, issue 12)",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which to run (default: all): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: all in under 2 min")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results directory (default: bench/results)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 2 when a target is missed (checks all held)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="throughput and latency over TLS, beside plaintext in the same run",
    )
    args = parser.parse_args(argv)
    if args.tls:
        from bench.scenarios_tls import TLS_SCENARIOS

        unknown = [s for s in args.scenarios if s not in TLS_SCENARIOS]
        if unknown:
            parser.error(f"--tls runs {' and '.join(TLS_SCENARIOS)} only, not {', '.join(unknown)}")
        return args
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["attacks"]:
        from bench.attacks.runner import main as attacks

        return attacks(argv[1:])
    args = parse_args(argv)
    registry = SCENARIOS
    if args.tls:
        from bench.scenarios_tls import TLS_SCENARIOS

        registry = TLS_SCENARIOS
    names = args.scenarios or list(registry)
    sizes = QUICK if args.quick else FULL
    console = Console()
    info = machine()
    date = now_iso()
    print(header(info, date, args.quick, BENCH_COST), flush=True)
    if args.tls:
        print(
            "TLS: each server plaintext then TLS (a bench CA, EC P-256 certificate, the ssl"
            " module's defaults on both ends), back to back",
            flush=True,
        )
    t0 = time.monotonic()
    results: list[ScenarioResult] = []
    for name in names:
        print(
            f"\n== {name}{' (plaintext and TLS)' if args.tls else ''}", file=sys.stderr, flush=True
        )
        try:
            res = run_scenario(name, sizes, console, registry)
        except KeyboardInterrupt:
            print("\ninterrupted: servers and generators stopped", file=sys.stderr)
            return 130
        results.append(res)
        if not res.ok:
            for line in (res.error and [f"FAILED TO RUN: {res.error}"]) or res.problems:
                print(console.paint(f"!! {name}: {line}", "1;31"), file=sys.stderr, flush=True)
    if args.tls:
        results.append(_tls_cost(results, sizes))
    wall = time.monotonic() - t0
    print()
    print(table(results, console))
    print()
    print(summary(results, console))
    if args.tls:
        from bench.scenarios_tls import tls_summary

        for line in tls_summary(results):
            print(line)
    document = {
        "date": date,
        "machine": info,
        "quick": args.quick,
        "tls": args.tls,
        "bench_user_bcrypt_cost": BENCH_COST,
        "sizes": sizes.to_dict(),
        "wall_seconds": round(wall, 1),
        "ok": all(r.ok for r in results),
        "scenarios": [result_dict(r) for r in results],
    }
    path = write_json(args.out, document)
    print(f"wall time {wall:.1f} s; figures in {path} (and latest.json)")
    if not document["ok"]:
        return 1
    if args.strict and any(r.misses for r in results):
        return 2
    return 0


def _tls_cost(results: list[ScenarioResult], sizes: Sizes) -> ScenarioResult:
    """Where TLS's time goes, with the CPU per message of this run's throughput and latency
    runs."""
    from bench.scenarios_tls import tls_cost

    ran = {r.name: r.figures for r in results if r.ok}
    t0 = time.monotonic()
    res = tls_cost(sizes, Console(quiet=True), ran.get("tls-throughput"), ran.get("tls-latency"))
    res.seconds = time.monotonic() - t0
    return res


if __name__ == "__main__":
    sys.exit(main())
