"""Forwarding the ledger's history to Prometheus remote-write receivers, original timestamps.

The forwarder runs as a child process of `serve` (`python -m collector.remote_write`, its
configuration as one JSON line on stdin), so a slow or dead receiver, and the CPU that
encoding costs, never slow ingest or acks: the two only share the ledger file.

Positions: each target holds a set of batch row ids (the ledger's arrival order) that it
has, saved in the ledger's forward_targets table about once a second. A restart resumes
from the saved set; what was sent after the last save is sent again, with identical
samples (Prometheus drops identical resends; VictoriaMetrics needs -dedup.minScrapeInterval).

Order: new arrivals go first, newest first (dashboards are fresh after an outage), and the
backlog fills in oldest first behind them, one request each in turn.

Receiver replies (remote-write 1.0): 2xx done; 429 and 5xx retried with backoff, honouring
Retry-After; other 4xx refused for good, counted per reason, and the position moves on.
Two deviations, both to lose nothing and wedge nothing: a 5xx whose body names a
sample-level refusal (Prometheus before 2.50 answers "too old sample" with 500) is a
refusal, and 401/403/404/405/407/408 are the target's configuration, not the batch's:
retried until fixed. A refused request of several batches is resent batch by batch, so a
refusal costs only the batch that caused it.

Thread contract (child): the event loop runs one task per target (HTTP); everything that
touches SQLite, decodes or encodes runs in the single `work` thread, which owns the
connection. In `serve`, `Supervisor` runs on the event loop and `ForwardingMetrics.collect`
reads the ledger through the caller's connection.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import logging
import math
import os
import random
import re
import signal
import sqlite3
import ssl
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import numpy.typing as npt
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import wire
from collector import keyring, trust
from collector import ledger as ledger_mod
from collector import remote_write_proto as proto
from collector.config import RemoteWriteConfig
from collector.exposition import RESERVED_PREFIXES
from collector.ledger import IntervalSet
from collector.tables import LedgerTables
from wire.malloc import tune_malloc

if TYPE_CHECKING:
    from wire.columns_np import Columns

log = logging.getLogger(__name__)

USER_AGENT = "waystation-collector/0.1"
SAVE_EVERY_S = 1.0
IDLE_POLL_S = 0.2
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 300.0
ENCODED_CACHE_BATCHES = 256
LABEL_CACHE_MAX = 1_000_000
# Wire v2 tables' encoded labels (Encoder.labels_of): in tables, and in bytes (about what a
# million series of v1's LABEL_CACHE_MAX cost).
LABEL_TABLES_MAX = 4096
LABEL_TABLE_BYTES_MAX = 256 << 20
ROWS_PER_PICK = 256

# Bodies of 5xx answers that name a sample the receiver will never take (Prometheus < 2.50
# answers these with 500; 2.50+ with 400): no retry can land them.
PERMANENT_BODIES = (
    ("too old sample", "too_old"),
    ("out of bounds", "out_of_bounds"),
    ("out of order sample", "out_of_order"),
    ("duplicate sample for timestamp", "duplicate"),
)
# 4xx answers about the target's configuration (auth, URL, proxy), not about the batch:
# skipping would throw away everything until someone fixes the config, so they are retried.
TARGET_STATUSES = frozenset({401, 403, 404, 405, 407, 408})


def classify(status: int, body: str) -> tuple[str, str]:
    """("ok" | "retry" | "refused" | "split", reason) for a receiver's answer."""
    if 200 <= status < 300:
        return "ok", ""
    lowered = body.lower()
    named = next((reason for text, reason in PERMANENT_BODIES if text in lowered), None)
    if status == 429:
        return "retry", "http_429"
    if status == 413:
        return "split", "too_large"
    if status >= 500:
        return ("refused", named) if named else ("retry", "http_5xx")
    if status in TARGET_STATUSES:
        return "retry", f"http_{status}"
    if 400 <= status < 500:
        return "refused", named or ("bad_request" if status == 400 else f"http_{status}")
    return "retry", f"http_{status}"


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


class NameFilter:
    """include/exclude metric-name regexes, whole-name match; cached per name."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        self.include = re.compile("|".join(f"(?:{p})" for p in include)) if include else None
        self.exclude = re.compile("|".join(f"(?:{p})" for p in exclude)) if exclude else None
        self._cache: dict[str, bool] = {}

    @property
    def passes_all(self) -> bool:
        return self.include is None and self.exclude is None

    def __call__(self, name: str) -> bool:
        ok = self._cache.get(name)
        if ok is None:
            ok = (self.include is None or self.include.fullmatch(name) is not None) and (
                self.exclude is None or self.exclude.fullmatch(name) is None
            )
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[name] = ok
        return ok


# ---------------------------------------------------------------- the ledger side (work thread)


@dataclass
class TargetState:
    """One target's durable position and counters (a row of forward_targets)."""

    done: IntervalSet = field(default_factory=IntervalSet)
    samples_sent: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    last_success: float | None = None
    pending_batches: int = 0
    oldest_pending_ms: int | None = None


