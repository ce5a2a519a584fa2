"""Fleet load: a fleet of enrolled nodes, each posting one wire v2 batch a minute, against one collector.

What it measures, for one real `waystation-collector serve` with its default config on loopback:
ack latency (p50, p99, beside the 250 ms target), errors by kind, the collector's RSS (peak
and at the end) and CPU, how fast its ledger grows per day at the fleet's rate, and, with
--step, the largest fleet it holds with p99 under the target.

How. Every node has its own Ed25519 key, enrolled before the collector starts, and its own
hash chain. Each sends a batch every --period seconds (60 s: the agent's default window and
flush), at its own offset in the period, so arrivals are spread evenly: a steady
nodes/period requests per second. A batch holds --series series of one point each (the
shape the agent's summarizer gives at the default window: node_exporter-like counters,
gauges with their :window_min/max/mean, dcgm-like GPU gauges). As an agent does, a node sends
its series table with its first batch and names it by hash afterwards (docs/wire.md §10.6).
Each request is timed from the moment the sender hands it to its HTTP client to the ack;
how late the sender was against the schedule is printed separately, with the sender's own
CPU, so a reader can tell when the sender, not the collector, is the bottleneck.

Everything is prepared before the clock starts, and its time is printed apart. Encoding a
1,000-series payload as the agent does (wire.TableBuilder, wire.prepare_columns, zstd 19)
costs about 15 ms of Python, 25 minutes of CPU for 10,000 nodes x 10 batches on its own,
so the nodes share --profiles series profiles (names, labels, values): each node signs the
payloads of its profile with its own key into its own chain (site and node in every header,
so every frame differs). The collector's work is the same as for a fleet whose payloads all
differ: per node it checks the key, signature and chain, keeps the node's table (tables are
per node, docs/wire.md §10.6), decodes, updates that node's latest state and stores the frame.
--profiles equal to --nodes makes every payload distinct.

A site's Prometheus scrapes /metrics while the batches come, so the bench does too: a GET of
/metrics every --scrape-interval seconds (15 s; 0: none) over the measured run, one at a time,
each given --scrape-timeout seconds (Prometheus' default 10 s) to be answered whole, else a
scrape error ("timeout"). The collector serves them beside the batches, so the ack latencies
carry their cost; the acks in flight during a scrape get a p99 of their own. Printed:
scrapes, their duration (to the body's last byte) p50 and max, the last body's size and its
fleet series (sample lines with a timestamp, beside what its waystation_exposition_fleet_series
says), and scrape errors, which fail a run as other errors do.

Acks over the target are listed in bursts by when they were sent, so a stall (a save, a
garbage collection, a scrape) shows as one burst rather than as a p99. The ledger's growth is
given twice: the whole ledger over the run (latest-state saves included, which stop growing
once every series has its row) and its batches alone (SQLite's dbstat), the long-run rate.
--step runs the fleet at 100, 200, 500, 1k, 2k ... nodes (--step-from, up to --nodes), each
for --step-minutes against a fresh collector and ledger, and stops at the first step with
p99 at or over the target, an error, or a batch not stored.

    python bench/fleet_load.py --nodes 1000 --series 1000 --minutes 3
    python bench/fleet_load.py --nodes 10000 --series 1000 --minutes 10     # the issue's size
    python bench/fleet_load.py --step --nodes 20000 --step-minutes 3       # largest fleet under p99

A quick look (about 30 s): `python bench/fleet_load.py --nodes 20 --series 200 --minutes 0.25
--period 5 --scrape-interval 1`. The last line of each run is its figures as JSON (`summary: {...}`).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import math
import multiprocessing
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

import wire  # noqa: E402
from bench.common import ENV, free_port, process, wait_http  # noqa: E402
from collector import ledger  # noqa: E402
from collector.config import LEDGER_FILE, LimitsConfig  # noqa: E402
from wire.keys import public_key_text  # noqa: E402

P99_TARGET_MS = 250.0
NODES_PER_SITE = 100
REQUEST_TIMEOUT_S = 30.0
ATTEMPTS = 3  # per batch: a 503, a 428 (table resent) or a broken connection is tried again
CONTENT_TYPE = {"Content-Type": "application/x-waystation-batch"}
CPU_MODES = ("idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user")
WINDOW_SUFFIXES = ("", ":window_min", ":window_max", ":window_mean")


# ---------------------------------------------------------------- series profiles


@dataclass(frozen=True)
class Identity:
    name: str
    labels: tuple[tuple[str, str], ...]
    mtype: wire.MetricType
    source: int  # sources sample at their own moment in the window: one timestamp per source
    role: str  # "counter", "gauge" (the last sample), "min", "max", "mean", "const"


def profile_identities(n_series: int, profile: int) -> list[Identity]:
    """n_series identities shaped like one node's default sources after the summarizer.

    Every round adds one CPU (8 mode counters), one GPU (4 gauges, each with its 3 window
    series), one network device (4 counters), one disk (4 counters, an I/O gauge and its
    window series) and one filesystem (2 gauges, one constant); until n_series are placed."""
    uuid = f"GPU-{hashlib.sha256(b'%d' % profile).hexdigest()[:8]}"
    out: list[Identity] = []

    def counter(name: str, labels: dict[str, str], source: int) -> None:
        out.append(Identity(name, tuple(sorted(labels.items())), wire.MetricType.COUNTER, source, "counter"))

    def gauge(name: str, labels: dict[str, str], source: int, const: bool = False) -> None:
        roles = ("const",) if const else ("gauge", "min", "max", "mean")
        for suffix, role in zip(WINDOW_SUFFIXES, roles, strict=False):
            out.append(Identity(name + suffix, tuple(sorted(labels.items())), wire.MetricType.GAUGE, source, role))

    for i in range(n_series):  # each round adds at least one series, so this bounds it
        if len(out) >= n_series:
            break
        for mode in CPU_MODES:
            counter("node_cpu_seconds_total", {"cpu": str(i), "mode": mode}, 0)
        gpu = {"gpu": str(i), "UUID": f"{uuid}-{i:04x}", "modelName": "NVIDIA H100 80GB HBM3"}
        for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE",
                     "DCGM_FI_DEV_FB_USED"):
            gauge(name, gpu, 1)
        for name in ("receive_bytes", "transmit_bytes", "receive_packets", "transmit_packets"):
            counter(f"node_network_{name}_total", {"device": f"eth{i}"}, 2)
        disk = {"device": f"nvme{i}n1"}
        for name in ("reads_completed", "writes_completed", "read_bytes", "written_bytes"):
            counter(f"node_disk_{name}_total", disk, 0)
        gauge("node_disk_io_now", disk, 0)
        fs = {"device": f"/dev/nvme{i}n1p1", "fstype": "ext4", "mountpoint": f"/data{i}"}
        gauge("node_filesystem_size_bytes", fs, 0, const=True)
        gauge("node_filesystem_avail_bytes", fs, 0)
    return out[:n_series]


def profile_series(ids: list[Identity], batches: int, period_ms: int, t0_ms: int,
                   rng: random.Random) -> list[list[wire.Series]]:
    """Each batch's series (one point each), values moving as a node's do."""
    state = [rng.uniform(0, 1e6) if i.role == "counter" else rng.uniform(0, 100) for i in ids]
    if any(i.role == "const" for i in ids):
        size = float(rng.randrange(1 << 30, 1 << 42))
    out = []
    for b in range(batches):
        window_end = t0_ms + (b + 1) * period_ms
        series = []
        last = 0.0
        for j, ident in enumerate(ids):
            ts = (window_end - 1000 * (1 + 3 * ident.source),)
            if ident.role == "counter":
                state[j] += float(rng.randrange(0, 50_000))
                value = state[j]
            elif ident.role == "gauge":
                state[j] = min(100.0, max(0.0, state[j] + rng.uniform(-3, 3)))
                last = value = round(state[j], 2)
            elif ident.role == "min":
                value = round(last - rng.uniform(0, 5), 2)
            elif ident.role == "max":
                value = round(last + rng.uniform(0, 5), 2)
            elif ident.role == "mean":
                value = round(last + rng.uniform(-1, 1), 2)
            else:
                value = size
            series.append(wire.Series(ident.name, ident.labels, ident.mtype, ts, (value,)))
        out.append(series)
    return out


@dataclass(frozen=True)
class Profile:
    table: bytes  # the series table, as sent with a node's first batch
    payloads: tuple[wire.Prepared, ...]  # one per batch, compressed, not yet signed


def build_profile(args: tuple[int, int, int, int, int, int]) -> Profile:
    """One profile's payloads, encoded as the agent encodes them (zstd 19, wire v2)."""
    profile, n_series, batches, period_ms, t0_ms, seed = args
    rng = random.Random(seed * 1_000_003 + profile)
    ids = profile_identities(n_series, profile)
    tables = wire.TableBuilder()
    payloads = []
    table = None
    for series in profile_series(ids, batches, period_ms, t0_ms, rng):
        table, placed = tables.place(series)
        payloads.append(wire.prepare_columns(table, placed))
    assert table is not None
    return Profile(table.blob, tuple(payloads))


