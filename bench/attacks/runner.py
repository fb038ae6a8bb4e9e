"""`scripts/bench attacks`: run the attack suite and print its table.

    scripts/bench attacks [--small] [--out DIR] [ATTACK ...]

Each attack starts its own broker (durable unless it is about memory mode), attacks it from
127.0.0.0/8 for at most 60 s, and meanwhile times a well-behaved probe client (from 127.0.0.2)
and a resume. The table gives, per attack, the probe's p50 and max, the slowest resume, the
broker's RSS (before, peak, retained after), its CPU seconds, and each of the issue's targets
with PASS or MISS. A MISS is what the attack still achieves, not a failure of the suite: the
exit status is 1 only when an attack could not run (2 with --strict when a target is missed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.attacks import (
    baseline,
    big_topics,
    bombs,
    deep_metadata,
    logins,
    nofile,
    partial_flood,
    squatting,
    stats_flood,
)
from bench.attacks.common import AttackResult
from bench.attacks.sizes import FULL, SMALL, AttackSizes
from bench.harness import BenchError
from bench.report import FAIL, MISS, PASS, Console, machine, now_iso

Attack = Callable[[AttackSizes, Console], AttackResult]

ATTACKS: dict[str, Attack] = {
    "baseline": baseline.run,  # no attack: the noise floor the others compare with
    "partial-flood": partial_flood.run,
    "metadata-bomb": bombs.run_metadata,
    "details-bomb": bombs.run_details,
    "big-topics": big_topics.run,
    "login-burst": logins.run_burst,
    "rotating-flood": logins.run_rotating,
    "stats-flood": stats_flood.run_stats,
    "many-subs": stats_flood.run_receiver,
    "open-files": nofile.run,
    "deep-metadata": deep_metadata.run,
    "squatting": squatting.run,
}

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results"


def run_attack(name: str, sizes: AttackSizes, console: Console) -> AttackResult:
    """Run one attack; a failure to run becomes a loud result, never an exception."""
    t0 = time.monotonic()
    try:
        res = ATTACKS[name](sizes, console)
    except (BenchError, OSError) as exc:
        res = AttackResult(name, "", error=f"{type(exc).__name__}: {exc}")
    res.seconds = time.monotonic() - t0
    return res


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.2f} s" if x >= 1000 else f"{x:.1f} ms"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def table(results: list[AttackResult], console: Console) -> str:
    heads = (
        "attack",
        "probe p50",
        "probe max",
        "resume max",
        "RSS MiB base/peak/kept",
        "CPU s",
        "target",
        "measured",
        "result",
    )
    lines: list[tuple[str, ...]] = []
    for res in results:
        probe = (
            _ms(res.probe_p50_ms),
            _ms(res.probe_max_ms) + (f" ({res.probe_failed} failed)" if res.probe_failed else ""),
            _ms(res.resume_max_ms),
            f"{_mib(res.rss_base_kib)}/{_mib(res.rss_peak_kib)}/{_mib(res.rss_retained_kib)}",
            "-" if res.cpu_s is None else f"{res.cpu_s:.1f}",
        )
        if not res.checks and res.ok:
            lines.append((res.name, *probe, "(no target: the probe alone)", "", ""))
        first = True
        for c in res.checks:
            lead = (res.name, *probe) if first else ("",) * 6
            lines.append((*lead, c.target, c.value, PASS if c.ok else MISS))
            first = False
        for problem in [*res.problems, *([res.error] if res.error else [])]:
            lead = (res.name, *probe) if first else ("",) * 6
            lines.append((*lead, "the attack ran", problem, FAIL))
            first = False
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(heads)]
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    out.append(sep.join("-" * w for w in widths))
    colors = {PASS: "32", MISS: "33", FAIL: "1;31"}
    for line in lines:
        cells = [c.ljust(w) for c, w in zip(line, widths, strict=True)]
        if line[-1] in colors:
            cells[-1] = console.paint(cells[-1], colors[line[-1]])
        out.append(sep.join(cells).rstrip())
    return "\n".join(out)


def markdown(results: list[AttackResult]) -> str:
    """The same table for README.md's Performance section (`--markdown`)."""
    out = [
        "| attack | probe p50 / max | resume max | RSS MiB before / peak / after | target"
        " | measured | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        probe = (
            f"{_ms(res.probe_p50_ms)} / {_ms(res.probe_max_ms)}",
            _ms(res.resume_max_ms),
            f"{_mib(res.rss_base_kib)} / {_mib(res.rss_peak_kib)} / {_mib(res.rss_retained_kib)}",
        )
        rows = [(c.target, c.value, PASS if c.ok else MISS) for c in res.checks]
        if not res.checks and res.ok:
            rows = [("(no target: the probe alone)", "", "")]
        rows += [("the attack ran", p, FAIL) for p in [*res.problems, *filter(None, [res.error])]]
        for i, (target, value, result) in enumerate(rows):
            lead = (f"`{res.name}`", *probe) if i == 0 else ("", "", "", "")
            out.append("| " + " | ".join((*lead, target, value, result)) + " |")
    return "\n".join(out)