def load_target(conn: sqlite3.Connection, name: str) -> TargetState:
    row = conn.execute(
        "SELECT done, samples_sent, refused, retries, last_success FROM forward_targets WHERE target = ?", (name,)
    ).fetchone()
    state = TargetState()
    if row is not None:
        state.done = IntervalSet.from_json(row[0])
        state.samples_sent = int(row[1])
        state.refused = {str(k): int(v) for k, v in json.loads(row[2]).items()}
        state.retries = {str(k): int(v) for k, v in json.loads(row[3]).items()}
        state.last_success = row[4]
    oldest, newest = conn.execute("SELECT MIN(rowid), MAX(rowid) FROM batches").fetchone()
    if state.done.ends and state.done.ends[-1] > (newest or 0):
        # The positions name batches beyond the newest one: the row ids were renumbered (the
        # database rebuilt by hand, say). Sending everything again loses nothing.
        log.error("remote_write %s: saved position is beyond the ledger's newest batch; "
                  "forwarding everything the ledger holds again", name)
        state.done = IntervalSet()
    # Row ids below the oldest batch held were pruned: nothing is left to send there.
    if oldest is not None and oldest > 1:
        state.done.add(1, oldest - 1)
    return state


def save_target(conn: sqlite3.Connection, name: str, state: TargetState, now: float) -> None:
    with ledger_mod.immediate(conn):
        conn.execute(
            "INSERT INTO forward_targets (target, done, samples_sent, refused, retries, last_success, "
            "pending_batches, oldest_pending_ms, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (target) DO UPDATE SET done = excluded.done, samples_sent = excluded.samples_sent, "
            "refused = excluded.refused, retries = excluded.retries, last_success = excluded.last_success, "
            "pending_batches = excluded.pending_batches, oldest_pending_ms = excluded.oldest_pending_ms, "
            "updated_at = excluded.updated_at",
            (
                name, state.done.to_json(), state.samples_sent, json.dumps(state.refused), json.dumps(state.retries),
                state.last_success, state.pending_batches, state.oldest_pending_ms, now,
            ),
        )


def pending_stats(conn: sqlite3.Connection, done: IntervalSet) -> tuple[int, int | None]:
    """(batches the target lacks, window start of the oldest sample among them), cheaply.

    Row ids are dense above the oldest batch held (pruning removes from the bottom), so the
    count is interval arithmetic, not a scan of a backlog that may hold millions of batches.
    The oldest sample is looked for among the first batches of each gap: the backlog is in
    arrival order, and a backfill arriving late is found within the first rows of its gap."""
    oldest_row, top = conn.execute("SELECT MIN(rowid), MAX(rowid) FROM batches").fetchone()
    if top is None:
        return 0, None
    count = 0
    oldest: int | None = None
    for i, (first, last) in enumerate(done.gaps(top, 100_000)):
        first = max(first, oldest_row)
        if first > last:
            continue
        count += last - first + 1
        if i < 100:
            (start,) = conn.execute(
                "SELECT MIN(window_start_ms) FROM (SELECT window_start_ms FROM batches "
                "WHERE rowid BETWEEN ? AND ? AND kind = ? ORDER BY rowid LIMIT ?)",
                (first, last, int(wire.Kind.DATA), 1000 if i == 0 else 10),
            ).fetchone()
            if start is not None and (oldest is None or start < oldest):
                oldest = start
    return count, oldest


@dataclass(frozen=True)
class Row:
    rowid: int
    kind: int
    samples: int


MAX_FRAGMENTS = 256


