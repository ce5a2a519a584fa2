"""Latest state: the collector's FleetState beside prometheus_client holding the same fleet series.

The collector keeps the newest point of every fleet series (collector.exposition.FleetState:
numpy arrays per node) and shows them on /metrics. What that costs, for --nodes nodes of
--series series each, measured in one process that holds nothing else:

  - RSS per series once every node's first batch is applied (the growth of the process'
    RSS over the state alone: the batches are built first, then gc.collect, then RSS is
    read before and after applying them);
  - a node's first batch (every series new): mean and max per node; a settled batch (every
    series known, new values): mean and max per node, over --batches rounds of every node;
  - a scrape as GET /metrics takes it: `FleetState.scrape`, stepped SCRAPE_STEP series at a
    time, then `text()`, then rendered RENDER_STEP lines a piece (collector.app's steps). The
    event loop serves acks between steps and pieces, so the longest single step, `text()`
    or piece is what an ack can wait behind; the scrape's whole time and its body follow;
  - a full gc.collect() with the state held (the batches and their tables let go), beside
    one before the state was built, and the full collections the interpreter ran by itself
    while batches were applied (each a pause of about that length inside a batch).

Batches are real wire v2 batches: each node has its own key-signed chain, series table
(wire.TableBuilder, sent with the node's first batch, named by id afterwards) and columns
(wire.prepare_columns, zstd level 1), opened as the collector opens them (wire.open_batch
with a wire.MemoryTables, as_series=False) and applied with FleetState.apply_columns. The
series are an agent's: about 60 names (node_exporter CPU, memory, disk, network and
filesystem families, DCGM GPU gauges, the agent's own), labels such as cpu/mode, gpu/UUID,
device/mountpoint, a node-specific `instance`, a mix of gauges and counters, one point per
series a minute. Building and opening batches is not timed.

The reference, on the same series and values in the same run: what a plain exporter does
with the prometheus_client library. A CollectorRegistry with one Gauge per metric name
(label names: the name's own, then site and node), `.labels(...).set(value)` per series
per batch, and `generate_latest` for /metrics, which runs as one piece: all of it is one
hold of the event loop. Measured the same way: RSS per series after the first batches, a
node's batch, generate_latest, the body and the garbage collector's figures. On both sides
the input (names, label values, values) exists before the first RSS reading, so each is
charged for what it keeps over it.

Each side runs in its own child process (one after the other), so their RSS figures do not
mix. The fleet's caps are the collector's defaults, raised where the fleet is bigger.

    python bench/latest_state.py --nodes 1000 --series 1000

A quick look (a few seconds): `python bench/latest_state.py --nodes 20 --series 200`. The
last line is the figures as JSON (`summary: {...}`).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

import wire  # noqa: E402

NODES_PER_SITE = 100
T0_MS = 1_750_000_000_000
PERIOD_MS = 60_000
ARRIVAL_MS = 1_500  # how long after its point a batch reaches the collector
KEY = SigningKey(bytes(range(32)))

Identity = tuple[str, tuple[tuple[str, str], ...], wire.MetricType]

# ---------------------------------------------------------------- the series of a node

COUNTER, GAUGE = wire.MetricType.COUNTER, wire.MetricType.GAUGE
# Once per node: (name, type, job).
NODE_WIDE = [
    *((f"node_load{m}", GAUGE, "node") for m in (1, 5, 15)),
    *((f"node_memory_{f}_bytes", GAUGE, "node")
      for f in ("MemTotal", "MemAvailable", "MemFree", "Cached", "Buffers", "SwapTotal", "SwapFree")),
    *((f"node_{f}_total", COUNTER, "node") for f in ("context_switches", "intr", "forks")),
    ("node_procs_running", GAUGE, "node"),
    ("node_procs_blocked", GAUGE, "node"),
    ("node_boot_time_seconds", GAUGE, "node"),
    ("node_time_seconds", GAUGE, "node"),
    ("node_entropy_available_bits", GAUGE, "node"),
    ("node_filefd_allocated", GAUGE, "node"),
    ("node_sockstat_TCP_inuse", GAUGE, "node"),
    ("waystation_agent_spool_pending_batches", GAUGE, "waystation"),
    ("waystation_agent_spool_pending_bytes", GAUGE, "waystation"),
    ("waystation_agent_batches_sent_total", COUNTER, "waystation"),
    ("waystation_agent_samples_dropped_total", COUNTER, "waystation"),
]
CPU_MODES = ("idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user")
GPU_FIELDS = [
    *((f"DCGM_FI_DEV_{f}", GAUGE) for f in ("GPU_UTIL", "MEM_COPY_UTIL", "GPU_TEMP", "MEMORY_TEMP", "POWER_USAGE",
                                            "SM_CLOCK", "MEM_CLOCK", "FB_USED", "FB_FREE", "XID_ERRORS")),
    *((f"DCGM_FI_PROF_{f}", GAUGE) for f in ("GR_ENGINE_ACTIVE", "PIPE_TENSOR_ACTIVE", "DRAM_ACTIVE")),
    *((f"DCGM_FI_DEV_{f}", COUNTER) for f in ("TOTAL_ENERGY_CONSUMPTION", "PCIE_REPLAY_COUNTER",
                                              "NVLINK_BANDWIDTH_TOTAL")),
]
NETWORK_COUNTERS = [f"node_network_{d}_{f}_total" for d in ("receive", "transmit")
                    for f in ("bytes", "packets", "errs", "drop")]
DISK_COUNTERS = [f"node_disk_{f}_total" for f in ("reads_completed", "writes_completed", "read_bytes",
                                                  "written_bytes", "io_time_seconds", "read_time_seconds",
                                                  "write_time_seconds")]
FILESYSTEM_GAUGES = [f"node_filesystem_{f}" for f in ("size_bytes", "avail_bytes", "free_bytes", "files",
                                                     "files_free")]


def template(n_series: int) -> list[tuple[str, dict[str, str], wire.MetricType]]:
    """n_series (name, labels but `instance`, type): the node-wide series, then a round per
    CPU (8 mode counters), GPU (16 DCGM fields), network device (8 counters), disk (7
    counters and a gauge) and filesystem (5 gauges), until n_series are placed."""
    out = [(name, {"job": job}, mtype) for name, mtype, job in NODE_WIDE]
    i = 0
    while len(out) < n_series:
        for mode in CPU_MODES:
            out.append(("node_cpu_seconds_total", {"job": "node", "cpu": str(i), "mode": mode}, COUNTER))
        gpu = {"job": "dcgm", "gpu": str(i), "UUID": f"GPU-5f3b7c1e-{i:04x}", "modelName": "NVIDIA H100 80GB HBM3"}
        out += [(name, gpu, mtype) for name, mtype in GPU_FIELDS]
        out += [(name, {"job": "node", "device": f"eth{i}"}, COUNTER) for name in NETWORK_COUNTERS]
        disk = {"job": "node", "device": f"nvme{i}n1"}
        out += [(name, disk, COUNTER) for name in DISK_COUNTERS] + [("node_disk_io_now", disk, GAUGE)]
        fs = {"job": "node", "device": f"/dev/nvme{i}n1p1", "fstype": "ext4", "mountpoint": f"/data{i}"}
        out += [(name, fs, GAUGE) for name in FILESYSTEM_GAUGES]
        i += 1
    return out[:n_series]


def where(i: int) -> tuple[str, str]:
    """Node i's (site, node)."""
    return f"site-{i // NODES_PER_SITE:03d}", f"node-{i:05d}"


