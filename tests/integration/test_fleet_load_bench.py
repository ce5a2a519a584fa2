"""bench/fleet_load.py at a tiny size: the same code, a real collector, a fleet of 20 nodes.

The bench's report is what the fleet-load figures in README rest on, so its plumbing is held
here: every batch of every node acknowledged and stored, no error, latency percentiles
that are numbers in order, /metrics scraped all along the run and its body holding every
node's series, and a report whose lines and JSON summary say the same.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from typing import Any

import pytest

from bench.fleet_load import overlaps_scrape, read_body
from tests.conftest import REPO
from tests.integration.harness import ENV

NODES, SERIES, PERIOD_S, BATCHES = 20, 200, 5, 3
SCRAPE_INTERVAL_S = 1

pytestmark = pytest.mark.timeout(240)


def run_bench(*args: str) -> tuple[str, list[dict[str, Any]]]:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "fleet_load.py"), *args],
                       env=ENV, capture_output=True, text=True, timeout=200, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = [json.loads(line.split(":", 1)[1]) for line in r.stdout.splitlines() if line.startswith("summary: ")]
    return r.stdout, summaries


def report_line(out: str, title: str) -> str:
    found = re.search(rf"^  {re.escape(title)} +(.+)$", out, re.MULTILINE)
    assert found, f"no line {title!r} in:\n{out}"
    return found.group(1)


def test_a_small_fleet_is_acknowledged_and_stored_whole_with_no_errors() -> None:
    out, summaries = run_bench("--nodes", str(NODES), "--series", str(SERIES), "--period", str(PERIOD_S),
                               "--minutes", str(BATCHES * PERIOD_S / 60), "--senders", "4", "--profiles", "3",
                               "--seed", "7", "--scrape-interval", str(SCRAPE_INTERVAL_S))
    assert len(summaries) == 1, out
    s = summaries[0]
    expected = NODES * BATCHES
    assert (s["nodes"], s["series"], s["batches_per_node"], s["expected"]) == (NODES, SERIES, BATCHES, expected)
    assert s["errors"] == {}, out
    assert s["acked"] == expected and s["stored"] == expected, out
    assert s["nodes_complete"] == NODES, out
    assert s["ok"] is True
    # Latencies are real measurements: positive, ordered, and well under a request timeout.
    p50, p99, top = s["p50_ms"], s["p99_ms"], s["max_ms"]
    assert isinstance(p50, float) and isinstance(p99, float) and isinstance(top, float)
    assert 0 < p50 <= p99 <= top < 30_000
    assert s["collector_rss_peak"] >= s["collector_rss_end"] > 10_000_000
    assert s["collector_cpu_s"] > 0 and s["sender_cpu_s"] > 0
    # Every node's table was stored once, and the ledger grew with the batches after it.
    assert s["ledger_start"] < s["ledger_after_first"] <= s["ledger_end"]
    assert s["ledger_growth_per_day"] > 0 and math.isfinite(s["ledger_growth_per_day"])
    parts = s["ledger_parts"]
    assert isinstance(parts, dict) and parts["batches"] > 0 and parts["series tables"] > 0
    assert s["batch_growth_per_day"] > 0 and s["table_bytes_per_node"] > 0
    # /metrics was scraped a tick at a time through the run (about 15 ticks), never failed,
    # and its last body held every series of every node, as the collector itself counts them.
    assert s["scrape_errors"] == {}, out
    assert BATCHES * PERIOD_S / SCRAPE_INTERVAL_S / 2 <= s["scrapes"] <= s["load_wall_s"] / SCRAPE_INTERVAL_S + 1, out
    assert 0 < s["scrape_p50_ms"] <= s["scrape_max_ms"] < 10_000
    assert s["scrape_fleet_series"] == s["scrape_fleet_series_reported"] == NODES * SERIES, out
    assert s["scrape_samples"] > s["scrape_fleet_series"]  # the collector's own families follow
    assert s["scrape_body_bytes"] > 50 * NODES * SERIES  # a fleet line: name, labels, site, node, value, time
    assert 0 <= s["acks_during_scrape"] <= expected
    # The printed lines say what the summary says.
    assert report_line(out, "errors") == "none"
    assert report_line(out, "batches acknowledged") == f"{expected}/{expected} (0 as duplicate)"
    assert report_line(out, "batches stored in the ledger (/v1/nodes)").startswith(f"{expected}/{expected};")
    assert report_line(out, "ack latency p99").startswith(f"{p99:.1f} ms   (target < 250 ms")
    assert report_line(out, "scrapes of /metrics").startswith(f"{s['scrapes']} (every {SCRAPE_INTERVAL_S} s, ")
    assert f": {NODES * SERIES:,} fleet series (waystation_exposition_fleet_series {NODES * SERIES:,})" \
        in report_line(out, "last scrape body")
    assert report_line(out, "scrape errors") == "none"


def test_a_scrape_body_counts_fleet_series_by_their_timestamps_and_reads_the_collectors_count() -> None:
    body = (b'# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\n'
            b'node_load1{modelName="H100 80GB} 1 2",node="node-1",site="site-0"} 0.5 1700000000000\n'
            b'node_load1{node="node-2",site="site-0"} NaN 1700000000001\n'
            b'# HELP waystation_exposition_fleet_series Fleet series exposed, all nodes together.\n'
            b'# TYPE waystation_exposition_fleet_series gauge\n'
            b'waystation_exposition_fleet_series 2.0\n'
            b'waystation_node_highest_seq{node="node-1",site="site-0"} 3.0\n')
    read = read_body(body)
    assert (read.size, read.samples, read.fleet_series, read.fleet_series_reported) == (len(body), 4, 2, 2)
    assert read_body(b"process_cpu_seconds_total 1.5\n").fleet_series_reported is None


def test_an_ack_counts_as_during_a_scrape_when_its_request_meets_one() -> None:
    windows = [(1.0, 1.5), (2.0, 2.2)]
    assert [overlaps_scrape(windows, a, b) for a, b in ((0.0, 0.9), (0.9, 1.1), (1.6, 1.9), (1.9, 2.5),
                                                         (2.1, 2.15), (2.3, 9.0), (0.0, 9.0))] == \
        [False, True, False, True, True, False, True]
    assert not overlaps_scrape([], 0.0, 1.0)