# ---------------------------------------------------------------- nodes


def node_key(seed: int, i: int) -> SigningKey:
    return SigningKey(hashlib.sha256(f"fleet-load {seed} {i}".encode()).digest())


def node_name(i: int) -> tuple[str, str]:
    return f"site-{i // NODES_PER_SITE:04d}", f"node-{i:05d}"


@dataclass
class NodePlan:
    index: int
    offset_s: float  # where in each period this node sends
    table: bytes
    frames: list[bytes]
    table_held: bool = False  # a batch of this node was acked: the collector holds its table


def sign_node(i: int, nodes: int, period: float, profile: Profile, seed: int, t0_ms: int,
              period_ms: int) -> NodePlan:
    key = node_key(seed, i)
    site, node = node_name(i)
    prev = wire.ZERO_HASH
    frames = []
    for b, payload in enumerate(profile.payloads):
        created = t0_ms + (b + 1) * period_ms
        frame = wire.sign_batch(payload, wire.BatchContext(key, site, node, b + 1, prev, created, created * 1_000_000))
        prev = wire.batch_hash(frame)
        frames.append(frame)
    return NodePlan(i, period * i / nodes, profile.table, frames)


def enroll_fleet(data_dir: Path, nodes: int, seed: int) -> float:
    """Enroll every node's key as an operator does, with one `waystation-collector enroll
    --from FILE` (one transaction); returns the seconds it took, the interpreter's start
    included."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fleet = data_dir.parent / f"fleet-{nodes}.txt"
    fleet.write_text("".join(" ".join((*node_name(i), public_key_text(bytes(node_key(seed, i).verify_key)))) + "\n"
                             for i in range(nodes)))
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "collector", "enroll", "--data-dir", str(data_dir), "--from", str(fleet)],
                   env=ENV, check=True, capture_output=True, timeout=600)
    return time.monotonic() - t


# ---------------------------------------------------------------- senders


@dataclass
class SenderReport:
    latency_s: array[float]  # send -> ack of each acknowledged batch
    sent_s: array[float]  # when each of those was sent, seconds after the start
    late_s: array[float]  # how late the sender handed each batch to its HTTP client (its own delay)
    errors: Counter[str] = field(default_factory=Counter)
    acked: int = 0
    duplicates: int = 0
    prep_s: float = 0.0
    load_cpu_s: float = 0.0


async def post_batch(session: aiohttp.ClientSession, url: str, plan: NodePlan, b: int,
                     report: SenderReport) -> bool:
    """One batch until acked (True), or refused for good, or out of attempts (False)."""
    # As the agent does: the table goes with every batch until the collector acked one.
    body = plan.frames[b] if plan.table_held else wire.with_table(plan.table, plan.frames[b])
    for _ in range(ATTEMPTS):
        retry_after = 1.0
        try:
            async with session.post(url, data=body, headers=CONTENT_TYPE) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            report.errors[type(exc).__name__] += 1
            await asyncio.sleep(1.0)
            continue
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        result = answer.get("result") if isinstance(answer, dict) else None
        if status == 200 and result in ("accepted", "duplicate") and answer.get("seq") == b + 1:
            report.duplicates += result == "duplicate"
            plan.table_held = True
            return True
        report.errors[str(result) if isinstance(result, str) else f"http_{status}"] += 1
        if status == 428:  # unknown_table: the same frame again, with its table (docs/wire.md §9.3)
            body = wire.with_table(plan.table, plan.frames[b])
        elif status in (429, 503):
            await asyncio.sleep(retry_after)
        else:
            return False
    return False


def _seconds(header: str | None) -> float:
    try:
        return min(5.0, max(0.1, float(header or 1)))
    except ValueError:
        return 1.0


async def drive(port: int, plans: list[NodePlan], start_at: float, period: float, connections: int,
                deadline: float, acked: Any) -> SenderReport:
    """Send every plan's batches on schedule; each node's batches in chain order."""
    report = SenderReport(array("d"), array("d"), array("d"))
    url = f"http://127.0.0.1:{port}/v1/batches"
    loop = asyncio.get_running_loop()  # loop.time() is time.monotonic(), the parent's clock too
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=2 * period + 30)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    refused = 0

    async def node(plan: NodePlan) -> None:
        nonlocal refused
        for b in range(len(plan.frames)):
            due = start_at + b * period + plan.offset_s
            # A batch still being retried holds back the next (chain order): that wait is the
            # collector's doing; only the rest of the lateness is the sender's.
            ready = max(due, loop.time())
            await asyncio.sleep(max(0.0, due - loop.time()))
            sent = loop.time()
            report.late_s.append(sent - ready)
            if await post_batch(session, url, plan, b, report):
                report.latency_s.append(loop.time() - sent)
                report.sent_s.append(sent - start_at)
                report.acked += 1
                with acked.get_lock():
                    acked.value += 1
            else:
                refused += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # An overloaded collector leaves batches queued behind slow ones: at the deadline
        # whatever is still unsent or unanswered is counted, not waited for.
        tasks = [asyncio.ensure_future(node(p)) for p in plans]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    unfinished = sum(len(p.frames) for p in plans) - report.acked - refused
    if unfinished:
        report.errors["unfinished_at_deadline"] += unfinished
    return report


def sender_main(port: int, indices: list[int], nodes: int, period: float, profiles: list[Profile], seed: int,
                t0_ms: int, period_ms: int, connections: int, ready: Any, go: EventType, start_at: Any,
                acked: Any, results: Any) -> None:
    """A sender process: sign its nodes' batches, say so, wait for the start, send, report."""
    t = time.monotonic()
    plans = [sign_node(i, nodes, period, profiles[i % len(profiles)], seed, t0_ms, period_ms) for i in indices]
    prep_s = time.monotonic() - t
    ready.put(prep_s)
    if not go.wait(3600):
        return
    cpu0 = time.process_time()
    deadline = start_at.value + len(profiles[0].payloads) * period + ATTEMPTS * (REQUEST_TIMEOUT_S + 5)
    report = asyncio.run(drive(port, plans, start_at.value, period, connections, deadline, acked))
    report.load_cpu_s = time.process_time() - cpu0
    report.prep_s = prep_s
    results.put(report)


