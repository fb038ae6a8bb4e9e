"""The frame every attack runs in: the probe and the RSS watch running, the attack's window
marked, and the table's figures filled in from that window once it is over."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from bench.attacks.common import AttackBroker, AttackResult, RssWatch
from bench.attacks.probe import Probe, Window

MIN_WINDOW = 1.0  # seconds


class Run:
    """One attack's window (`begin()` to `end()`) and what was measured at its edges."""

    def __init__(self, broker: AttackBroker, watch: RssWatch, probe: Probe) -> None:
        self.broker = broker
        self.watch = watch
        self.probe = probe
        self.t0 = self.t1 = 0.0
        self.hwm0 = 0
        self.base_kib = 0
        self.cpu0 = self.cpu1 = 0.0
        # Where the table's probe figures start, when not at `t0` (open-files: after the flood).
        self.judge_from: float | None = None

    def begin(self) -> None:
        """The attack starts now: the baseline RSS and CPU are taken."""
        self.base_kib = self.watch.now()
        self.hwm0 = self.watch.high_water()
        self.cpu0 = self.watch.cpu()
        self.t0 = time.monotonic()

    def end(self) -> None:
        """The attack is over (its connections closed). A window shorter than `MIN_WINDOW`
        is stretched to it, so that the probe ran a few rounds in it whatever happened."""
        time.sleep(max(0.0, self.t0 + MIN_WINDOW - time.monotonic()))
        self.t1 = time.monotonic()
        self.broker.server.check_alive()
        self.cpu1 = self.watch.cpu()

    def window(self) -> Window:
        return self.probe.window(self.t0, self.t1)

    def judged(self) -> Window:
        return self.probe.window(self.judge_from or self.t0, self.t1)


@contextlib.contextmanager
def attack_run(
    res: AttackResult,
    broker: AttackBroker,
    *,
    probe_interval: float = 0.05,
    probe_timeout: float = 10.0,
    settle: float = 1.0,
) -> Iterator[Run]:
    """Yields a `Run` whose `begin()` and `end()` the attack calls around the attack itself.
    After the block, `res` has the probe's figures (from `judge_from`, if set, to the end),
    the peak RSS, the RSS `settle` seconds after the end, and the broker's CPU in the window."""
    with RssWatch(broker.pid) as watch:
        with Probe(broker.address, interval=probe_interval, timeout=probe_timeout) as probe:
            run = Run(broker, watch, probe)
            yield run
            if not run.t1:
                run.end()
        res.rss_retained_kib = watch.now() if settle <= 0 else _settled(watch, settle)
        res.rss_peak_kib = _peak(run, watch)
    res.rss_base_kib = run.base_kib
    res.cpu_s = run.cpu1 - run.cpu0
    fill_probe(res, run.judged())
    res.figures["probe"] = run.window().figures()
    res.figures["rss_kib"] = {
        "base": res.rss_base_kib,
        "peak": res.rss_peak_kib,
        "retained": res.rss_retained_kib,
        "samples": len(watch.samples),
    }


def _peak(run: Run, watch: RssWatch) -> int:
    """The broker's peak RSS in the window: the kernel's high-water mark when the attack
    raised it (no spike is missed between samples), else the highest sample (a high-water mark
    from before the attack says nothing about it)."""
    hwm = watch.high_water()
    if hwm > run.hwm0:
        return hwm
    sampled = [kib for t, kib in watch.samples if run.t0 <= t <= run.t1]
    return max([run.base_kib, *sampled])


def _settled(watch: RssWatch, seconds: float) -> int:
    time.sleep(seconds)
    return watch.now()


def fill_probe(res: AttackResult, window: Window) -> None:
    res.probe_p50_ms = window.p50_ms()
    res.probe_max_ms = window.max_ms()
    res.probe_rounds = len(window.rounds)
    res.probe_failed = window.failed
    res.resume_max_ms = window.resume_max_ms()
    if not window.rounds:
        res.problems.append("the probe ran no round during the attack")
