"""The fleet's latest state and the prometheus_client collector that exposes it.

Thread contract: `FleetState` is touched only on the event loop (ingest handlers
apply accepted batches and ledger outcomes; the /metrics handler calls
`FleetCollector.collect` through a per-app `CollectorRegistry`, which also records what
each series last showed; the periodic state save takes the series due and renders them as
rows there, a chunk at a time).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

import wire
from collector.ledger import NodeState
from wire.columns_np import Columns
from wire.metric_help import help_of

BACKLOG_BATCHES = "waystation_agent_spool_pending_batches"
BACKLOG_BYTES = "waystation_agent_spool_pending_bytes"
# The collector's own families; a node's series with these prefixes would collide with them.
RESERVED_PREFIXES = (
    "waystation_node_",
    "waystation_ingest_",
    "waystation_exposition_",
    "waystation_collector_",
    "waystation_remote_write_",
    "waystation_ledger_",
)
# Series tables per node whose index -> entry slots are kept (the current one and the one
# before, while batches naming it still arrive).
TABLE_SLOTS = 2
FLEET_HELP = "Latest value reported by the fleet (via waystation-collector)."

Labels = tuple[tuple[str, str], ...]
# A saved series: (site, node, name, labels JSON as sent, type, ts_ms, value).
Row = tuple[str, str, str, str, int, int, float]
# A saved series' key: (site, node, name, labels JSON as sent).
RowKey = tuple[str, str, str, str]

# A fleet series is exposed with its own newest timestamp, so Prometheus stores it at the
# node's sample time and rate() is right. A series the node sends less often than this
# (SMART: every 10 min) would fall out of Prometheus' 5-minute lookback between reads and
# make SMART alerts with `for:` never fire: while the node keeps reporting, such a series
# is stamped at the node's floor instead (its value is still its newest): HOLD_MS behind
# the later of the node's newest sample and the collector's clock when that sample's batch
# arrived, never after the collector's clock. The arrival term makes the hold independent
# of the node's clock (a node running slow would otherwise push its held series, and past
# 5 min all of them, out of the lookback), and it moves only when batches arrive, so a
# dead node's series still leave the lookback. A held sample is then at most a flush
# interval + HOLD_MS + delivery old at any evaluation: under 300 s up to a 150 s flush.
HOLD_MS = 120_000
# After an outage the live batch lands first and a held series is exposed at the floor;
# a backfilled point may then change its value. Prometheus refuses a second value at a
# timestamp it stored (sample_duplicate_timestamp), so a value that changes while its
# timestamp would not move is exposed this much after the previous exposed timestamp.
BUMP_MS = 1


def reported_backlog(series: list[wire.Series]) -> tuple[float | None, float | None] | None:
    """The agent's spool backlog (batches, bytes) from its own series in a batch, if present."""
    batches = size = None
    for s in series:
        if s.name == BACKLOG_BATCHES:
            batches = s.values[-1]
        elif s.name == BACKLOG_BYTES:
            size = s.values[-1]
    if batches is None and size is None:
        return None
    return batches, size


def reported_backlog_columns(columns: Columns) -> tuple[float | None, float | None] | None:
    """reported_backlog for a v2 batch's columns: the same two series, found by table index
    (a table's indices of the two names are looked up once, then by binary search)."""
    table = columns.table
    wanted = _BACKLOG_INDICES.get(table.id)
    if wanted is None:
        if len(_BACKLOG_INDICES) >= 10_000:
            _BACKLOG_INDICES.clear()
        names = table.names
        wanted = _BACKLOG_INDICES[table.id] = tuple(
            tuple(i for i, n in enumerate(names) if n == name) for name in (BACKLOG_BATCHES, BACKLOG_BYTES))
    found: list[float | None] = [None, None]
    index = columns.index
    for slot, indices in enumerate(wanted):
        for i in indices:  # the last present one wins, as in reported_backlog
            pos = int(np.searchsorted(index, i))
            if pos < index.size and int(index[pos]) == i:
                found[slot] = float(columns.values[int(columns.starts[pos + 1]) - 1])
    if found == [None, None]:
        return None
    return found[0], found[1]