def identities(shape: list[tuple[str, dict[str, str], wire.MetricType]], node: str) -> list[Identity]:
    instance = f"{node}.dc1.example:9100"
    return [(name, tuple(sorted({**labels, "instance": instance}.items())), mtype) for name, labels, mtype in shape]


class NodeValues:
    """A node's values batch by batch: counters grow by their own rate, gauges wander; both
    with two decimals, as real readings mostly are."""

    def __init__(self, i: int, shape: list[tuple[str, dict[str, str], wire.MetricType]]) -> None:
        self.rng = np.random.default_rng(i)
        n = len(shape)
        self.counter = np.array([mtype == COUNTER for _, _, mtype in shape])
        self.base = np.round(self.rng.random(n) * 1e9, 2)
        self.rate = np.round(self.rng.random(n) * 1e4, 2)

    def batch(self, b: int) -> list[float]:
        gauges = np.round(self.rng.random(self.base.size) * 100, 2)
        values: list[float] = np.where(self.counter, self.base + self.rate * b, gauges).tolist()
        return values


def stamp(b: int) -> int:
    return T0_MS + b * PERIOD_MS


def memory_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def quiet() -> None:
    """Collect, then hand freed heap pages back, so the RSS read next holds only what is live."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gc_time(rounds: int = 3) -> float:
    """A full gc.collect(), median of `rounds` (seconds)."""
    gc.collect()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def full_collections() -> int:
    """Full (generation 2) collections the interpreter has run so far."""
    return int(gc.get_stats()[2]["collections"])


def body_samples(piece: bytes) -> int:
    """Sample lines in a piece of a text exposition (whole lines; headers start with #)."""
    return piece.count(b"\n") - piece.count(b"\n#") - piece.startswith(b"#")


def per_node(times: list[float]) -> dict[str, float]:
    return {"mean_ms": 1000 * statistics.fmean(times), "max_ms": 1000 * max(times)}


# ---------------------------------------------------------------- Waystation


class Enrolled:
    public_key = bytes(KEY.verify_key)

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return None


class Fleet:
    """The nodes' agents: each its own table builder, chain position and values."""

    def __init__(self, nodes: int, n_series: int) -> None:
        shape = template(n_series)
        self.nodes = [where(i) for i in range(nodes)]
        self.identities = [identities(shape, node) for _, node in self.nodes]
        self.values = [NodeValues(i, shape) for i in range(nodes)]
        self.builders = [wire.TableBuilder(zstd_level=1) for _ in range(nodes)]
        self.sent_tables: list[bytes | None] = [None] * nodes
        self.tables = wire.MemoryTables(max_tables=2 * nodes + 16, max_series=2 * nodes * n_series + 1000)

    def batch(self, i: int, b: int) -> Any:
        """Node i's batch b, signed and opened as the collector opens it: its columns."""
        site, node = self.nodes[i]
        ts = stamp(b)
        series = [wire.Series(name, labels, mtype, (ts,), (v,))
                  for (name, labels, mtype), v in zip(self.identities[i], self.values[i].batch(b), strict=True)]
        table, placed = self.builders[i].place(series)
        prepared = wire.prepare_columns(table, placed, 1)
        frame = wire.sign_batch(prepared, wire.BatchContext(KEY, site, node, b + 1, wire.ZERO_HASH, ts, 0))
        attached = table.blob if table.id != self.sent_tables[i] else None
        self.sent_tables[i] = table.id
        opened = wire.open_batch(frame, lambda _k: Enrolled(), series_tables=self.tables, attached_table=attached,
                                 as_series=False)
        assert isinstance(opened, wire.VerifiedBatch) and opened.columns is not None, opened
        return opened.columns

    def round(self, b: int) -> list[Any]:
        return [self.batch(i, b) for i in range(len(self.nodes))]


def waystation(nodes: int, n_series: int, batches: int) -> dict[str, Any]:
    from collector.app import RENDER_STEP, SCRAPE_STEP
    from collector.config import LimitsConfig
    from collector.exposition import FleetState

    gc_empty = gc_time()
    limits = LimitsConfig()
    fleet = FleetState(max(limits.max_series_per_node, n_series), limits.series_ttl,
                       max(limits.max_series_total, nodes * n_series))
    agents = Fleet(nodes, n_series)
    built = time.perf_counter()
    first = agents.round(0)
    build_s = time.perf_counter() - built
    quiet()
    before = memory_rss()
    first_times = []
    collections = full_collections()
    for (site, node), columns in zip(agents.nodes, first, strict=True):
        start = time.perf_counter()
        fleet.apply_columns(site, node, columns, now_ms=stamp(0) + ARRIVAL_MS)
        first_times.append(time.perf_counter() - start)
    collections = full_collections() - collections
    quiet()
    after = memory_rss()
    del first
    settled_times = []
    for b in range(1, batches + 1):
        built = time.perf_counter()
        batch = agents.round(b)
        build_s += time.perf_counter() - built
        collections -= full_collections()
        for (site, node), columns in zip(agents.nodes, batch, strict=True):
            start = time.perf_counter()
            fleet.apply_columns(site, node, columns, now_ms=stamp(b) + ARRIVAL_MS)
            settled_times.append(time.perf_counter() - start)
        collections += full_collections()
        del batch

    # /metrics, as collector.app.get_metrics takes it.
    steps = []
    started = time.perf_counter()
    scrape = fleet.scrape(stamp(batches) + ARRIVAL_MS + 1_000)
    more = True
    while more:
        start = time.perf_counter()
        more = scrape.step(SCRAPE_STEP)
        steps.append(time.perf_counter() - start)
    start = time.perf_counter()
    text = scrape.text()
    text_s = time.perf_counter() - start
    pieces, body_bytes, samples = [], 0, 0
    chunks: Iterator[bytes] = text.chunks(RENDER_STEP)
    while True:
        start = time.perf_counter()
        piece = next(chunks, None)
        if piece is None:
            break
        pieces.append(time.perf_counter() - start)
        body_bytes += len(piece)
        samples += body_samples(piece)
    scrape_s = time.perf_counter() - started
    del scrape, text, chunks, piece

    del agents  # and the tables: the state holds what it needs of them
    quiet()
    return {
        "state_series": fleet.total_series,
        "rss_growth_bytes": after - before,
        "rss_per_series": (after - before) / max(fleet.total_series, 1),
        "rss_end_bytes": memory_rss(),
        "first_batch": per_node(first_times),
        "settled_batch": per_node(settled_times),
        "gc_full_runs_during_batches": collections,
        "scrape": {
            "steps": len(steps), "longest_step_ms": 1000 * max(steps), "text_ms": 1000 * text_s,
            "pieces": len(pieces), "longest_piece_ms": 1000 * max(pieces, default=0.0),
            "longest_hold_ms": 1000 * max(max(steps), text_s, max(pieces, default=0.0)),
            "total_ms": 1000 * scrape_s, "body_bytes": body_bytes, "body_series": samples,
        },
        "gc_ms": 1000 * gc_time(),
        "gc_empty_ms": 1000 * gc_empty,
        "build_s": build_s,
    }


# ---------------------------------------------------------------- prometheus_client


def set_round(targets: list[list[tuple[Any, tuple[str, ...]]]], batch: list[list[float]]) -> list[float]:
    """Each node's batch into its Gauges' children, as a plain exporter does; seconds per node."""
    times = []
    for node_targets, node_values in zip(targets, batch, strict=True):
        start = time.perf_counter()
        for (gauge, label_values), value in zip(node_targets, node_values, strict=True):
            gauge.labels(*label_values).set(value)
        times.append(time.perf_counter() - start)
    return times


def prometheus_client_side(nodes: int, n_series: int, batches: int) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    import collector.app  # noqa: F401  (as the waystation side: the same process to collect, bar the state)

    gc_empty = gc_time()
    shape = template(n_series)
    registry = CollectorRegistry()
    gauges: dict[str, Any] = {}
    label_names: dict[str, list[str]] = {}
    for name, labels, _ in shape:
        if name not in gauges:
            label_names[name] = sorted({*labels, "instance"}) + ["site", "node"]
            gauges[name] = Gauge(name, "Latest value reported by the fleet.", label_names[name], registry=registry)
    # Per node, per series: its Gauge and its label values in that Gauge's order.
    targets = []
    for i in range(nodes):
        site, node = where(i)
        targets.append([(gauges[name], tuple(dict(labels, site=site, node=node)[k] for k in label_names[name]))
                        for name, labels, _ in identities(shape, node)])
    values = [NodeValues(i, shape) for i in range(nodes)]

    first = [v.batch(0) for v in values]
    quiet()
    before = memory_rss()
    collections = full_collections()
    first_times = set_round(targets, first)
    collections = full_collections() - collections
    quiet()
    after = memory_rss()
    del first
    settled_times = []
    for b in range(1, batches + 1):
        batch = [v.batch(b) for v in values]
        collections -= full_collections()
        settled_times += set_round(targets, batch)
        collections += full_collections()
        del batch
    held = sum(len(g._metrics) for g in gauges.values())

    start = time.perf_counter()
    body = generate_latest(registry)
    render_s = time.perf_counter() - start
    body_bytes, samples = len(body), body_samples(body)
    del body, targets, values
    quiet()
    return {
        "state_series": held,
        "rss_growth_bytes": after - before,
        "rss_per_series": (after - before) / max(held, 1),
        "rss_end_bytes": memory_rss(),
        "first_batch": per_node(first_times),
        "settled_batch": per_node(settled_times),
        "gc_full_runs_during_batches": collections,
        "scrape": {"longest_hold_ms": 1000 * render_s, "total_ms": 1000 * render_s, "body_bytes": body_bytes,
                   "body_series": samples},
        "gc_ms": 1000 * gc_time(),
        "gc_empty_ms": 1000 * gc_empty,
    }


# ---------------------------------------------------------------- report


def in_child(side: str, nodes: int, n_series: int, batches: int) -> dict[str, Any]:
    """Run one side in a fresh process of its own (its RSS is its own)."""
    run = waystation if side == "waystation" else prometheus_client_side
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result: dict[str, Any] = pool.apply(run, (nodes, n_series, batches))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--series", type=int, default=1000, help="series per node")
    ap.add_argument("--batches", type=int, default=3, help="settled batches per node to time")
    args = ap.parse_args()
    if args.nodes < 1 or args.series < 1 or args.batches < 1:
        ap.error("--nodes, --series and --batches must be at least 1")
    names = len({name for name, _, _ in template(args.series)})
    print(f"latest state: {args.nodes:,} nodes x {args.series:,} series ({args.nodes * args.series:,} series, "
          f"{names} metric names); first batch, then {args.batches} settled batches per node", flush=True)

    started = time.perf_counter()
    ws = in_child("waystation", args.nodes, args.series, args.batches)
    print(f"  waystation done in {time.perf_counter() - started:.0f} s "
          f"(building and opening batches, not timed: {ws['build_s']:.0f} s)", flush=True)
    started = time.perf_counter()
    pc = in_child("prometheus_client", args.nodes, args.series, args.batches)
    print(f"  prometheus_client done in {time.perf_counter() - started:.0f} s", flush=True)

    ws_scrape, pc_scrape = ws["scrape"], pc["scrape"]
    na = "-"
    rows = [
        ("series held", f"{ws['state_series']:,}", f"{pc['state_series']:,}"),
        ("RSS per series after the first batches", f"{ws['rss_per_series']:,.0f} B", f"{pc['rss_per_series']:,.0f} B"),
        ("RSS growth over the state", f"{ws['rss_growth_bytes'] / 1e6:,.1f} MB",
         f"{pc['rss_growth_bytes'] / 1e6:,.1f} MB"),
        ("first batch per node, mean", f"{ws['first_batch']['mean_ms']:.2f} ms",
         f"{pc['first_batch']['mean_ms']:.2f} ms"),
        ("first batch per node, max", f"{ws['first_batch']['max_ms']:.2f} ms",
         f"{pc['first_batch']['max_ms']:.2f} ms"),
        ("settled batch per node, mean", f"{ws['settled_batch']['mean_ms']:.2f} ms",
         f"{pc['settled_batch']['mean_ms']:.2f} ms"),
        ("settled batch per node, max", f"{ws['settled_batch']['max_ms']:.2f} ms",
         f"{pc['settled_batch']['max_ms']:.2f} ms"),
        ("scrape: steps, longest", f"{ws_scrape['steps']}, {ws_scrape['longest_step_ms']:.1f} ms", na),
        ("scrape: text()", f"{ws_scrape['text_ms']:.1f} ms", na),
        ("scrape: pieces, longest", f"{ws_scrape['pieces']}, {ws_scrape['longest_piece_ms']:.1f} ms",
         "1 (generate_latest)"),
        ("scrape: longest hold of the event loop", f"{ws_scrape['longest_hold_ms']:.1f} ms",
         f"{pc_scrape['longest_hold_ms']:.1f} ms"),
        ("scrape: total", f"{ws_scrape['total_ms']:.1f} ms", f"{pc_scrape['total_ms']:.1f} ms"),
        ("scrape: body", f"{ws_scrape['body_bytes'] / 1e6:.1f} MB, {ws_scrape['body_series']:,} series",
         f"{pc_scrape['body_bytes'] / 1e6:.1f} MB, {pc_scrape['body_series']:,} series"),
        ("full gc.collect() with the state held", f"{ws['gc_ms']:.1f} ms", f"{pc['gc_ms']:.1f} ms"),
        ("full gc.collect() before it (modules only)", f"{ws['gc_empty_ms']:.1f} ms", f"{pc['gc_empty_ms']:.1f} ms"),
        ("full collections run while applying batches", f"{ws['gc_full_runs_during_batches']}",
         f"{pc['gc_full_runs_during_batches']}"),
    ]
    width = max(len(title) for title, _, _ in rows) + 2
    print(f"\n  {'measure':<{width}}{'waystation':>30}  {'prometheus_client':>30}")
    for title, ours, theirs in rows:
        print(f"  {title:<{width}}{ours:>30}  {theirs:>30}")
    print("  (waystation's body carries each series' timestamp; prometheus_client's has none, and its series "
          "are all Gauges, one per name)")
    summary = {"nodes": args.nodes, "series": args.series, "batches": args.batches, "metric_names": names,
               "waystation": ws, "prometheus_client": pc}
    print("summary: " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
