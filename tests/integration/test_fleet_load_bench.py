"""bench/fleet_load.py at a tiny size: the same code, a real collector, a fleet of 20 nodes.

The bench's report is what the fleet-load figures in README rest on, so its plumbing is held
here: every batch of every node acknowledged and stored, no error, latency percentiles
that are numbers in order, and a report whose lines and JSON summary say the same.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.harness import ENV

NODES, SERIES, PERIOD_S, BATCHES = 20, 200, 5, 3

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
                               "--seed", "7")
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
    # The printed lines say what the summary says.
    assert report_line(out, "errors") == "none"
    assert report_line(out, "batches acknowledged") == f"{expected}/{expected} (0 as duplicate)"
    assert report_line(out, "batches stored in the ledger (/v1/nodes)").startswith(f"{expected}/{expected};")
    assert report_line(out, "ack latency p99").startswith(f"{p99:.1f} ms   (target < 250 ms")