# A series table's indices of the backlog series, by table id.
_BACKLOG_INDICES: dict[bytes, tuple[tuple[int, ...], ...]] = {}


class _Entry:
    """One exposed series: identity, the newest point seen, what /metrics last showed of it,
    and the save queue it waits in (None: its saved row, if any, is current)."""

    __slots__ = ("name", "labels", "mtype", "ts_ms", "value", "shown_ms", "shown_value", "queue")

    def __init__(self, name: str, labels: Labels, mtype: wire.MetricType) -> None:
        self.name = name
        self.labels = labels
        self.mtype = mtype
        self.ts_ms = -(1 << 63)
        self.value = 0.0
        self.shown_ms = -(1 << 63)
        self.shown_value = 0.0
        self.queue: set[_Entry] | None = None


# No point waiting in a table's pending columns.
_NONE_MS = -(1 << 63)


class _TableSlots:
    """One series table's index -> entry slots for a node, and the newest point per index
    that batches naming the table brought and the entries do not hold yet.

    A batch whose indices all resolve to entries is taken with array operations only: its
    newest points go into `pending_ts`/`pending_values` where newer than what waits there.
    The entries take them in `FleetState._flush`, which every reader of entries calls
    first (the exposition, a save, a snapshot, expiry, a v1 batch of the node), so what a
    reader sees is what applying each batch at once would have made of it."""

    __slots__ = ("entries", "resolved", "pending_ts", "pending_values", "mtypes", "waiting", "shared")

    def __init__(self, size: int, mtypes: Sequence[wire.MetricType]) -> None:
        self.entries: list[_Entry | None] = [None] * size
        self.resolved = np.zeros(size, dtype=bool)
        self.pending_ts = np.full(size, _NONE_MS, dtype=np.int64)
        self.pending_values = np.zeros(size, dtype=np.float64)
        self.mtypes = mtypes
        self.waiting = False
        # Two indices resolved to one entry (an identity twice in the table, or labels that
        # differ only in order or in site/node): at one time the first point to arrive must
        # stay, which a flush by index cannot know, so such a table always takes the slow path.
        self.shared = False


@dataclass(eq=False)  # hashed by identity: FleetState._waiting holds them
class _NodeLatest:
    entries: dict[tuple[str, Labels], _Entry] = field(default_factory=dict)
    # (name, labels as sent) -> entry: skips re-normalizing labels for series seen before.
    by_raw: dict[tuple[str, Labels], _Entry] = field(default_factory=dict)
    dropped_series: int = 0
    expired_series: int = 0
    newest_ms: int = -(1 << 63)  # the node's newest sample time, on its own clock
    # The collector's clock when the node's newest data batch arrived (one carrying a point
    # within HOLD_MS of the node's newest): moves only on arrivals, never backwards.
    arrival_ms: int = -(1 << 63)
    swept_ms: int = -(1 << 63)
    # v2: per series table (by id) the entry of each table index, resolved once, and the
    # points waiting for them; flushed and reset whenever entries expire. At most
    # TABLE_SLOTS tables per node.
    by_table: dict[bytes, _TableSlots] = field(default_factory=dict)
    waiting: bool = False  # some table's pending points wait for _flush


# A node's marks as saved: (site, node, newest_ms, arrival_ms).
NodeMark = tuple[str, str, int, int]


# How often, in the node's sample time, a node's series are checked against the TTL:
# at least this, and at least an eighth of the TTL.
SWEEP_EVERY_MS = 60_000