# ---------------------------------------------------------------- the scraper


SCRAPE_HEADERS = {"Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1"}
# A fleet sample line is its series' text (site and node always among its labels, so it ends
# with "}"), its value and its timestamp; the collector's own samples carry no timestamp.
FLEET_SAMPLE = re.compile(rb"\} \S+ -?\d+\n")
FLEET_SERIES_GAUGE = re.compile(rb"^waystation_exposition_fleet_series (\S+)$", re.MULTILINE)


@dataclass
class ScrapeBody:
    size: int
    samples: int  # every sample line
    fleet_series: int  # fleet sample lines (each series is exposed once)
    fleet_series_reported: int | None  # what the body's waystation_exposition_fleet_series says


def read_body(body: bytes) -> ScrapeBody:
    samples = sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
    reported = FLEET_SERIES_GAUGE.search(body)
    return ScrapeBody(len(body), samples, len(FLEET_SAMPLE.findall(body)),
                      round(float(reported.group(1))) if reported else None)


class Scraper:
    """GET /metrics as Prometheus does while the fleet sends: every `interval` seconds from
    the clock's start, one scrape at a time (a tick that comes while one is in flight is
    skipped), each bounded by `timeout` as Prometheus' scrape_timeout bounds it. Runs in a
    thread of the bench's own process, so the senders' clocks are not held by the reading;
    the collector serves it beside the batches, so their ack latencies carry its cost."""

    def __init__(self, url: str, interval: float, timeout: float, start_at: float) -> None:
        self.url, self.interval, self.timeout, self.start_at = url, interval, timeout, start_at
        self.durations: list[float] = []  # of each scrape answered 200, to its body's last byte
        self.windows: list[tuple[float, float]] = []  # every scrape's [start, end], seconds after the start
        self.errors: Counter[str] = Counter()
        self.last_body = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._running = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        self._running.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """No scrape after this; one in flight finishes (within its timeout)."""
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(self.timeout + 30)

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()  # loop.time() is time.monotonic()
        stopped = self._stopped = asyncio.Event()
        self._running.set()
        connector = aiohttp.TCPConnector(limit=1)
        headers = SCRAPE_HEADERS | {"X-Prometheus-Scrape-Timeout-Seconds": f"{self.timeout:g}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            tick = 1
            while not stopped.is_set():
                due = self.start_at + tick * self.interval
                try:
                    await asyncio.wait_for(stopped.wait(), max(0.0, due - loop.time()))
                    break
                except TimeoutError:
                    pass
                await self._scrape(session)
                tick = max(tick + 1, math.floor((loop.time() - self.start_at) / self.interval) + 1)

    async def _scrape(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        t = loop.time()
        try:
            async with session.get(self.url) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:  # aiohttp's timeouts are TimeoutErrors too
            self.errors["timeout"] += 1
            return
        except aiohttp.ClientError as exc:
            self.errors[type(exc).__name__] += 1
            return
        finally:
            self.windows.append((t - self.start_at, loop.time() - self.start_at))
        if status != 200:
            self.errors[f"http_{status}"] += 1
            return
        self.durations.append(loop.time() - t)
        self.last_body = body


# ---------------------------------------------------------------- one run


@dataclass
class RunFigures:
    nodes: int
    series: int
    period_s: float
    batches_per_node: int
    expected: int
    acked: int = 0
    duplicates: int = 0
    stored: int = 0
    nodes_complete: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    late_p99_ms: float = math.nan
    requests_per_s: float = 0.0
    load_wall_s: float = 0.0
    sign_s: float = 0.0
    enroll_s: float = 0.0
    collector_cpu_s: float = 0.0
    collector_rss_peak: int = 0
    collector_rss_end: int = 0
    sender_cpu_s: float = 0.0
    ledger_start: int = 0
    ledger_after_first: int = 0
    acked_after_first: int = 0
    ledger_end: int = 0
    ledger_dir_end: int = 0
    ledger_growth_per_day: float = 0.0
    ledger_parts: dict[str, int] = field(default_factory=dict)  # bytes on disk by what they hold, at the end
    batch_growth_per_day: float = 0.0
    table_bytes_per_node: float = 0.0
    slow: int = 0  # acks over the p99 target
    slow_bursts: list[list[float]] = field(default_factory=list)  # [sent at s, acks, max ms]
    scrape_interval_s: float = 0.0  # 0: /metrics was not scraped
    scrape_timeout_s: float = 0.0
    scrapes: int = 0  # answered 200
    scrape_p50_ms: float = math.nan
    scrape_max_ms: float = math.nan
    scrape_errors: dict[str, int] = field(default_factory=dict)
    scrape_body_bytes: int = 0  # the last body's
    scrape_samples: int = 0
    scrape_fleet_series: int = 0
    scrape_fleet_series_reported: int | None = None
    # Acks whose request was in flight while a scrape was (its start to its last byte), and the rest.
    acks_during_scrape: int = 0
    p99_during_scrape_ms: float = math.nan
    p99_outside_scrape_ms: float = math.nan

    @property
    def ok(self) -> bool:
        return not self.errors and not self.scrape_errors and self.acked == self.expected == self.stored

    def summary(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()} | {
            "ok": self.ok, "p99_target_ms": P99_TARGET_MS}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def bursts(slow: list[tuple[float, float]], gap_s: float = 5.0) -> list[list[float]]:
    """Slow acks (sent at, latency) grouped into bursts: sent within gap_s of each other."""
    out: list[list[float]] = []
    last = -math.inf
    for sent, latency in slow:
        if sent - last > gap_s:
            out.append([round(sent, 1), 0, 0.0])
        out[-1][1] += 1
        out[-1][2] = round(max(out[-1][2], latency * 1000), 1)
        last = sent
    return out


# The ledger's tables and their indexes (collector/ledger.py SCHEMA), by what grows with what.
LEDGER_PARTS = (("batches", "batches"), ("series tables", "series_tables"), ("latest state", "latest_"))


def ledger_parts(path: Path) -> dict[str, int]:
    """Bytes on disk of the ledger's B-trees (SQLite's dbstat), summed by what they hold:
    batches grow with every batch, series tables once per node's table, the latest state
    is rewritten in place (bounded by the fleet's series), the rest is small."""
    conn = ledger.connect_readonly(path)
    try:
        parts: Counter[str] = Counter()
        for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            bare = str(name).removeprefix("sqlite_autoindex_")
            part = next((label for label, prefix in LEDGER_PARTS if bare.startswith(prefix)), "other")
            parts[part] += int(size)
        return dict(parts)
    finally:
        conn.close()


def ledger_used(path: Path) -> int:
    conn = ledger.connect_readonly(path)
    try:
        return ledger.used_bytes(conn)
    finally:
        conn.close()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


class Watch:
    """The collector process from outside: RSS (itself and any children) each second, CPU."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def rss(self) -> int:
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return int(total)

    def cpu(self) -> float:
        total = sum(self.proc.cpu_times()[:2])
        for child in self.proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return float(total)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.last = self.rss()
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, self.last)

    def __enter__(self) -> Watch:
        self.last = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run_fleet(nodes: int, batches: int, period: float, profiles: list[Profile], seed: int, t0_ms: int,
              senders: int, procs: int, workdir: Path, say: Callable[[str], None],
              scrape_interval: float = 0.0, scrape_timeout: float = 10.0) -> RunFigures:
    """Enroll `nodes`, start a fresh collector, send every batch on schedule while /metrics
    is scraped every `scrape_interval` seconds (0: never), measure."""
    period_ms = int(period * 1000)
    fig = RunFigures(nodes, profiles[0].payloads[0].series_count, period, batches, nodes * batches,
                     scrape_interval_s=scrape_interval, scrape_timeout_s=scrape_timeout)
    scraper: Scraper | None = None
    data_dir = workdir / f"collector-{nodes}"
    ledger_path = data_dir / LEDGER_FILE
    fig.enroll_s = enroll_fleet(data_dir, nodes, seed)
    say(f"enrolled {nodes} node keys in {fig.enroll_s:.1f} s")
    port = free_port()
    ctx = multiprocessing.get_context("fork")  # the profiles reach the senders without pickling
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    acked = ctx.Value("q", 0)
    procs = max(1, min(procs, nodes))
    with ExitStack() as stack:
        collector = stack.enter_context(process(
            [sys.executable, "-m", "collector", "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
            workdir / f"collector-{nodes}.log"))
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=120)
        workers = [ctx.Process(target=sender_main, name=f"sender-{k}", daemon=True, args=(
            port, list(range(k, nodes, procs)), nodes, period, profiles, seed, t0_ms, period_ms,
            max(1, senders // procs), ready, go, start_at, acked, results)) for k in range(procs)]
        for w in workers:
            w.start()
        stack.callback(_stop_workers, workers)
        fig.sign_s = max(ready.get(timeout=3600) for _ in workers)
        say(f"signed {nodes} x {batches} batches in {fig.sign_s:.1f} s ({procs} sender process(es))")
        fig.ledger_start = ledger_used(ledger_path)
        with Watch(collector.pid) as watch:
            cpu0 = watch.cpu()
            start_at.value = time.monotonic() + 1.0
            if scrape_interval > 0:
                scraper = stack.enter_context(Scraper(f"http://127.0.0.1:{port}/metrics", scrape_interval,
                                                      scrape_timeout, start_at.value))
            go.set()
            say(f"clock started: {nodes / period:.1f} requests/s for {batches * period:.0f} s"
                + (f", /metrics scraped every {scrape_interval:g} s" if scraper else ""))
            reports = _wait_reports(workers, results, acked, fig, ledger_path, start_at.value, say)
            if scraper is not None:
                scraper.stop()  # the run is over; a scrape in flight ends within its timeout
            fig.load_wall_s = time.monotonic() - start_at.value
            fig.collector_cpu_s = watch.cpu() - cpu0
            fig.ledger_end = ledger_used(ledger_path)
            fig.collector_rss_end = watch.rss()
            fig.collector_rss_peak = max(watch.peak, fig.collector_rss_end)
        fig.ledger_dir_end = dir_bytes(data_dir)
        fig.ledger_parts = ledger_parts(ledger_path)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/nodes", timeout=300) as resp:
            listed = json.loads(resp.read())
        ours = [n for n in listed if n["node"].startswith("node-")]
        fig.stored = sum(int(n["stored_batches"] or 0) for n in ours)
        fig.nodes_complete = sum(1 for n in ours if n["complete_through"] == batches)
    latency = [x for r in reports for x in r.latency_s]
    late = [x for r in reports for x in r.late_s]
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r.errors)
    if len(reports) < len(workers):
        errors["sender_lost"] += len(workers) - len(reports)
    fig.errors = dict(sorted(errors.items()))
    fig.acked = sum(r.acked for r in reports)
    fig.duplicates = sum(r.duplicates for r in reports)
    fig.sender_cpu_s = sum(r.load_cpu_s for r in reports)
    fig.p50_ms, fig.p99_ms = percentile(latency, 0.50) * 1000, percentile(latency, 0.99) * 1000
    fig.max_ms = max(latency, default=math.nan) * 1000
    fig.late_p99_ms = percentile(late, 0.99) * 1000
    slow = sorted((t, x) for r in reports for t, x in zip(r.sent_s, r.latency_s, strict=True)
                  if x * 1000 >= P99_TARGET_MS)
    fig.slow = len(slow)
    fig.slow_bursts = bursts(slow)
    fig.requests_per_s = fig.acked / fig.load_wall_s if fig.load_wall_s else 0.0
    _ledger_growth(fig)
    if fig.stored:
        fig.batch_growth_per_day = fig.ledger_parts.get("batches", 0) / fig.stored * fig.nodes * 86400 / fig.period_s
    fig.table_bytes_per_node = fig.ledger_parts.get("series tables", 0) / fig.nodes
    if scraper is not None:
        _scrape_figures(fig, scraper, reports)
    return fig


def _scrape_figures(fig: RunFigures, scraper: Scraper, reports: list[SenderReport]) -> None:
    fig.scrapes = len(scraper.durations)
    fig.scrape_p50_ms = percentile(scraper.durations, 0.50) * 1000
    fig.scrape_max_ms = max(scraper.durations, default=math.nan) * 1000
    fig.scrape_errors = dict(sorted(scraper.errors.items()))
    if scraper.last_body:
        body = read_body(scraper.last_body)
        fig.scrape_body_bytes, fig.scrape_samples = body.size, body.samples
        fig.scrape_fleet_series, fig.scrape_fleet_series_reported = body.fleet_series, body.fleet_series_reported
    during, outside = [], []
    for r in reports:
        for sent, latency in zip(r.sent_s, r.latency_s, strict=True):
            (during if overlaps_scrape(scraper.windows, sent, sent + latency) else outside).append(latency)
    fig.acks_during_scrape = len(during)
    fig.p99_during_scrape_ms = percentile(during, 0.99) * 1000
    fig.p99_outside_scrape_ms = percentile(outside, 0.99) * 1000


def overlaps_scrape(windows: list[tuple[float, float]], start: float, end: float) -> bool:
    """Whether [start, end] meets one of the scrapes' windows (in order, one after another)."""
    i = bisect.bisect_left(windows, (end, math.inf))
    return i > 0 and windows[i - 1][1] >= start


def _wait_reports(workers: list[Any], results: Any, acked: Any, fig: RunFigures, ledger_path: Path,
                  start: float, say: Callable[[str], None]) -> list[SenderReport]:
    """Sender reports as they come, with a progress line a minute and the ledger's size once
    every node's first batch (the one that carries its table) is in."""
    reports: list[SenderReport] = []
    deadline = start + fig.batches_per_node * fig.period_s + ATTEMPTS * (REQUEST_TIMEOUT_S + 5) + 120
    next_line = start + 60
    while len(reports) < len(workers) and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=0.5))
        except Exception:  # queue.Empty; a sender that died is noticed below
            if not any(w.is_alive() for w in workers) and results.empty():
                break
        done = acked.value
        if not fig.ledger_after_first and done >= fig.nodes:
            fig.ledger_after_first = ledger_used(ledger_path)
            fig.acked_after_first = done
        if time.monotonic() >= next_line:
            say(f"  {time.monotonic() - start:5.0f} s: {done}/{fig.expected} batches acknowledged")
            next_line += 60
    return reports


