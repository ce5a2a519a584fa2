"""bench/collector_ingest.py --scaling at a CI size: 3 nodes x 3 batches x 100 series.

The scaling table (1 core with workers 0 and 1, 2 cores with workers 1, all cores where
there are more) is only worth what its runs are: each collector accepted every batch, ran
where the table says it ran (taskset's mask, read back from its processes), counted its
fronts where it had them, and every figure is a measurement (a positive number).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.collector_ingest import cpu_list
from tests.conftest import REPO
from tests.integration.harness import ENV

NODES, BATCHES, SERIES = 3, 3, 100
N_BATCHES = NODES * BATCHES

pytestmark = pytest.mark.timeout(150)


def table_row(out: str, title: str) -> list[str]:
    """The cells of a table line after its title (cells are at least two spaces apart)."""
    found = re.search(rf"^{re.escape(title)} {{2,}}(.+?)$", out, re.MULTILINE)
    assert found, f"no line {title!r} in:\n{out}"
    return re.split(r" {2,}", found.group(1).strip())


def number(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix("x"))


def test_scaling_runs_every_batch_on_the_cores_it_names_and_prints_measured_figures() -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "collector_ingest.py"), "--nodes", str(NODES),
                        "--batches", str(BATCHES), "--series", str(SERIES), "--points", "1", "--senders", "2",
                        "--scaling", "--no-forwarding"],
                       env=ENV, capture_output=True, text=True, timeout=140, check=False)
    out = r.stdout
    diagnosis = out[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, diagnosis
    # The plain run and its table are still there.
    assert f"  no remote_write: accepted {N_BATCHES}/{N_BATCHES} batches" in out, diagnosis
    assert number(table_row(out, "collector: samples / collector CPU second (per core)")[0]) > 0

    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        assert "scaling cannot be measured" in out, diagnosis
        return
    plan = [("1 core, workers 0", usable[:1], "serve"), ("1 core, workers 1", usable[:1], "serve + 1 front"),
            ("2 cores, workers 1", usable[:2], "serve + 1 front")]
    if len(usable) > 2:
        plan.append((f"{len(usable)} cores, workers {len(usable) - 1}", usable,
                     f"serve + {len(usable) - 1} fronts"))

    assert "\nscaling: " in out, diagnosis
    scaling = out.split("\nscaling: ", 1)[1]
    assert "not pinned" in scaling  # the reader is told the senders share the collector's cores
    for label, _, _ in plan:
        assert f"  {label}: accepted {N_BATCHES}/{N_BATCHES} batches" in scaling, diagnosis

    assert table_row(scaling, "measure") == [label for label, _, _ in plan], scaling
    assert table_row(scaling, "collector ran on CPUs") == [cpu_list(cpus) for _, cpus, _ in plan], scaling
    assert table_row(scaling, "collector processes") == [procs for _, _, procs in plan], scaling
    for title in ("samples / collector CPU second", "samples / wall second", "collector processes' CPU seconds"):
        cells = table_row(scaling, title)
        assert len(cells) == len(plan), scaling
        assert all(number(c) > 0 for c in cells), (title, cells)
    relative = table_row(scaling, f"wall throughput vs {plan[0][0]}")
    assert relative[0] == "1.00x" and len(relative) == len(plan), scaling
    assert all(c.endswith("x") and number(c) > 0 for c in relative), relative
    # The figures agree: samples per CPU second is every run's samples over its CPU seconds
    # (those printed to two decimals).
    total = N_BATCHES * SERIES
    for per_cpu, cpu_s in zip(table_row(scaling, "samples / collector CPU second"),
                              table_row(scaling, "collector processes' CPU seconds"), strict=True):
        assert abs(total / number(per_cpu) - number(cpu_s)) <= 0.0051, scaling