class FleetState:
    """Latest value of every fleet series per node, plus each node's ledger accounting."""

    def __init__(
        self, max_series_per_node: int, series_ttl_s: float = 3600.0, max_series_total: int = 2_000_000
    ) -> None:
        self.max_series_per_node = max_series_per_node
        # One node's label churn must not grow the collector without bound, nor a fleet's
        # sum: both caps hold, and what they refuse is counted.
        self.max_series_total = max_series_total
        self.total_series = 0
        self.over_fleet_limit = 0
        # A series the node has not sent for this long, measured against the node's own
        # newest sample (so clock skew between node and collector does not matter), leaves
        # the exposition: label churn (a model unloaded, a GPU gone) cannot fill the
        # max_series_per_node cap, and Prometheus does not keep scraping a dead value.
        self.series_ttl_ms = int(series_ttl_s * 1000)
        self.sweep_every_ms = max(SWEEP_EVERY_MS, self.series_ttl_ms // 8)
        self._latest: dict[tuple[str, str], _NodeLatest] = {}
        self._states: dict[tuple[str, str], NodeState] = {}
        # The highest collector clock seen (scrapes, arrivals, restored arrivals): exposed
        # timestamps are capped by it, so a clock stepped back does not step them back.
        self.clock_ms = -(1 << 63)
        # What the periodic save has still to write. Each entry changed since its row was
        # last written waits in exactly one queue: the epoch it last changed in (epochs are
        # cut by the saves; each remembers the batch position read when it began, and its
        # changes all come from batches after that position), or `_overdue` (to be written
        # by the next save whatever its epoch: after a failed save, or a start that found
        # no saved position). The last epoch is the open one.
        self._epochs: deque[tuple[int, set[_Entry]]] = deque([(0, set())])
        self._overdue: set[_Entry] = set()
        self._removed: set[RowKey] = set()
        # Nodes whose tables hold points their entries have not taken yet (see _TableSlots).
        self._waiting: set[_NodeLatest] = set()

    def update_node(self, state: NodeState) -> None:
        self._states[(state.site, state.node)] = state

    def node(self, site: str, node: str) -> NodeState | None:
        return self._states.get((site, node))

    def nodes(self) -> list[NodeState]:
        return list(self._states.values())

    def series_count(self, site: str, node: str) -> int:
        latest = self._latest.get((site, node))
        return len(latest.entries) if latest else 0

    def apply(
        self, site: str, node: str, series: Iterable[wire.Series], now_ms: int | None = None, arrived: bool = True
    ) -> None:
        """Take each series' newest point where it is newer than what is held (backfill is older).

        `now_ms` (the collector's clock when the batch arrived) bounds how far a node's clock
        may run ahead and still move its newest sample time: one batch stamped in the far
        future must not expire every other series of the node. With `arrived` (a batch, not
        saved rows), a batch carrying a point within HOLD_MS of the node's newest moves the
        node's arrival time to `now_ms`.
        """
        latest = self._latest.get((site, node))
        if latest is None:
            latest = self._latest[(site, node)] = _NodeLatest()
        self._flush_node(latest)  # a table's waiting points are older than this batch
        by_raw = latest.by_raw
        queue = self._epochs[-1][1]
        newest = latest.newest_ms
        now = int(time.time() * 1000) if now_ms is None else now_ms
        horizon = now + self.series_ttl_ms
        floor = newest - self.series_ttl_ms
        top = -(1 << 63)
        for s in series:
            ts = s.timestamps_ms[-1]
            if ts > top:
                top = ts
            if newest < ts < horizon:
                newest = ts
            entry = by_raw.get((s.name, s.labels))
            if entry is None:
                if ts < floor:
                    continue  # backfill of a series long gone: it would expire at once
                entry = self._entry(latest, site, node, s)
                if entry is None:
                    continue
            if ts > entry.ts_ms:
                _take(entry, ts, s.values[-1], s.mtype, queue)
        self._arrival(latest, top, newest, now, arrived)

    def apply_columns(
        self, site: str, node: str, columns: Columns, now_ms: int | None = None, arrived: bool = True
    ) -> None:
        """`apply` for a v2 batch's columns, with the same rules and the same outcome. Each
        table index resolves to its entry once per table; after that, a batch is taken with
        array operations only: each series' newest point waits in the table's slots for
        the entries' readers (see _TableSlots), so a batch costs no step per series."""
        latest = self._latest.get((site, node))
        if latest is None:
            latest = self._latest[(site, node)] = _NodeLatest()
        if not columns.series_count:
            self.apply(site, node, (), now_ms, arrived)
            return
        table = columns.table
        slots = latest.by_table.get(table.id)
        if slots is None:
            if len(latest.by_table) >= TABLE_SLOTS:
                self._flush_node(latest)
                while len(latest.by_table) >= TABLE_SLOTS:
                    del latest.by_table[next(iter(latest.by_table))]
            slots = latest.by_table[table.id] = _TableSlots(len(table), table.mtypes)
        newest = latest.newest_ms
        now = int(time.time() * 1000) if now_ms is None else now_ms
        horizon = now + self.series_ttl_ms
        last = columns.starts[1:] - 1
        ts_last = columns.timestamps_ms[last]
        values_last = columns.values[last]
        index = columns.index
        top = int(ts_last.max())
        inside = ts_last[ts_last < horizon]
        if inside.size and int(inside.max()) > newest:
            newest = int(inside.max())
        if not slots.shared and slots.resolved[index].all():
            if latest.waiting and not slots.waiting:
                self._flush_node(latest)  # another table's points first, in arrival order
            pending_ts = slots.pending_ts
            # Strictly newer, as an entry takes a point: at one time the first value stays.
            newer = ts_last > pending_ts[index]
            at = index[newer]
            pending_ts[at] = ts_last[newer]
            slots.pending_values[at] = values_last[newer]
            slots.waiting = True
            if not latest.waiting:
                latest.waiting = True
                self._waiting.add(latest)
        else:
            self._flush_node(latest)
            self._take_columns(latest, site, node, slots, table, index, ts_last, values_last)
        self._arrival(latest, top, newest, now, arrived)

    def _take_columns(
        self, latest: _NodeLatest, site: str, node: str, slots: _TableSlots, table: wire.SeriesTable,
        index: np.ndarray, ts_last: np.ndarray, values_last: np.ndarray,
    ) -> None:
        """A batch naming table indices not resolved yet, series by series as `apply` takes
        them (the same floor for backfill, the same caps), resolving what it can."""
        queue = self._epochs[-1][1]
        floor = latest.newest_ms - self.series_ttl_ms
        names, labels, mtypes = table.names, table.labels, table.mtypes
        entries, resolved = slots.entries, slots.resolved
        by_raw = latest.by_raw
        resolved_now = False
        for i, ts, value in zip(index.tolist(), ts_last.tolist(), values_last.tolist(), strict=True):
            entry = entries[i]
            if entry is None:
                entry = by_raw.get((names[i], labels[i]))
                if entry is None:
                    if ts < floor:
                        continue  # backfill of a series long gone: it would expire at once
                    entry = self._entry(latest, site, node, wire.Series(names[i], labels[i], mtypes[i], (), ()))
                    if entry is None:
                        continue  # refused by a cap: asked again (and counted) next time, as apply does
                entries[i] = entry
                resolved[i] = True
                resolved_now = True
            if ts > entry.ts_ms:
                _take(entry, ts, value, mtypes[i], queue)
        if resolved_now and not slots.shared:  # only a newly resolved index can share an entry
            held = [e for e in entries if e is not None]
            slots.shared = len({id(e) for e in held}) != len(held)

    def _arrival(self, latest: _NodeLatest, top: int, newest: int, now: int, arrived: bool) -> None:
        """After a batch (or saved rows) of a node whose newest point is `top`: its arrival
        time, its newest sample time and, when due, the sweep of its expired series."""
        if arrived and top >= latest.newest_ms - HOLD_MS and now > latest.arrival_ms:
            latest.arrival_ms = now
            if now > self.clock_ms:
                self.clock_ms = now
        latest.newest_ms = newest
        if newest - latest.swept_ms >= self.sweep_every_ms:
            self._expire(latest)

    def _flush(self) -> None:
        """Every node's waiting points into their entries (before entries are read)."""
        waiting, self._waiting = self._waiting, set()
        for latest in waiting:
            self._flush_node(latest)

    def flush_some(self, budget: int) -> bool:
        """Waiting points of whole nodes into their entries, until about `budget` were
        taken; True while some still wait. For a caller on the event loop that must not
        hold it for the whole fleet at once: the periodic save runs this in steps before
        `begin_save`, whose own flush then finds only what arrived meanwhile."""
        taken = 0
        while self._waiting and taken < budget:
            taken += self._flush_node(self._waiting.pop())
        return bool(self._waiting)

    def _flush_node(self, latest: _NodeLatest) -> int:
        """The node's waiting points into its entries; returns how many there were."""
        if not latest.waiting:
            return 0
        latest.waiting = False
        queue = self._epochs[-1][1]
        taken = 0
        for slots in latest.by_table.values():
            if not slots.waiting:
                continue
            slots.waiting = False
            pending_ts = slots.pending_ts
            at = np.flatnonzero(pending_ts != _NONE_MS)
            taken += at.size
            entries, mtypes = slots.entries, slots.mtypes
            for i, ts, value in zip(at.tolist(), pending_ts[at].tolist(), slots.pending_values[at].tolist(),
                                    strict=True):
                entry = entries[i]
                if entry is not None and ts > entry.ts_ms:  # _take, inline: once per series
                    entry.ts_ms = ts
                    entry.value = value
                    entry.mtype = mtypes[i]
                    q = entry.queue
                    if q is not queue:
                        if q is not None:
                            q.discard(entry)
                        queue.add(entry)
                        entry.queue = queue
            pending_ts[at] = _NONE_MS
        return taken

    def snapshot(self) -> Iterator[Row]:
        """Every exposed series as a saved row."""
        self._flush()
        for latest in self._latest.values():
            for e in latest.entries.values():
                yield _row(e)

    def start_saves(self, position: int) -> None:
        """Before any batch arrives: everything changed so far comes from batches after
        `position` (or is overdue), so a save may record it until this epoch is written."""
        self._epochs[0] = (position, self._epochs[0][1])

    def begin_save(self, position: int, keep: int) -> tuple[list[_Entry], set[RowKey], list[NodeMark], int]:
        """Cut an epoch at `position` (every batch up to it is applied) and take what this
        save writes: (entries, expired keys, node marks, the position the save records).

        The `keep` newest closed epochs stay unwritten: the batches after the recorded
        position (the oldest kept epoch's start) bring them back at the next start. What is
        older (series not sent for `keep` epochs: SMART, silent nodes) and what is overdue
        is written, so a save costs the slow series and the expired keys, not the fleet.
        """
        # Waiting points go into the epoch cut here: they came from batches before `position`
        # or applied while the save flushed in steps (earlier than their batch: written no later).
        self._flush()
        self._epochs.append((position, set()))
        due = list(self._overdue)
        self._overdue = set()
        while len(self._epochs) > keep + 1:
            due.extend(self._epochs.popleft()[1])
        for e in due:
            e.queue = None
        removed, self._removed = self._removed, set()
        return due, removed, self.marks(), self._epochs[0][0]

    def requeue(self, entries: Iterable[_Entry], removed: Iterable[RowKey]) -> None:
        """After a save that did not write these: the next save writes them (an entry that
        changed again meanwhile waits in its epoch: the replay brings it back)."""
        overdue = self._overdue
        for e in entries:
            if e.queue is None:
                e.queue = overdue
                overdue.add(e)
        self._removed.update(removed)

    def mark_all_changed(self) -> None:
        """The next save writes every series (a start that found no saved position)."""
        self._flush()
        overdue = self._overdue
        for _, queue in self._epochs:
            queue.clear()
        for latest in self._latest.values():
            for e in latest.entries.values():
                e.queue = overdue
                overdue.add(e)

    def marks(self) -> list[NodeMark]:
        """Each node's newest sample time and arrival time, for the save."""
        return [(site, node, latest.newest_ms, latest.arrival_ms)
                for (site, node), latest in self._latest.items()]

    def restore_marks(self, marks: Iterable[NodeMark]) -> None:
        """Saved node marks (after the saved rows, before replaying the batches after them):
        a node's newest and arrival time, and the collector's clock, never step back across
        a restart."""
        for site, node, newest_ms, arrival_ms in marks:
            latest = self._latest.get((site, node))
            if latest is None:
                latest = self._latest[(site, node)] = _NodeLatest()
            latest.newest_ms = max(latest.newest_ms, int(newest_ms))
            latest.arrival_ms = max(latest.arrival_ms, int(arrival_ms))
            self.clock_ms = max(self.clock_ms, latest.arrival_ms)

    @staticmethod
    def rows(entries: Iterable[_Entry]) -> list[Row]:
        """Saved rows for entries from `begin_save`, with their values as they are now."""
        return [_row(e) for e in entries]

    def restore(self, rows: Iterable[Row], now_ms: int | None = None, saved: bool = True) -> int:
        """Load saved rows (before any batch is applied); returns how many series were taken.

        `saved`: the rows are already where the periodic save writes, so they are not
        written again; rows from elsewhere (an older version's table) are.
        """
        by_node: dict[tuple[str, str], list[wire.Series]] = {}
        for site, node, name, labels, mtype, ts_ms, value in rows:
            try:
                series = wire.Series(name, tuple((str(k), str(v)) for k, v in json.loads(labels)),
                                     wire.MetricType(mtype), (int(ts_ms),), (float(value),))
            except (ValueError, TypeError):
                continue  # one unreadable row loses that series only
            by_node.setdefault((site, node), []).append(series)
        for (site, node), series_list in by_node.items():
            self.apply(site, node, series_list, now_ms=now_ms, arrived=False)
        if saved:
            # Keys expired while restoring stay in _removed: their rows must go.
            for _, queue in self._epochs:
                for e in queue:
                    e.queue = None
                queue.clear()
        else:
            self.mark_all_changed()
        return sum(self.series_count(site, node) for site, node in by_node)

    def _expire(self, latest: _NodeLatest) -> None:
        self._flush_node(latest)  # a waiting point may keep a series
        latest.swept_ms = latest.newest_ms
        cutoff = latest.newest_ms - self.series_ttl_ms
        stale = [identity for identity, e in latest.entries.items() if e.ts_ms < cutoff]
        if stale:
            for identity in stale:
                e = latest.entries.pop(identity)
                if e.queue is not None:
                    e.queue.discard(e)
                    e.queue = None
                self._removed.add(_row(e)[:4])
            self.total_series -= len(stale)
            # The cache keeps what is still exposed: clearing it would cost every series a
            # label normalization on the next batch.
            latest.by_raw = {k: e for k, e in latest.by_raw.items() if e.ts_ms >= cutoff}
            latest.by_table = {}  # their slots may name expired entries
            latest.expired_series += len(stale)

    def _entry(self, latest: _NodeLatest, site: str, node: str, s: wire.Series) -> _Entry | None:
        if s.name.startswith(RESERVED_PREFIXES):
            latest.dropped_series += 1
            return None
        # Every fleet series carries the site and node it came from, as the key proved them.
        labels = dict(s.labels)
        labels["site"] = site
        labels["node"] = node
        identity = (s.name, tuple(sorted(labels.items())))
        entry = latest.entries.get(identity)
        if entry is None:
            if len(latest.entries) >= self.max_series_per_node:
                latest.dropped_series += 1
                return None
            if self.total_series >= self.max_series_total:
                latest.dropped_series += 1
                self.over_fleet_limit += 1
                return None
            entry = latest.entries[identity] = _Entry(identity[0], identity[1], s.mtype)
            self.total_series += 1
        if len(latest.by_raw) >= 2 * self.max_series_per_node:
            latest.by_raw.clear()  # only a cache; bounded so odd label orders cannot grow it
        latest.by_raw[(s.name, s.labels)] = entry
        return entry

    def fleet_families(self, now_ms: int) -> Iterator[Metric]:
        """Every fleet series with the timestamp Prometheus should store it at.

        That is its own newest point's time, or its node's floor (HOLD_MS behind the later
        of the node's newest sample and that sample's arrival) if that is later, never
        later than the collector's clock (`now_ms`, or the highest seen before): a node
        whose clock runs ahead must not put samples into Prometheus' future, where they
        would refuse every real sample of the series until that time. Per series it never
        moves backwards, and a value that changes gets a later timestamp than the last one
        shown (BUMP_MS later if nothing else moved it; while the clock allows none, the
        last shown value stays), so Prometheus never sees two values at one timestamp.
        """
        if now_ms > self.clock_ms:
            self.clock_ms = now_ms
        now = self.clock_ms
        self._flush()
        families: dict[str, Metric] = {}
        for latest in self._latest.values():
            floor = min(max(latest.newest_ms, latest.arrival_ms) - HOLD_MS, now)
            for e in latest.entries.values():
                fam = families.get(e.name)
                if fam is None:
                    fam = families[e.name] = _family(e.name, e.mtype)
                ts_ms = e.ts_ms
                if ts_ms < floor:
                    ts_ms = floor
                elif ts_ms > now:
                    ts_ms = now
                value = e.value
                shown = e.shown_ms
                if ts_ms <= shown:
                    if value is e.shown_value or _same(value, e.shown_value):
                        ts_ms = shown
                    elif shown + BUMP_MS <= now:
                        ts_ms = shown + BUMP_MS
                    else:
                        ts_ms, value = shown, e.shown_value
                e.shown_ms = ts_ms
                e.shown_value = value
                fam.samples.append(Sample(e.name, dict(e.labels), value, ts_ms / 1000))
        return iter(families.values())

    def series_accounting(self) -> Iterator[tuple[str, str, int, int]]:
        """(site, node, dropped, expired) per node."""
        for (site, node), latest in self._latest.items():
            yield site, node, latest.dropped_series, latest.expired_series


def _take(entry: _Entry, ts: int, value: float, mtype: wire.MetricType, queue: set[_Entry]) -> None:
    """A newer point into its entry, and the entry into the open epoch's save queue."""
    entry.ts_ms = ts
    entry.value = value
    entry.mtype = mtype
    q = entry.queue
    if q is not queue:
        if q is not None:
            q.discard(entry)
        queue.add(entry)
        entry.queue = queue


def _same(a: float, b: float) -> bool:
    """Equal as Prometheus compares samples: -0.0 is not 0.0, and the text format makes
    every NaN the same NaN."""
    if a == b:
        return a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b)
    return a != a and b != b