def _ledger_growth(fig: RunFigures) -> None:
    """Bytes the whole ledger grew per day at this fleet's rate, over the batches after every
    node's first (which also stored the node's table, once). Latest-state saves are in it:
    they grow the ledger until every series has a row, then rewrite rows in place."""
    steady = fig.ledger_end - (fig.ledger_after_first or fig.ledger_start)
    batches = fig.acked - fig.acked_after_first
    if batches <= 0:  # a run of one batch per node: only the first round to go by
        steady, batches = fig.ledger_end - fig.ledger_start, fig.acked
    per_batch = steady / batches if batches else 0.0
    fig.ledger_growth_per_day = per_batch * fig.nodes * 86400 / fig.period_s


def _stop_workers(workers: list[Any]) -> None:
    for w in workers:
        w.join(10)
        if w.is_alive():
            w.terminate()
            w.join(5)


# ---------------------------------------------------------------- report


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _slow_line(fig: RunFigures) -> str:
    if not fig.slow:
        return "none"
    shown = ", ".join(f"{t:.0f} s ({int(n)}, max {m:.0f} ms)" for t, n, m in fig.slow_bursts[:8])
    more = f" and {len(fig.slow_bursts) - 8} more" if len(fig.slow_bursts) > 8 else ""
    return (f"{fig.slow} ({fig.slow / max(fig.acked, 1):.1%}) in {len(fig.slow_bursts)} burst(s), sent at: "
            f"{shown}{more}")


