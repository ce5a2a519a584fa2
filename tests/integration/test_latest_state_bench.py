"""bench/latest_state.py at a tiny size: the same code, 20 nodes of 250 series.

The bench's figures (memory per series, batch and scrape times, beside prometheus_client)
are only worth what its plumbing is: both sides held every series of every node, the scrape
was taken in the collector's own steps and pieces and its body holds every series, the
settled batches really were settled (named by a table the state had resolved), the timings
are real measurements, and the printed table says what the JSON summary says.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from typing import Any

import pytest

import wire
from bench.latest_state import body_samples, identities, template
from collector.app import RENDER_STEP, SCRAPE_STEP
from tests.conftest import REPO
from tests.integration.harness import ENV

NODES, SERIES, BATCHES = 20, 250, 2
TOTAL = NODES * SERIES

pytestmark = pytest.mark.timeout(120)


def run_bench(*args: str) -> tuple[str, list[dict[str, Any]]]:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "latest_state.py"), *args],
                       env=ENV, capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = [json.loads(line.split(":", 1)[1]) for line in r.stdout.splitlines() if line.startswith("summary: ")]
    return r.stdout, summaries


def report_line(out: str, title: str) -> list[str]:
    """The two columns (waystation, prometheus_client) of a table line."""
    found = re.search(rf"^  {re.escape(title)} +(.+?)$", out, re.MULTILINE)
    assert found, f"no line {title!r} in:\n{out}"
    return re.split(r" {2,}", found.group(1).strip())


def test_a_small_fleet_is_held_whole_by_both_sides_and_its_figures_are_real() -> None:
    out, summaries = run_bench("--nodes", str(NODES), "--series", str(SERIES), "--batches", str(BATCHES))
    assert len(summaries) == 1, out
    s = summaries[0]
    assert (s["nodes"], s["series"], s["batches"]) == (NODES, SERIES, BATCHES)
    assert 55 <= s["metric_names"] <= 70  # an agent's ~60 families
    ws, pc = s["waystation"], s["prometheus_client"]
    for side in (ws, pc):
        # Every series of every node held, and on the scrape body exactly once.
        assert side["state_series"] == TOTAL, out
        assert side["scrape"]["body_series"] == TOTAL, out
        # A line: name, instance, job, site, node and the series' own labels, then the value.
        assert side["scrape"]["body_bytes"] > 80 * TOTAL
        # Memory: the state's own growth, per series: something, and not the whole process.
        assert 0 < side["rss_per_series"] < 20_000, out
        assert side["rss_growth_bytes"] < side["rss_end_bytes"]
        for batch in ("first_batch", "settled_batch"):
            assert 0 < side[batch]["mean_ms"] <= side[batch]["max_ms"] < 10_000
        assert side["gc_ms"] > 0 and side["gc_empty_ms"] > 0
        assert isinstance(side["gc_full_runs_during_batches"], int) and side["gc_full_runs_during_batches"] >= 0
    # The scrape in collector.app's steps (whole nodes, about SCRAPE_STEP series each) and
    # pieces (RENDER_STEP lines each); what an ack can wait behind is the longest of them.
    scrape = ws["scrape"]
    assert scrape["steps"] == math.ceil(NODES / math.ceil(SCRAPE_STEP / SERIES))
    assert scrape["pieces"] == math.ceil(TOTAL / RENDER_STEP) > 1
    assert scrape["longest_step_ms"] > 0 and scrape["text_ms"] > 0 and scrape["longest_piece_ms"] > 0
    assert scrape["longest_hold_ms"] == max(scrape["longest_step_ms"], scrape["text_ms"], scrape["longest_piece_ms"])
    assert scrape["longest_hold_ms"] < scrape["total_ms"]
    assert pc["scrape"]["longest_hold_ms"] == pc["scrape"]["total_ms"] > 0  # generate_latest: one piece
    # Settled batches name the table the state resolved on the first: array operations only,
    # many times cheaper than a first batch (a new table each batch would cost as much).
    assert ws["settled_batch"]["mean_ms"] < ws["first_batch"]["mean_ms"] / 3, out
    # The printed table says what the summary says.
    assert report_line(out, "series held") == [f"{TOTAL:,}", f"{TOTAL:,}"]
    assert report_line(out, "RSS per series after the first batches") == [
        f"{ws['rss_per_series']:,.0f} B", f"{pc['rss_per_series']:,.0f} B"]
    assert report_line(out, "scrape: pieces, longest") == [
        f"{scrape['pieces']}, {scrape['longest_piece_ms']:.1f} ms", "1 (generate_latest)"]
    assert report_line(out, "scrape: body") == [
        f"{scrape['body_bytes'] / 1e6:.1f} MB, {TOTAL:,} series", f"{pc['scrape']['body_bytes'] / 1e6:.1f} MB, "
        f"{TOTAL:,} series"]


def test_a_body_counts_sample_lines_not_headers() -> None:
    piece = (b"# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\n"
             b'node_load1{node="n-1",site="s-0"} 0.5 1700000000000\n'
             b'node_load1{node="n-2",site="s-0"} 0.25 1700000000000\n'
             b"# HELP node_load5 5m load average.\n# TYPE node_load5 gauge\n"
             b'node_load5{node="n-1",site="s-0"} 0.5 1700000000000\n')
    assert body_samples(piece) == 3
    assert body_samples(piece[piece.index(b"node_load1{"):]) == 3
    assert body_samples(b"") == 0


def test_a_node_has_the_series_asked_for_each_its_own_with_its_instance() -> None:
    shape = template(SERIES)
    mine, theirs = identities(shape, "node-00001"), identities(shape, "node-00002")
    assert len(mine) == SERIES == len({(name, labels) for name, labels, _ in mine})
    assert {mtype for _, _, mtype in mine} == {wire.MetricType.COUNTER, wire.MetricType.GAUGE}
    assert all(("instance", "node-00001.dc1.example:9100") in labels and labels == tuple(sorted(labels))
               for _, labels, _ in mine)
    assert not {(n, labels) for n, labels, _ in mine} & {(n, labels) for n, labels, _ in theirs}