def pick(
    conn: sqlite3.Connection, done: IntervalSet, budget: int, live: bool,
    skipped: list[tuple[int, int]] | None = None,
) -> tuple[list[Row], bool]:
    """The next batches to send: (rows, whether they are new arrivals).

    New arrivals (above everything the target has) go newest first when `live`, or when
    there is no backlog; otherwise the oldest part of the backlog. Row ids with no batch
    (pruned) inside the backlog are marked done on the way, and appended to `skipped`.
    While the target's set is fragmented (each live pick past a backlog can open a gap),
    the backlog goes first until it closes the gaps."""
    top_done = done.ends[-1] if done.ends else 0
    newest = conn.execute("SELECT MAX(rowid) FROM batches").fetchone()[0] or 0
    live = live and len(done.starts) < MAX_FRAGMENTS
    while True:
        gaps = done.gaps(top_done, 1)
        if newest > top_done and (live or not gaps):
            rows = conn.execute(
                "SELECT rowid, kind, sample_count FROM batches WHERE rowid > ? ORDER BY rowid DESC LIMIT ?",
                (top_done, ROWS_PER_PICK),
            ).fetchall()
            return _within(rows, budget), True
        if not gaps:
            return [], False
        first, last = gaps[0]
        rows = conn.execute(
            "SELECT rowid, kind, sample_count FROM batches WHERE rowid BETWEEN ? AND ? ORDER BY rowid LIMIT ?",
            (first, last, ROWS_PER_PICK),
        ).fetchall()
        if rows:
            return _within(rows, budget), False
        done.add(first, last)
        if skipped is not None:
            skipped.append((first, last))


def _within(rows: list[tuple[int, int, int]], budget: int) -> list[Row]:
    out: list[Row] = []
    total = 0
    for rowid, kind, samples in rows:
        if out and total + samples > budget:
            break
        out.append(Row(rowid, kind, samples))
        total += samples
    return out


@dataclass
class Encoded:
    """One batch as remote-write timeseries fields: (metric name, field bytes, samples)."""

    rowid: int
    series: list[tuple[str, bytes, int]]
    problem: str = ""  # the batch no longer opens (it is counted as refused, never sent)
    reserved: int = 0  # samples under the collector's own names: never forwarded, counted


def merged_labels(site: str, node: str, name: str, labels: tuple[tuple[str, str], ...]) -> bytes:
    """A series' labels as forwarded: its own but site and node, then __name__, and site and
    node from the verified header (which win over any the batch carries), sorted by name as
    remote write requires; encoded."""
    merged = {k: v for k, v in labels if k not in ("site", "node")}
    merged["__name__"] = name
    merged["site"] = site
    merged["node"] = node
    return proto.encode_labels(sorted(merged.items()))


@dataclass(frozen=True, eq=False)
class TableLabels:
    """One series table (wire v2) as forwarded for one node, by table index: each series'
    name, whether the name is the collector's own (never forwarded), and its labels as
    `merged_labels` encodes them, `blob[starts[i]:ends[i]]` (empty for reserved names)."""

    names: list[str]
    reserved: npt.NDArray[np.bool_]
    blob: bytes
    starts: npt.NDArray[np.int64]
    ends: npt.NDArray[np.int64]

    @classmethod
    def build(cls, table: wire.SeriesTable, site: str, node: str) -> TableLabels:
        reserved = [name.startswith(RESERVED_PREFIXES) for name in table.names]
        encoded = [b"" if r else merged_labels(site, node, name, labels)
                   for name, labels, r in zip(table.names, table.labels, reserved, strict=True)]
        bounds = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=bounds[1:])
        return cls(table.names, np.array(reserved, dtype=np.bool_), b"".join(encoded), bounds[:-1], bounds[1:])

    @property
    def nbytes(self) -> int:
        """About what holding it costs: the labels, the arrays and the name list's pointers."""
        return len(self.blob) + 25 * len(self.names)


