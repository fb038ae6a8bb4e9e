"""The bench's HTTP pieces (bench/http_scrape.py and the `http` and `api-sessions` scenarios) at
a tiny size: they run, their checks hold, and the scraper reports a failing scrape as one.
tests/test_bench.py runs every scenario too; this checks what is particular to these two.
Timing is not asserted."""

from __future__ import annotations

import time
from dataclasses import replace

from bench.http_scrape import Scraper, http_broker_process
from bench.report import Console
from bench.scenarios import TINY, run_scenario

QUIET = Console(quiet=True)


def test_the_http_scenario_compares_runs_with_and_without_a_scraped_endpoint() -> None:
    res = run_scenario("http", replace(TINY, http_repeats=2, throughput=1_000), QUIET)
    assert res.error is None and res.problems == [], (res.error, res.problems)
    figures = res.figures
    assert len(figures["throughput_without"]) == len(figures["throughput_with"]) == 2
    assert len(figures["latency_p99_ms_with"]) == 2
    # Every broker with the endpoint was scraped, and no scrape failed.
    assert figures["scrapes"]["scrapes"] >= 4 and figures["scrapes"]["failures"] == 0
    # With two runs each there is a spread, so the rows with HTTP carry a verdict.
    judged = [row for row in res.rows if "scraper" in row.measure]
    assert len(judged) == 3 and all(row.verdict in ("PASS", "MISS") for row in judged)


def test_the_api_sessions_scenario_pages_through_every_session() -> None:
    res = run_scenario("api-sessions", replace(TINY, api_sessions=230, api_gets=10), QUIET)
    assert res.error is None and res.problems == [], (res.error, res.problems)
    assert res.figures["walked_all_pages"] == 230
    assert res.figures["gets"] == 10
    assert 0 < res.figures["median_ms"] <= res.figures["p99_ms"]


def test_the_scraper_counts_a_refused_scrape_as_a_failure() -> None:
    with http_broker_process(in_memory=True) as broker:
        good = Scraper(broker, interval=0.05)
        with good:
            time.sleep(0.3)
        broker.token = "not-the-token"
        bad = Scraper(broker, interval=0.05)
        with bad:
            time.sleep(0.3)
    assert good.stats.scrapes >= 2 and good.stats.failures == []
    assert bad.stats.scrapes == 0 and bad.stats.failures
    assert "401" in bad.stats.failures[0]