def write_json(out_dir: Path, document: dict[str, object]) -> Path:
    """attacks-<time>.json and attacks-latest.json (the bench's own latest.json is left alone)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"attacks-{stamp}.json"
    text = json.dumps(document, indent=2) + "\n"
    path.write_text(text)
    (out_dir / "attacks-latest.json").write_text(text)
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench attacks",
        description="Hostile clients against Tether (issue 12), each against its own broker.",
    )
    parser.add_argument(
        "attacks", nargs="*", metavar="ATTACK", help=f"which (default: all): {', '.join(ATTACKS)}"
    )
    parser.add_argument("--small", action="store_true", help="the tests' sizes (seconds each)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    parser.add_argument(
        "--markdown", action="store_true", help="also print the table as markdown (README.md)"
    )
    args = parser.parse_args(argv)
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = SMALL if args.small else FULL
    console = Console()
    info = machine()
    print(
        f"Tether attack suite, {now_iso()}, {'small' if args.small else 'full'} sizes\n"
        f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}; load average"
        f" at start {' '.join(str(x) for x in info['loadavg_at_start'])}\n"
        "brokers: durable (SQLite, --sync full), default limits unless said; attackers on"
        " 127.0.0.1 and 127.1.x.y, the probe on 127.0.0.2",
        flush=True,
    )
    t0 = time.monotonic()
    results: list[AttackResult] = []
    for name in args.attacks or list(ATTACKS):
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            res = run_attack(name, sizes, console)
        except KeyboardInterrupt:
            print("\ninterrupted: brokers stopped", file=sys.stderr)
            return 130
        print(f"   {res.what} ({res.seconds:.1f} s)", file=sys.stderr, flush=True)
        results.append(res)
    wall = time.monotonic() - t0
    print()
    print(table(results, console))
    passes = sum(c.ok for r in results for c in r.checks)
    misses = sum(not c.ok for r in results for c in r.checks)
    broken = [r.name for r in results if not r.ok]
    print(
        f"\ntargets: {passes} PASS, {misses} MISS"
        + (f"; FAILED TO RUN: {', '.join(broken)}" if broken else "")
    )
    if args.markdown:
        print()
        print(markdown(results))
    document: dict[str, object] = {
        "date": now_iso(),
        "machine": info,
        "small": args.small,
        "sizes": sizes.to_dict(),
        "wall_seconds": round(wall, 1),
        "ok": not broken,
        "attacks": [asdict(r) for r in results],
    }
    path = write_json(args.out, document)
    print(f"wall time {wall:.1f} s; figures in {path}")
    if broken:
        return 1
    return 2 if args.strict and misses else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