class Encoder:
    """Opens stored batches through wire.open_batch and encodes them; shared by all targets.

    Labels are `merged_labels`, encoded once per series and node and reused: for wire v1
    per (site, node, name, labels), for a v2 table once per (table, site, node) for all its
    series. A v2 batch is encoded from its columns with array operations
    (`proto.encode_timeseries_columns`): no Python step per series but the cut into its
    field and the (name, field, samples) tuple that requests_for takes."""

    def __init__(
        self, conn: sqlite3.Connection, limits: wire.OpenLimits, sealing_keys: wire.SealingKeys | None = None
    ) -> None:
        self.conn = conn
        self.limits = limits
        self.sealing_keys = sealing_keys
        self.keys = partial(trust.lookup_recorded, conn)
        self.tables = wire.SeriesTables()
        self.series_tables = LedgerTables(conn, limits, sealing_keys)  # v2 batches' tables, from the ledger
        self.labels: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], bytes] = {}
        self.table_labels: OrderedDict[tuple[bytes, str, str], TableLabels] = OrderedDict()
        self.table_label_bytes = 0  # TableLabels.nbytes of every entry in table_labels
        self.cache: OrderedDict[int, Encoded] = OrderedDict()

    def encoded(self, rowid: int) -> Encoded:
        hit = self.cache.get(rowid)
        if hit is not None:
            self.cache.move_to_end(rowid)
            return hit
        row = self.conn.execute("SELECT frame FROM batches WHERE rowid = ?", (rowid,)).fetchone()
        if row is None:
            enc = Encoded(rowid, [])  # pruned meanwhile
        else:
            enc = self._encode(rowid, bytes(row[0]))
        self.cache[rowid] = enc
        while len(self.cache) > ENCODED_CACHE_BATCHES:
            self.cache.popitem(last=False)
        return enc

    def _encode(self, rowid: int, frame: bytes) -> Encoded:
        opened = wire.open_batch(frame, self.keys, self.limits, self.tables, sealing_keys=self.sealing_keys,
                                 series_tables=self.series_tables, as_series=False)
        if isinstance(opened, wire.Refusal):
            return Encoded(rowid, [], f"{opened.result}: {opened.detail}")
        h = opened.header
        if opened.columns is not None and opened.table is not None:
            return self.encode_columns(rowid, h.site, h.node, opened.table, opened.columns)
        return self.encode_series(rowid, h.site, h.node, opened.series)

    def encode_series(self, rowid: int, site: str, node: str, series: list[wire.Series]) -> Encoded:
        """A batch given as wire.Series (v1), one series at a time."""
        labels_cache = self.labels
        if len(labels_cache) > LABEL_CACHE_MAX:
            labels_cache.clear()
        out: list[tuple[str, bytes, int]] = []
        reserved = 0
        for s in series:
            if s.name.startswith(RESERVED_PREFIXES):  # a node must not speak for the collector
                reserved += len(s.values)
                continue
            key = (site, node, s.name, s.labels)
            encoded_labels = labels_cache.get(key)
            if encoded_labels is None:
                encoded_labels = labels_cache[key] = merged_labels(site, node, s.name, s.labels)
            out.append((s.name, proto.encode_timeseries(encoded_labels, s.timestamps_ms, s.values), len(s.values)))
        return Encoded(rowid, out, reserved=reserved)

    def encode_columns(self, rowid: int, site: str, node: str, table: wire.SeriesTable, columns: Columns) -> Encoded:
        """A v2 batch from its columns: the same fields, byte for byte, as `encode_series`
        gives for the same series, made by array operations."""
        labels = self.labels_of(table, site, node)
        index, starts = columns.index, columns.starts
        timestamps, values = columns.timestamps_ms, columns.values
        counts = np.diff(starts)
        is_reserved = labels.reserved[index]
        reserved = 0
        if is_reserved.any():  # a node must not speak for the collector
            reserved = int(counts[is_reserved].sum())
            kept = ~is_reserved
            points_kept = np.repeat(kept, counts)
            timestamps, values = timestamps[points_kept], values[points_kept]
            index, counts = index[kept], counts[kept]
            starts = np.zeros(index.size + 1, dtype=np.int64)
            np.cumsum(counts, out=starts[1:])
        fields = proto.encode_timeseries_columns(labels.blob, labels.starts[index], labels.ends[index], starts,
                                                 timestamps, values)
        # Indices rise without repeats, so a batch of as many series as its table has them all.
        names = labels.names if index.size == len(labels.names) else [labels.names[i] for i in index.tolist()]
        counts_list: list[int] = counts.tolist()
        return Encoded(rowid, list(zip(names, fields, counts_list, strict=True)), reserved=reserved)

    def labels_of(self, table: wire.SeriesTable, site: str, node: str) -> TableLabels:
        """The table's labels as forwarded for this node: cached, the least recently used
        going first beyond LABEL_TABLES_MAX tables or LABEL_TABLE_BYTES_MAX bytes."""
        key = (table.id, site, node)
        cache = self.table_labels
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        built = cache[key] = TableLabels.build(table, site, node)
        self.table_label_bytes += built.nbytes
        # The entry just added stays, whatever its size: its batch is being encoded.
        while len(cache) > 1 and (len(cache) > LABEL_TABLES_MAX or self.table_label_bytes > LABEL_TABLE_BYTES_MAX):
            self.table_label_bytes -= cache.popitem(last=False)[1].nbytes
        return built


# ---------------------------------------------------------------- the HTTP side


@dataclass
class Request:
    series: list[tuple[int, bytes, int]] = field(default_factory=list)  # (batch rowid, field, samples)

    @property
    def samples(self) -> int:
        return sum(n for _, _, n in self.series)


def requests_for(batches: list[Encoded], keep: Callable[[str], bool], budget: int) -> list[Request]:
    """Cut the batches' series into requests of about `budget` samples each."""
    out: list[Request] = []
    current = Request()
    total = 0
    for enc in batches:
        for name, series, samples in enc.series:
            if not keep(name):
                continue
            if current.series and total + samples > budget:
                out.append(current)
                current, total = Request(), 0
            current.series.append((enc.rowid, series, samples))
            total += samples
    if current.series:
        out.append(current)
    return out