def _row(e: _Entry) -> Row:
    site = node = ""
    sent = []
    for k, v in e.labels:
        if k == "site":
            site = v
        elif k == "node":
            node = v
        else:
            sent.append([k, v])
    return site, node, e.name, json.dumps(sent), int(e.mtype), e.ts_ms, e.value


def _family(name: str, mtype: wire.MetricType) -> Metric:
    """A family whose text exposition prints every sample under exactly its series name,
    with the agent catalog's HELP where the name is catalogued."""
    text = help_of(name) or FLEET_HELP
    # prometheus_client appends _total to counter and _info to info family names when
    # rendering, so hand it the stripped name; anything that would not round-trip is untyped.
    if mtype == wire.MetricType.COUNTER and name.endswith("_total") and len(name) > 6:
        return Metric(name[:-6], text, "counter")
    if mtype == wire.MetricType.INFO and name.endswith("_info") and len(name) > 5:
        return Metric(name[:-5], text, "info")
    if mtype == wire.MetricType.GAUGE or mtype == wire.MetricType.INFO:
        return Metric(name, text, "gauge")
    return Metric(name, text, "unknown")


class FleetCollector(Collector):
    """prometheus_client collector over a FleetState: fleet series and per-node accounting."""

    def __init__(self, fleet: FleetState, clock: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        # Fleet series carry their sample times; the collector's own families below do not
        # (they describe now, and Prometheus stamps them with its scrape time).
        yield from self.fleet.fleet_families(int(self.clock() * 1000))
        labels = ["site", "node"]
        last_seen = GaugeMetricFamily(
            "waystation_node_last_seen_timestamp_seconds",
            "When the collector last recorded a batch from the node (Unix time).",
            labels=labels,
        )
        complete = GaugeMetricFamily(
            "waystation_node_complete_through_seq",
            "Every seq up to this one is recorded or covered by a drop receipt.",
            labels=labels,
        )
        highest = GaugeMetricFamily(
            "waystation_node_highest_seq", "Highest seq recorded for the node.", labels=labels
        )
        gaps = GaugeMetricFamily(
            "waystation_node_gap_seqs",
            "Seqs below the highest that are neither recorded nor covered by a drop receipt.",
            labels=labels,
        )
        dropped_batches = CounterMetricFamily(
            "waystation_node_dropped_batches",
            "Batches the node's spool evicted before delivery, per its drop receipts.",
            labels=labels,
        )
        dropped_samples = CounterMetricFamily(
            "waystation_node_dropped_samples",
            "Samples the node's spool evicted before delivery, per its drop receipts.",
            labels=labels,
        )
        tamper = CounterMetricFamily(
            "waystation_node_tamper_events",
            "Conflicting duplicates and hash-chain mismatches seen for the node.",
            labels=labels,
        )
        backlog_batches = GaugeMetricFamily(
            "waystation_node_reported_backlog_batches",
            "Batches waiting in the node's spool, as its newest batch reported.",
            labels=labels,
        )
        backlog_bytes = GaugeMetricFamily(
            "waystation_node_reported_backlog_bytes",
            "Bytes waiting in the node's spool, as its newest batch reported.",
            labels=labels,
        )
        exposed = GaugeMetricFamily(
            "waystation_exposition_series",
            "Fleet series exposed for the node.",
            labels=labels,
        )
        dropped_series = CounterMetricFamily(
            "waystation_exposition_series_dropped",
            "Series not exposed: over max_series_per_node or max_series_total, or using a reserved name.",
            labels=labels,
        )
        for s in self.fleet.nodes():
            lv = [s.site, s.node]
            last_seen.add_metric(lv, s.last_seen)
            complete.add_metric(lv, s.complete_through)
            highest.add_metric(lv, s.highest_seq)
            gaps.add_metric(lv, s.gap_seqs)
            dropped_batches.add_metric(lv, s.dropped_batches)
            dropped_samples.add_metric(lv, s.dropped_samples)
            tamper.add_metric(lv, s.tamper_events)
            if s.backlog_batches is not None:
                backlog_batches.add_metric(lv, s.backlog_batches)
            if s.backlog_bytes is not None:
                backlog_bytes.add_metric(lv, s.backlog_bytes)
            exposed.add_metric(lv, self.fleet.series_count(s.site, s.node))
        expired_series = CounterMetricFamily(
            "waystation_exposition_series_expired",
            "Series no longer exposed: the node sent no point for them within series_ttl.",
            labels=labels,
        )
        for site, node, dropped, expired in self.fleet.series_accounting():
            dropped_series.add_metric([site, node], dropped)
            expired_series.add_metric([site, node], expired)
        yield from (
            last_seen, complete, highest, gaps, dropped_batches, dropped_samples, tamper,
            backlog_batches, backlog_bytes, exposed, dropped_series, expired_series,
        )
        yield GaugeMetricFamily(
            "waystation_exposition_fleet_series", "Fleet series exposed, all nodes together.",
            value=self.fleet.total_series,
        )
        yield CounterMetricFamily(
            "waystation_exposition_series_over_fleet_limit",
            "New series not exposed because the fleet already had max_series_total.",
            value=self.fleet.over_fleet_limit,
        )