def _scrape_rows(fig: RunFigures) -> list[tuple[str, str]]:
    if not fig.scrape_interval_s:
        return [("scrapes of /metrics", "off (--scrape-interval 0)")]
    reported = ("not in the body" if fig.scrape_fleet_series_reported is None
                else f"{fig.scrape_fleet_series_reported:,}")
    body = (f"{mb(fig.scrape_body_bytes)}: {fig.scrape_fleet_series:,} fleet series "
            f"(waystation_exposition_fleet_series {reported}), {fig.scrape_samples:,} samples"
            if fig.scrapes else "none (no scrape answered)")
    return [
        ("scrapes of /metrics", f"{fig.scrapes} (every {fig.scrape_interval_s:g} s, timeout "
                                f"{fig.scrape_timeout_s:g} s); duration p50 {fig.scrape_p50_ms:.1f} ms, "
                                f"max {fig.scrape_max_ms:.1f} ms"),
        ("last scrape body", body),
        ("scrape errors", ", ".join(f"{k} {v}" for k, v in fig.scrape_errors.items()) or "none"),
        ("ack latency p99 during a scrape / outside", f"{fig.p99_during_scrape_ms:.1f} ms "
                                                      f"({fig.acks_during_scrape} acks) / "
                                                      f"{fig.p99_outside_scrape_ms:.1f} ms "
                                                      f"({fig.acked - fig.acks_during_scrape})"),
    ]