def split(request: Request, verdict: str) -> list[Request]:
    """A refused request again in smaller parts, so a refusal costs only what caused it:
    its own series batch by batch; and a request too large for the receiver (413) in halves."""
    by_batch: dict[int, Request] = {}
    for item in request.series:
        by_batch.setdefault(item[0], Request()).series.append(item)
    if len(by_batch) > 1:
        return list(by_batch.values())
    if verdict == "split" and len(request.series) > 1:
        half = len(request.series) // 2
        return [Request(request.series[:half]), Request(request.series[half:])]
    return []


@dataclass
class Chunk:
    """Batches picked together: their requests, ready to send, and any that no longer open."""

    rows: list[Row]
    requests: list[tuple[Request, bytes]]
    problems: list[tuple[Encoded, int]]
    skipped: list[tuple[int, int]]  # row ids with no batch left (pruned): done as well


def _body(request: Request) -> bytes:
    return proto.compress(proto.encode_write_request([s for _, s, _ in request.series]))


class Target:
    """One receiver: its position, its HTTP client and its send loop."""

    def __init__(self, config: RemoteWriteConfig, forwarder: Forwarder) -> None:
        self.config = config
        self.name = config.name
        self.forwarder = forwarder
        self.filter = NameFilter(config.include, config.exclude)
        self.state = TargetState()
        self.logged_reasons: set[str] = set()
        self.prefer_live = True
        self.saved_at = 0.0
        self.session: aiohttp.ClientSession | None = None
        self._secret_at = -math.inf
        self._auth: str | None = None

    def keep(self, name: str) -> bool:
        return self.filter.passes_all or self.filter(name)

    def _ssl(self) -> ssl.SSLContext | None:
        c = self.config
        if not c.url.startswith("https://"):
            return None
        try:
            context = ssl.create_default_context(cafile=c.tls_ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"tls_ca_file {c.tls_ca_file!r}: {exc}") from None
        if c.tls_cert_file:
            try:
                context.load_cert_chain(c.tls_cert_file, c.tls_key_file)
            except (OSError, ssl.SSLError) as exc:
                raise OSError(f"tls_cert_file {c.tls_cert_file!r} / tls_key_file {c.tls_key_file!r}: {exc}") from None
        return context

    def _authorization(self) -> str | None:
        """Re-read secret files now and then, so a rotated token takes effect without a restart."""
        c = self.config
        now = time.monotonic()
        if now - self._secret_at < 60:
            return self._auth
        if c.bearer_token_file:
            self._auth = "Bearer " + Path(c.bearer_token_file).read_text().strip()
        elif c.basic_auth_username:
            password = Path(c.basic_auth_password_file).read_text().strip() if c.basic_auth_password_file else ""
            raw = f"{c.basic_auth_username}:{password}".encode()
            self._auth = "Basic " + base64.b64encode(raw).decode("ascii")
        self._secret_at = now
        return self._auth

    async def run(self) -> None:
        """Forward until the forwarder stops. A problem of this target's own (a CA file gone,
        a token file unreadable, the ledger briefly unreadable) holds this target back and is
        retried; the other targets go on."""
        fw = self.forwarder
        delay = 1.0
        loaded = False
        while not fw.stopping.is_set():
            try:
                if not loaded:
                    self.state = await fw.work(load_target, fw.conn, self.name)
                    loaded = True
                await self._forward()
                return
            except Exception as exc:
                self.state.retries["config"] = self.state.retries.get("config", 0) + 1
                log.error("remote_write %s: %s; trying again in %.0fs", self.name, exc, delay)
                if loaded:  # its figures (pending, the problem counted) still reach /metrics
                    await asyncio.gather(fw.work(self._save, time.time()), return_exceptions=True)
                await fw.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _forward(self) -> None:
        fw = self.forwarder
        connector = aiohttp.TCPConnector(ssl=self._ssl() or False, limit=4)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self.session = session
            # The next chunk is picked and encoded in the work thread while this one is on
            # the wire, so encoding and the receiver's work overlap instead of taking turns.
            upcoming: asyncio.Future[Chunk | None] | None = None
            try:
                while not fw.stopping.is_set():
                    chunk = await (upcoming or self._prepare_next(()))
                    upcoming = None
                    if chunk is None:
                        await self.maybe_save()
                        await fw.sleep(IDLE_POLL_S)
                        continue
                    upcoming = self._prepare_next(chunk.rows)
                    if not await self.send(chunk):
                        break  # stopping: these batches are sent again after the restart
                    for r in chunk.rows:
                        self.state.done.add(r.rowid, r.rowid)
                    for first, last in chunk.skipped:
                        self.state.done.add(first, last)
                    await self.maybe_save()
            finally:
                if upcoming is not None:
                    await asyncio.gather(upcoming, return_exceptions=True)
                await fw.work(self._save, time.time())

    def _prepare_next(self, in_flight: Sequence[Row]) -> asyncio.Future[Chunk | None]:
        view = self.state.done.copy()  # the work thread never sees the loop's own set
        for r in in_flight:
            view.add(r.rowid, r.rowid)
        return asyncio.ensure_future(self.forwarder.work(self.prepare, view))

    def prepare(self, view: IntervalSet) -> Chunk | None:
        """Work thread: the next batches, opened, encoded and cut into request bodies."""
        fw = self.forwarder
        skipped: list[tuple[int, int]] = []
        rows, live = pick(fw.conn, view, self.config.samples_per_request, self.prefer_live, skipped)
        if not rows:
            return Chunk([], [], [], skipped) if skipped else None
        self.prefer_live = not live
        batches = fw.encode_all([r.rowid for r in rows if r.kind == int(wire.Kind.DATA)])
        problems = [(enc, sum(r.samples for r in rows if r.rowid == enc.rowid)) for enc in batches if enc.problem]
        problems += [(enc, enc.reserved) for enc in batches if enc.reserved]
        requests = requests_for(batches, self.keep, self.config.samples_per_request)
        return Chunk(rows, [(req, _body(req)) for req in requests], problems, skipped)

    async def send(self, chunk: Chunk) -> bool:
        """Deliver every request of a chunk; False if the forwarder stops first."""
        for enc, samples in chunk.problems:
            if enc.problem:
                self.refuse("unreadable", samples, enc.problem)
            else:
                self.refuse("reserved_name", samples, "series under the collector's own waystation_* names")
        for request, body in chunk.requests:
            if not await self.deliver(request, body):
                return False
        return True

    async def deliver(self, request: Request, body: bytes | None = None) -> bool:
        """Send until the receiver takes or refuses it; False if the forwarder stops first."""
        fw = self.forwarder
        if body is None:
            body = await fw.work(_body, request)
        backoff = BACKOFF_INITIAL_S
        while not fw.stopping.is_set():
            verdict, reason, wait = await self.post(body)
            if verdict == "stopped":
                return False
            if verdict == "ok":
                self.state.samples_sent += request.samples
                self.state.last_success = time.time()
                return True
            if verdict in ("refused", "split"):
                parts = split(request, verdict)
                if not parts:
                    self.refuse(reason, request.samples, f"batch rowid {request.series[0][0]}")
                    return True
                for part in parts:
                    if not await self.deliver(part):
                        return False
                return True
            self.state.retries[reason] = self.state.retries.get(reason, 0) + 1
            # Retry-After is honoured as a lower bound: "0" or a date in the past must not
            # turn the retries into a tight loop against a struggling receiver.
            delay = max(wait or 0.0, backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            await fw.sleep(delay)
            await self.maybe_save()
        return False

    def refuse(self, reason: str, samples: int, detail: str) -> None:
        self.state.refused[reason] = self.state.refused.get(reason, 0) + max(samples, 0)
        if reason not in self.logged_reasons:
            self.logged_reasons.add(reason)
            log.warning("remote_write %s refused %d samples (%s): %s; moving on (logged once per reason)",
                        self.name, samples, reason, detail)

    async def post(self, body: bytes) -> tuple[str, str, float | None]:
        """One attempt; ("stopped", ...) if the forwarder stops while it is on the wire, so a
        stop never waits for a slow receiver's timeout."""
        attempt = asyncio.ensure_future(self._post_once(body))
        stop = asyncio.ensure_future(self.forwarder.stopping.wait())
        try:
            await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
            return "stopped", "", None
        return attempt.result()

    async def _post_once(self, body: bytes) -> tuple[str, str, float | None]:
        assert self.session is not None
        headers = {**proto.REMOTE_WRITE_HEADERS, "User-Agent": USER_AGENT, **self.config.headers}
        try:
            auth = self._authorization()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("remote_write %s: cannot read its secret file: %s", self.name, exc)
            return "retry", "config", None
        if auth:
            headers["Authorization"] = auth
        try:
            async with self.session.post(self.config.url, data=body, headers=headers) as resp:
                text = (await resp.content.read(4096)).decode("utf-8", "replace")
                verdict, reason = classify(resp.status, text)
                if verdict == "retry" and reason not in self.logged_reasons:
                    self.logged_reasons.add(reason)
                    log.warning("remote_write %s answered %d (%s); retrying with backoff (logged once per reason)",
                                self.name, resp.status, text.strip()[:200])
                return verdict, reason, retry_after_s(resp.headers.get("Retry-After"), time.time())
        except TimeoutError:
            return "retry", "timeout", None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            if "connection" not in self.logged_reasons:
                self.logged_reasons.add("connection")
                log.warning("remote_write %s unreachable (%s); retrying with backoff (logged once)", self.name, exc)
            return "retry", "connection", None

    async def maybe_save(self) -> None:
        now = time.monotonic()
        if now - self.saved_at >= SAVE_EVERY_S:
            self.saved_at = now
            await self.forwarder.work(self._save, time.time())

    def _save(self, now: float) -> None:
        conn = self.forwarder.conn
        self.state.pending_batches, self.state.oldest_pending_ms = pending_stats(conn, self.state.done)
        try:
            save_target(conn, self.name, self.state, now)
        except sqlite3.Error as exc:  # the position stays in memory; sent again at worst
            log.warning("remote_write %s: cannot save its position: %s", self.name, exc)


class Forwarder:
    """Every configured target's send loop over one ledger, in this (child) process."""

    def __init__(self, ledger_path: Path, targets: Sequence[RemoteWriteConfig], limits: wire.OpenLimits,
                 sealing_keys: wire.SealingKeys | None = None) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="work")
        self.conn = ledger_mod.connect(ledger_path, create=False)
        self.encoder = Encoder(self.conn, limits, sealing_keys)
        self.targets = [Target(c, self) for c in targets]
        self.stopping = asyncio.Event()

    async def work(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def encode_all(self, rowids: list[int]) -> list[Encoded]:
        return [self.encoder.encoded(r) for r in rowids]

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def run(self) -> None:
        try:
            await asyncio.gather(*(t.run() for t in self.targets))
        finally:
            self.pool.shutdown(wait=True)
            self.conn.close()


# ---------------------------------------------------------------- the child process


def child_config(ledger_path: Path, targets: Sequence[RemoteWriteConfig], limits: wire.OpenLimits,
                 log_level: str, key_files: Sequence[Path] = ()) -> bytes:
    """The one JSON line `serve` writes to the forwarder's stdin. The collector's sealing keys
    go as the paths of their files, never as key bytes: a pipe's contents are not a place
    for secrets, and the child reads the files with the same rights serve has."""
    return json.dumps({
        "ledger": str(ledger_path),
        "key_files": [str(p) for p in key_files],
        "log_level": log_level,
        "limits": {"max_decompressed_bytes": limits.max_decompressed_bytes, **asdict(limits.payload)},
        "targets": [asdict(t) for t in targets],
    }).encode() + b"\n"


def _targets_from(obj: dict[str, Any]) -> list[RemoteWriteConfig]:
    out = []
    for t in obj["targets"]:
        t = dict(t)
        t["include"], t["exclude"] = tuple(t["include"]), tuple(t["exclude"])
        out.append(RemoteWriteConfig(**t))
    return out


async def _child_main(obj: dict[str, Any]) -> None:
    limits = obj["limits"]
    open_limits = wire.OpenLimits(
        max_decompressed_bytes=limits.pop("max_decompressed_bytes"), payload=wire.Limits(**limits)
    )
    ledger_path = Path(obj["ledger"])
    loop = asyncio.get_running_loop()
    # A forwarder left by a serve that was killed may still be finishing: positions are
    # read after it has saved its own and gone, never beside it.
    lock = open(ledger_path.with_name(ledger_path.name + ".forwarder.lock"), "a+b")  # noqa: SIM115
    told = False
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not told:
                log.info("waiting for the previous forwarder to finish")
                told = True
            await asyncio.sleep(0.2)
    # A retired key file an operator deleted since serve listed it is skipped: deleting one
    # means nothing sealed to it is left to read.
    sealing_keys = keyring.load_sealing_keys([Path(p) for p in obj.get("key_files", [])], missing_ok=True)
    forwarder = Forwarder(ledger_path, _targets_from(obj), open_limits, sealing_keys)
    loop.add_signal_handler(signal.SIGTERM, forwarder.stopping.set)
    loop.add_signal_handler(signal.SIGINT, forwarder.stopping.set)
    # The parent holds our stdin open; EOF means it is gone (even after SIGKILL): stop.
    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            forwarder.stopping.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    await forwarder.run()


def main() -> int:
    line = sys.stdin.buffer.readline()
    try:
        obj = json.loads(line)
    except ValueError:
        print("waystation remote_write: expected the configuration as one JSON line on stdin", file=sys.stderr)
        return 2
    logging.basicConfig(level=obj.get("log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s forwarder: %(message)s")
    tune_malloc()
    asyncio.run(_child_main(obj))
    return 0


# ---------------------------------------------------------------- in serve


class Supervisor:
    """Runs the forwarder child, restarts it if it dies, stops it with serve."""

    def __init__(self, config_line: bytes) -> None:
        self.config_line = config_line
        self.restarts = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="forwarder-supervisor")

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "collector.remote_write", stdin=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(self.config_line)
        await proc.stdin.drain()
        return proc

    async def _run(self) -> None:
        delay = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                self.proc = await self._spawn()
                rc: int | None = await self.proc.wait()
            except OSError as exc:
                log.error("cannot start the remote_write forwarder: %s", exc)
                rc = None
            if time.monotonic() - started > 60:
                delay = 1.0
            # systemd signals the whole unit at a stop: give serve's own stop a moment to
            # land before this counts as a crash and starts another forwarder.
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self.restarts += 1
            log.error("remote_write forwarder exited %s; restarted", rc)
            delay = min(delay * 2, 30.0)

    async def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: the child saves its positions and exits
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class ForwardingMetrics(Collector):
    """Per-target forwarding and ledger retention figures, read from the ledger on scrape."""

    def __init__(self, conn: sqlite3.Connection, targets: Sequence[str],
                 restarts: Callable[[], int] = lambda: 0, clock: Callable[[], float] = time.time) -> None:
        self.conn = conn
        self.targets = list(targets)
        self.restarts = restarts
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        labels = ["target"]
        sent = CounterMetricFamily("waystation_remote_write_samples",
                                   "Samples the remote-write receiver accepted.", labels=labels)
        refused = CounterMetricFamily("waystation_remote_write_samples_refused",
                                      "Samples the receiver refused for good (not retried); the position moved on.",
                                      labels=["target", "reason"])
        retries = CounterMetricFamily("waystation_remote_write_retries",
                                      "Requests retried after a receiver error or timeout.",
                                      labels=["target", "reason"])
        pending = GaugeMetricFamily("waystation_remote_write_pending_batches",
                                    "Data batches in the ledger that the target does not have yet.", labels=labels)
        lag = GaugeMetricFamily("waystation_remote_write_lag_seconds",
                                "Age of the oldest sample the target does not have yet (0: none pending).",
                                labels=labels)
        success = GaugeMetricFamily("waystation_remote_write_last_success_timestamp_seconds",
                                    "When the receiver last accepted a request (Unix time).", labels=labels)
        expired_b = CounterMetricFamily("waystation_ledger_expired_unforwarded_batches",
                                        "Batches that left the ledger before this target had them.", labels=labels)
        expired_s = CounterMetricFamily("waystation_ledger_expired_unforwarded_samples",
                                        "Samples that left the ledger before this target had them.", labels=labels)
        now = self.clock()
        rows = {r[0]: r for r in self.conn.execute(
            "SELECT target, samples_sent, refused, retries, last_success, pending_batches, oldest_pending_ms "
            "FROM forward_targets")}
        gone = {r[0]: r for r in self.conn.execute("SELECT target, batches, samples FROM expired")}
        for t in self.targets:
            row = rows.get(t)
            sent.add_metric([t], row[1] if row else 0)
            for reason, n in (json.loads(row[2]) if row else {}).items():
                refused.add_metric([t, reason], n)
            for reason, n in (json.loads(row[3]) if row else {}).items():
                retries.add_metric([t, reason], n)
            if row is not None and row[4] is not None:
                success.add_metric([t], row[4])
            if row is not None:
                backlog, oldest = row[5], row[6]
            else:
                # No forwarder has saved this target's state yet (a target just added, a
                # forwarder that never lived through its first save): it has nothing.
                backlog, oldest = pending_stats(self.conn, IntervalSet())
            pending.add_metric([t], backlog)
            lag.add_metric([t], max(0.0, now - oldest / 1000) if oldest is not None else 0.0)
            g = gone.get(t)
            expired_b.add_metric([t], g[1] if g else 0)
            expired_s.add_metric([t], g[2] if g else 0)
        yield from (sent, refused, retries, pending, lag, success, expired_b, expired_s)
        yield CounterMetricFamily("waystation_remote_write_forwarder_restarts",
                                  "Times the forwarder process exited unexpectedly and was restarted.",
                                  value=self.restarts())
        pruned = self.conn.execute("SELECT v FROM meta WHERE k = 'pruned_batches'").fetchone()
        yield CounterMetricFamily("waystation_ledger_pruned_batches",
                                  "Batches removed from the ledger by retention or the size cap.",
                                  value=int(pruned[0]) if pruned else 0)
        yield GaugeMetricFamily("waystation_ledger_bytes", "The ledger database's size without free pages.",
                                value=ledger_mod.used_bytes(self.conn))


if __name__ == "__main__":
    sys.exit(main())
