"""What the bench shows and keeps: progress bars, the results table, the JSON files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

PASS, MISS, FAIL = "PASS", "MISS", "FAIL"


@dataclass
class Row:
    """One line of the table."""

    scenario: str
    measure: str
    value: str
    target: str = ""
    vs_relay: str = ""
    server_cpu: float | None = None
    gen_cpu: float | None = None
    verdict: str = ""  # PASS / MISS against the target, FAIL for broken checks
    vs_memory: str = ""  # a durable figure as a share of the in-memory broker's, same run
    vs_plain: str = ""  # a TLS figure as a share of the plaintext one, same run (--tls)


@dataclass
class ScenarioResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # lost, duplicated, reordered, ...
    error: str | None = None  # the scenario could not run to the end
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and self.error is None

    @property
    def misses(self) -> int:
        return sum(1 for r in self.rows if r.verdict == MISS)


def verdict(ok: bool) -> str:
    return PASS if ok else MISS


# --- machine and date -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "loadavg_at_start": load,
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")


# --- terminal output ----------------------------------------------------------------------------


class Console:
    """Where progress and tables go; `quiet` for tests."""

    def __init__(self, *, quiet: bool = False, err: TextIO | None = None) -> None:
        self.quiet = quiet
        self.err = err if err is not None else sys.stderr
        self.color = not quiet and sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def bar(self, label: str, total: int, unit: str = "") -> Bar:
        return Bar(label, total, unit, self.err if not self.quiet else None)

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text


class Bar:
    """A one-line progress bar redrawn in place with \\r at 10 Hz on a terminal.

    Into a file or pipe it writes a plain line every 5 s and the final state, not a stream
    of carriage returns.
    """

    WIDTH = 28

    def __init__(self, label: str, total: int, unit: str, out: TextIO | None) -> None:
        self.label = label
        self.total = max(1, total)
        self.unit = unit
        self.out = out
        self.tty = out is not None and out.isatty()
        self.start = time.monotonic()
        self.last_draw = self.start
        self.period = 0.1 if self.tty else 5.0
        self.done = 0
        self.drawn = -1  # the count last shown, so a log does not get the same line twice
        self.closed = False

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.out is not None and now - self.last_draw >= self.period:
            self.last_draw = now
            self._draw(now, final=False)

    def _draw(self, now: float, *, final: bool) -> None:
        assert self.out is not None
        frac = min(1.0, self.done / self.total)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        unit = f" {self.unit}" if self.unit else ""
        line = (
            f"  {self.label:<28} [{bar}] {frac:4.0%}  {self.done:,}/{self.total:,}{unit}"
            f"  {now - self.start:5.1f}s"
        )
        self.drawn = self.done
        if self.tty:
            self.out.write(f"\r{line} " + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None and not self.closed and (self.tty or self.drawn != self.done):
            self._draw(time.monotonic(), final=True)
        self.closed = True

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def header(info: dict[str, Any], date: str, quick: bool, bench_cost: int) -> str:
    size = "quick sizes" if quick else "full sizes"
    return (
        f"Tether bench, {date}, {size}\n"
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['implementation']}"
        f" {info['python']}, Linux {info['kernel']}; load average at start"
        f" {' '.join(str(x) for x in info['loadavg_at_start'])}\n"
        f"bench user: bcrypt cost {bench_cost} (fresh registrations hash once each);"
        " loopback only\n"
        "brokers: durable (SQLite, --sync full, a data directory each) unless marked"
        " --in-memory"
    )


def _fmt_cpu(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def table(results: list[ScenarioResult], console: Console) -> str:
    # The TLS column only where a TLS figure is: the plain run's table stays as it was.
    tls = any(row.vs_plain for res in results for row in res.rows)
    heads = (
        "scenario",
        "measure",
        "value",
        "target",
        "vs relay",
        "vs in-memory",
        *(("vs plaintext",) if tls else ()),
        "server CPU s",
        "gen CPU s",
        "result",
    )
    lines: list[tuple[str, ...]] = []
    loud: list[tuple[int, str]] = []  # (index in lines, text) for the failure lines
    for res in results:
        for row in res.rows:
            lines.append(
                (
                    row.scenario,
                    row.measure,
                    row.value,
                    row.target,
                    row.vs_relay,
                    row.vs_memory,
                    *((row.vs_plain,) if tls else ()),
                    _fmt_cpu(row.server_cpu),
                    _fmt_cpu(row.gen_cpu),
                    row.verdict,
                )
            )
        for problem in res.problems:
            loud.append((len(lines), f"{res.name}: !! {problem} !!"))
            lines.append(())
        if res.error is not None:
            loud.append((len(lines), f"{res.name}: !! FAILED TO RUN: {res.error} !!"))
            lines.append(())
    widths = [len(h) for h in heads]
    for line in lines:
        for i, cell in enumerate(line):
            widths[i] = max(widths[i], len(cell))
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    out.append(sep.join("-" * w for w in widths))
    loud_at = dict(loud)
    colors = {PASS: "32", MISS: "33", FAIL: "1;31"}
    for i, line in enumerate(lines):
        if i in loud_at:
            out.append(console.paint(loud_at[i], "1;31"))
            continue
        cells = [c.ljust(w) for c, w in zip(line, widths, strict=True)]
        if line[-1] in colors:
            cells[-1] = console.paint(cells[-1], colors[line[-1]])
        out.append(sep.join(cells).rstrip())
    return "\n".join(out)


def summary(results: list[ScenarioResult], console: Console) -> str:
    passes = sum(1 for r in results for row in r.rows if row.verdict == PASS)
    misses = sum(r.misses for r in results)
    broken = [r.name for r in results if not r.ok]
    text = f"targets: {passes} PASS, {misses} MISS"
    if broken:
        return console.paint(
            f"{text}; CHECKS FAILED in {', '.join(broken)}: see the lines marked !!", "1;31"
        )
    return f"{text}; every message arrived once and in order"


# --- files ------------------------------------------------------------------------------------


def write_json(out_dir: Path, document: dict[str, Any]) -> Path:
    """One file per run (timestamped) plus latest.json; returns the timestamped one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{stamp}.json"
    n = 1
    while path.exists():  # two runs in one second keep both files
        n += 1
        path = out_dir / f"bench-{stamp}-{n}.json"
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    path.write_text(text)
    tmp = out_dir / ".latest.json.tmp"
    tmp.write_text(text)
    tmp.replace(out_dir / "latest.json")
    return path


def result_dict(res: ScenarioResult) -> dict[str, Any]:
    return {
        "name": res.name,
        "ok": res.ok,
        "seconds": round(res.seconds, 2),
        "problems": res.problems,
        "error": res.error,
        "figures": res.figures,
        "rows": [asdict(r) for r in res.rows],
    }