def print_run(fig: RunFigures) -> None:
    errors = ", ".join(f"{k} {v}" for k, v in fig.errors.items()) or "none"
    rows = [
        ("fleet", f"{fig.nodes} nodes x {fig.series} series, a batch per node every {fig.period_s:g} s, "
                  f"{fig.batches_per_node} batches each"),
        ("requests / s (acked / load wall time)", f"{fig.requests_per_s:,.1f} ({fig.load_wall_s:.0f} s)"),
        ("ack latency p50", f"{fig.p50_ms:.1f} ms"),
        ("ack latency p99", f"{fig.p99_ms:.1f} ms   (target < {P99_TARGET_MS:.0f} ms: "
                            f"{'met' if fig.p99_ms < P99_TARGET_MS else 'NOT met'})"),
        ("ack latency max", f"{fig.max_ms:.1f} ms"),
        ("errors", errors),
        (f"acks over {P99_TARGET_MS:.0f} ms", _slow_line(fig)),
        *_scrape_rows(fig),
        ("batches acknowledged", f"{fig.acked}/{fig.expected} ({fig.duplicates} as duplicate)"),
        ("batches stored in the ledger (/v1/nodes)", f"{fig.stored}/{fig.expected}; nodes complete through their last "
                                                      f"seq {fig.nodes_complete}/{fig.nodes}"),
        ("collector RSS peak / at end", f"{mb(fig.collector_rss_peak)} / {mb(fig.collector_rss_end)}"),
        ("collector CPU", f"{fig.collector_cpu_s:.1f} s = "
                          f"{fig.collector_cpu_s / max(fig.load_wall_s, 1e-9):.2f} cores"),
        ("ledger growth per day, whole ledger, this run", f"{fig.ledger_growth_per_day / 1e9:,.2f} GB"),
        ("ledger growth per day, batches (long run)", f"{fig.batch_growth_per_day / 1e9:,.2f} GB "
                                                      f"(x 30 days' default retention: "
                                                      f"{fig.batch_growth_per_day * 30 / 1e9:,.1f} GB)"),
        ("ledger at the end, by part", ", ".join(f"{k} {mb(v)}" for k, v in sorted(fig.ledger_parts.items()))),
        ("ledger used bytes start / end (dir on disk)", f"{mb(fig.ledger_start)} / {mb(fig.ledger_end)} "
                                                        f"({mb(fig.ledger_dir_end)})"),
        ("series table stored per node (once)", f"{fig.table_bytes_per_node:,.0f} B"),
        ("sender: CPU in the load / late to send p99", f"{fig.sender_cpu_s:.1f} s = "
                                                       f"{fig.sender_cpu_s / max(fig.load_wall_s, 1e-9):.2f} cores"
                                                       f" / {fig.late_p99_ms:.1f} ms"),
    ]
    for title, value in rows:
        print(f"  {title:<48}{value}")
    total_series = fig.nodes * fig.series
    if total_series > LimitsConfig().max_series_total:
        print(f"  (the fleet has {total_series:,} series; /metrics exposes at most limits.max_series_total = "
              f"{LimitsConfig().max_series_total:,} by default and counts the rest)")
    if fig.late_p99_ms > 50:
        print("  the sender fell behind its schedule: these latencies may be the sender's; try more --procs")
    print("summary: " + json.dumps(fig.summary(), sort_keys=True), flush=True)


def step_ladder(start: int, stop: int) -> list[int]:
    """start, then 1-2-5 steps (100, 200, 500, 1k, 2k ...) up to stop, stop included."""
    out = [start]
    decade = 10 ** int(math.log10(start))
    while out[-1] < stop and len(out) < 64:
        decade_steps = [m * decade for m in (1, 2, 5)] + [10 * decade]
        nxt = next((s for s in decade_steps if s > out[-1]), None)
        if nxt is None:
            decade *= 10
            continue
        out.append(min(nxt, stop))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000, help="fleet size (with --step: the largest step)")
    ap.add_argument("--series", type=int, default=1000, help="series per node (one point each per batch)")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the fleet sends")
    ap.add_argument("--period", type=float, default=60.0, help="seconds between a node's batches (agent default 60)")
    ap.add_argument("--senders", type=int, default=64, help="concurrent connections, all sender processes together")
    ap.add_argument("--procs", type=int, default=1, help="sender processes")
    ap.add_argument("--profiles", type=int, default=100, help="distinct series profiles the nodes share")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--step", action="store_true", help="find the largest fleet with p99 under the target")
    ap.add_argument("--step-from", type=int, default=100, help="the first step's node count")
    ap.add_argument("--step-minutes", type=float, default=3.0, help="how long each step sends")
    ap.add_argument("--scrape-interval", type=float, default=15.0,
                    help="seconds between GETs of /metrics while the fleet sends, as Prometheus scrapes (0: none)")
    ap.add_argument("--scrape-timeout", type=float, default=10.0,
                    help="a scrape not answered whole within this many seconds counts as a timeout "
                         "(Prometheus' default scrape_timeout)")
    args = ap.parse_args()
    if min(args.nodes, args.series, args.senders, args.procs, args.profiles, args.step_from) < 1:
        ap.error("--nodes, --series, --senders, --procs, --profiles and --step-from must be at least 1")
    if args.scrape_interval < 0 or args.scrape_timeout <= 0:
        ap.error("--scrape-interval must be 0 or more and --scrape-timeout more than 0")
    minutes = args.step_minutes if args.step else args.minutes
    batches = max(1, round(minutes * 60 / args.period))
    period_ms = int(args.period * 1000)
    t0_ms = (int(time.time() * 1000) // period_ms - batches - 1) * period_ms
    n_profiles = min(args.profiles, args.nodes)

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"fleet load: up to {args.nodes} nodes x {args.series} series, {batches} batches per node, "
        f"one every {args.period:g} s; seed {args.seed}")
    t = time.monotonic()
    with multiprocessing.get_context("fork").Pool(min(n_profiles, psutil.cpu_count() or 1)) as pool:
        profiles = pool.map(build_profile, [(p, args.series, batches, period_ms, t0_ms, args.seed)
                                            for p in range(n_profiles)])
    say(f"preparation (before the clock): {n_profiles} series profiles x {batches} payloads encoded in "
        f"{time.monotonic() - t:.1f} s wall; table {len(profiles[0].table):,} B, payload "
        f"{len(profiles[0].payloads[-1].payload):,} B compressed "
        f"({profiles[0].payloads[-1].raw_len:,} B raw)")
    with tempfile.TemporaryDirectory(prefix="ws-fleet-") as tmp:
        workdir = Path(tmp)
        if not args.step:
            fig = run_fleet(args.nodes, batches, args.period, profiles, args.seed, t0_ms, args.senders, args.procs,
                            workdir, say, args.scrape_interval, args.scrape_timeout)
            print()
            print_run(fig)
            return 0
        held: RunFigures | None = None
        for n in step_ladder(min(args.step_from, args.nodes), args.nodes):
            say(f"\n== step: {n} nodes")
            fig = run_fleet(n, batches, args.period, profiles, args.seed, t0_ms, args.senders, args.procs,
                            workdir, say, args.scrape_interval, args.scrape_timeout)
            print_run(fig)
            if not fig.ok or not fig.p99_ms < P99_TARGET_MS:
                print(f"\nstopped at {n} nodes: p99 {fig.p99_ms:.1f} ms, errors "
                      f"{sum(fig.errors.values())}, scrape errors {sum(fig.scrape_errors.values())}, "
                      f"acked {fig.acked}/{fig.expected}")
                break
            held = fig
            shutil.rmtree(workdir / f"collector-{n}")  # each step has its own; free the disk
        if held is None:
            print(f"\nlargest fleet under p99 {P99_TARGET_MS:.0f} ms: none (the first step failed)")
        else:
            print(f"\nlargest fleet under p99 {P99_TARGET_MS:.0f} ms with no errors: {held.nodes} nodes "
                  f"(p99 {held.p99_ms:.1f} ms, {held.requests_per_s:.0f} requests/s"
                  f"{'; the largest step tried' if held.nodes == args.nodes else ''})")
        print("step summary: " + json.dumps({"largest_nodes": held.nodes if held else 0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
