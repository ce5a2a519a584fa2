"""The fleet's latest state, its Prometheus text, and the collector of its accounting.

Thread contract: `FleetState` is touched only on the event loop (ingest handlers apply
accepted batches and ledger outcomes; the /metrics handler takes a `FleetState.scrape` in
steps, which also records what each series last showed, and renders the `FleetText` it
makes in pieces, the loop serving other requests between them; `FleetCollector.collect`
runs through a per-app `CollectorRegistry`; the periodic state save takes the series due
and renders them as rows there, a chunk at a time).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

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


# A series' save state (`_NodeLatest.dirty`): its saved row, if any, is current (_CLEAN);
# the next save writes it whatever its epoch (_OVERDUE: after a failed save, or a start
# that found no saved position); or the number of the save epoch it last changed in.
_CLEAN = 0
_OVERDUE = 1
_FIRST_EPOCH = 2
# No point taken yet, nothing shown yet.
_NONE_MS = -(1 << 63)

# The per-slot arrays of a node, with the value a fresh slot starts from.
_COLUMNS: tuple[tuple[str, type, object], ...] = (
    ("keys", object, None),
    ("prefix", object, None),
    ("family", np.int32, 0),
    ("ts", np.int64, _NONE_MS),
    ("value", np.float64, 0.0),
    ("shown_ms", np.int64, _NONE_MS),
    ("shown_value", np.float64, 0.0),
    ("shown_text", object, None),
    ("mtype", np.int8, 0),
    ("dirty", np.int64, _CLEAN),
    ("live", bool, False),
    ("born", np.int64, 0),
)


class _NodeLatest:
    """One node's exposed series, one slot each in its arrays (freed slots are reused): the
    identity key and the exposition text before the value, the newest point, what /metrics
    last showed of it, and its save state. Arrays, not an object per series: a fleet holds
    millions of series, and objects would cost ~1 KB each and a garbage collector that
    walks them all."""

    __slots__ = (
        "site", "node", "ids", "by_raw", "size", "free", "reused", "by_table", "dropped_series", "expired_series",
        "newest_ms", "arrival_ms", "swept_ms", *(name for name, _, _ in _COLUMNS),
    )

    def __init__(self, site: str, node: str) -> None:
        self.site = site
        self.node = node
        # (name, labels sorted, without site and node) -> slot.
        self.ids: dict[tuple[str, Labels], int] = {}
        # (name, labels as sent) -> slot, for labels sent in another order or naming site or
        # node: skips normalizing them again; bounded, only a cache.
        self.by_raw: dict[tuple[str, Labels], int] = {}
        self.size = 0  # slots ever used (live or free): the arrays' rows that mean anything
        self.free: list[int] = []
        self.reused = False  # a freed slot was reused: slot order is no longer creation order
        # v2: per series table (by id) the slot of each table index, resolved once; dropped
        # whenever slots are freed. At most TABLE_SLOTS tables per node.
        self.by_table: dict[bytes, _TableSlots] = {}
        self.dropped_series = 0
        self.expired_series = 0
        self.newest_ms = _NONE_MS  # the node's newest sample time, on its own clock
        # The collector's clock when the node's newest data batch arrived (one carrying a point
        # within HOLD_MS of the node's newest): moves only on arrivals, never backwards.
        self.arrival_ms = _NONE_MS
        self.swept_ms = _NONE_MS
        self.keys: np.ndarray = np.empty(0, dtype=object)
        self.prefix: np.ndarray = np.empty(0, dtype=object)
        self.family = np.zeros(0, dtype=np.int32)
        self.ts = np.zeros(0, dtype=np.int64)
        self.value = np.zeros(0, dtype=np.float64)
        self.shown_ms = np.zeros(0, dtype=np.int64)
        self.shown_value = np.zeros(0, dtype=np.float64)
        # The text after the prefix as last shown (" value timestamp\n"): a scrape renders only
        # the series whose shown value or time moved since the one before.
        self.shown_text: np.ndarray = np.empty(0, dtype=object)
        self.mtype = np.zeros(0, dtype=np.int8)
        self.dirty = np.zeros(0, dtype=np.int64)
        self.live = np.zeros(0, dtype=bool)
        self.born = np.zeros(0, dtype=np.int64)  # creation order across the fleet

    @property
    def count(self) -> int:
        return len(self.ids)

    def slots(self, count: int) -> np.ndarray:
        """Slots for `count` new series (freed ones first), every column at its fresh value."""
        reused = self.free[len(self.free) - count:] if count else []
        del self.free[len(self.free) - len(reused):]
        self.reused = self.reused or bool(reused)
        fresh_count = count - len(reused)
        if self.size + fresh_count > self.ts.size:
            capacity = max(16, 2 * self.ts.size, self.size + fresh_count)
            for name, dtype, _ in _COLUMNS:
                old = getattr(self, name)
                grown: np.ndarray = np.empty(capacity, dtype=dtype)
                grown[:old.size] = old
                setattr(self, name, grown)
        sids = np.concatenate((np.array(reused, dtype=np.int64),
                               np.arange(self.size, self.size + fresh_count, dtype=np.int64)))
        self.size += fresh_count
        for name, _, fresh in _COLUMNS:
            getattr(self, name)[sids] = fresh
        return sids


class _TableSlots:
    """One series table's index -> slot map for a node (-1: not resolved yet, or refused by
    a cap), and its types as an array. A batch whose indices all resolved is taken with
    array operations only."""

    __slots__ = ("sid", "mtypes", "shared")

    def __init__(self, table: wire.SeriesTable) -> None:
        self.sid = np.full(len(table), -1, dtype=np.int64)
        self.mtypes = np.array([int(t) for t in table.mtypes], dtype=np.int8)
        # Two indices resolved to one slot (an identity twice in the table, or labels that
        # differ only in order or in site/node): at one time the first point in the batch
        # must stay, which one array assignment cannot promise, so such a table's batches
        # are taken point by point.
        self.shared = False


# A node's marks as saved: (site, node, newest_ms, arrival_ms).
NodeMark = tuple[str, str, int, int]


# How often, in the node's sample time, a node's series are checked against the TTL:
# at least this, and at least an eighth of the TTL.
SWEEP_EVERY_MS = 60_000


class SaveDue:
    """The series a save writes: per node, the slots that were due when it began. Sliced in
    chunks by the save; a slot freed meanwhile is skipped (its expired key is in the next
    save's removals), one reused meanwhile writes its new series (changed, so due anyway)."""

    def __init__(self, parts: list[tuple[_NodeLatest, np.ndarray]]) -> None:
        self.parts = parts
        self._bounds = np.cumsum([0] + [at.size for _, at in parts])

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def __getitem__(self, cut: slice) -> SaveDue:
        start, stop, step = cut.indices(len(self))
        if step != 1:
            raise ValueError("SaveDue slices go in order")
        parts = []
        for (latest, at), low in zip(self.parts, self._bounds[:-1].tolist(), strict=True):
            if low >= stop:
                break
            high = low + at.size
            if high > start:
                parts.append((latest, at[max(start - low, 0):min(stop, high) - low]))
        return SaveDue(parts)


class _Joining:
    """The new series one batch brings: their identity keys and types in order of first
    appearance, and each appearance waiting for its slot (position, number, labels as sent)."""

    __slots__ = ("keys", "mtypes", "numbered", "waiting")

    def __init__(self) -> None:
        self.keys: list[tuple[str, Labels]] = []
        self.mtypes: list[wire.MetricType] = []
        self.numbered: dict[tuple[str, Labels], int] = {}
        self.waiting: list[tuple[int, int, Labels]] = []


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
        self.clock_ms = _NONE_MS
        # The save epochs: each is cut by a save, remembers the batch position read when it
        # began (its changes all come from batches after that position) and its number,
        # which a series changed in it holds in `dirty`. The last one is open.
        self._open = _FIRST_EPOCH
        self._epochs: deque[tuple[int, int]] = deque([(0, _FIRST_EPOCH)])
        self._removed: set[RowKey] = set()
        # Family (series name) -> number, for grouping a scrape by family with array ops.
        self._family_ids: dict[str, int] = {}
        self._family_names: list[str] = []
        self._born = 0  # series created so far: a family's samples (and its type) go in that order

    def update_node(self, state: NodeState) -> None:
        self._states[(state.site, state.node)] = state

    def node(self, site: str, node: str) -> NodeState | None:
        return self._states.get((site, node))

    def nodes(self) -> list[NodeState]:
        return list(self._states.values())

    def series_count(self, site: str, node: str) -> int:
        latest = self._latest.get((site, node))
        return latest.count if latest else 0

    def _node(self, site: str, node: str) -> _NodeLatest:
        latest = self._latest.get((site, node))
        if latest is None:
            latest = self._latest[(site, node)] = _NodeLatest(site, node)
        return latest

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
        latest = self._node(site, node)
        ids = latest.ids
        newest = latest.newest_ms
        now = int(time.time() * 1000) if now_ms is None else now_ms
        horizon = now + self.series_ttl_ms
        floor = newest - self.series_ttl_ms
        top = _NONE_MS
        joining = _Joining()
        sids: list[int] = []
        stamps: list[int] = []
        values: list[float] = []
        mtypes: list[int] = []
        for s in series:
            ts = s.timestamps_ms[-1]
            if ts > top:
                top = ts
            if newest < ts < horizon:
                newest = ts
            sid = ids.get((s.name, s.labels))
            if sid is None:
                sid = self._find(latest, s.name, s.labels, s.mtype, ts, floor, joining, len(sids))
                if sid is None:
                    continue
            sids.append(sid)
            stamps.append(ts)
            values.append(s.values[-1])
            mtypes.append(int(s.mtype))
        for pos, sid in self._join(latest, joining):
            sids[pos] = sid
        if sids:
            at = np.array(sids, dtype=np.int64)
            taken = at >= 0
            at = at[taken]
            self._take(latest, at, np.array(stamps, dtype=np.int64)[taken],
                       np.array(values, dtype=np.float64)[taken], np.array(mtypes, dtype=np.int8)[taken],
                       np.unique(at).size == at.size)
        self._arrival(latest, top, newest, now, arrived)

    def apply_columns(
        self, site: str, node: str, columns: Columns, now_ms: int | None = None, arrived: bool = True
    ) -> None:
        """`apply` for a v2 batch's columns, with the same rules and the same outcome. Each
        table index resolves to its slot once per table; after that, a batch is taken with
        array operations only, no step per series."""
        if not columns.series_count:
            self.apply(site, node, (), now_ms, arrived)
            return
        latest = self._node(site, node)
        table = columns.table
        slots = latest.by_table.get(table.id)
        if slots is None:
            while len(latest.by_table) >= TABLE_SLOTS:
                del latest.by_table[next(iter(latest.by_table))]
            slots = latest.by_table[table.id] = _TableSlots(table)
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
        sids = slots.sid[index]
        if slots.shared or int(sids.min()) < 0:
            sids = self._resolve_table(latest, slots, table, index, sids, ts_last)
            taken = sids >= 0
            self._take(latest, sids[taken], ts_last[taken], values_last[taken], slots.mtypes[index[taken]],
                       not slots.shared)
        else:
            self._take(latest, sids, ts_last, values_last, slots.mtypes[index], True)
        self._arrival(latest, top, newest, now, arrived)

    def _resolve_table(
        self, latest: _NodeLatest, slots: _TableSlots, table: wire.SeriesTable, index: np.ndarray,
        sids: np.ndarray, ts_last: np.ndarray,
    ) -> np.ndarray:
        """The slots of a batch's indices, resolving those not resolved yet as `apply` does
        (the same floor for backfill, the same caps, in index order); -1 where refused."""
        floor = latest.newest_ms - self.series_ttl_ms
        names, labels, mtypes = table.names, table.labels, table.mtypes
        sid_of = slots.sid
        sids = sids.copy()
        joining = _Joining()
        resolved = []
        for pos in np.flatnonzero(sids < 0).tolist():
            i = int(index[pos])
            sid = self._find(latest, names[i], labels[i], mtypes[i], int(ts_last[pos]), floor, joining, pos)
            if sid is not None and sid >= 0:
                resolved.append((pos, sid))
        resolved += self._join(latest, joining)
        for pos, sid in resolved:
            sid_of[int(index[pos])] = sids[pos] = sid
        if resolved and not slots.shared:  # only a newly resolved index can share a slot
            held = sid_of[sid_of >= 0]
            slots.shared = np.unique(held).size != held.size
        return sids

    def _take(self, latest: _NodeLatest, sids: np.ndarray, stamps: np.ndarray, values: np.ndarray,
              mtypes: np.ndarray, unique: bool) -> None:
        """Each point into its slot where newer than what it holds, and those slots into the
        open save epoch. Taken one after another, a slot named twice ends with its newest
        point, the first of those at one time (a later one is not newer): with `unique`
        false, that point is picked per slot first."""
        if not sids.size:
            return
        if not unique:
            order = np.lexsort((np.arange(sids.size), ~stamps, sids))  # ~: descending, no overflow
            ordered = sids[order]
            first = order[np.concatenate(([True], ordered[1:] != ordered[:-1]))]
            sids, stamps, values, mtypes = sids[first], stamps[first], values[first], mtypes[first]
        ts = latest.ts
        newer = stamps > ts[sids]
        at = sids[newer]
        ts[at] = stamps[newer]
        latest.value[at] = values[newer]
        latest.mtype[at] = mtypes[newer]
        latest.dirty[at] = self._open

    def _find(self, latest: _NodeLatest, name: str, raw: Labels, mtype: wire.MetricType, stamp: int,
              floor: int, joining: _Joining, pos: int) -> int | None:
        """The slot of a series by its labels as sent, or by its identity; None where not
        taken (backfill of a series long gone, a reserved name); -1 for a new series, which
        `joining` holds (at `pos`) until `_join` gives it its slot."""
        sid = latest.ids.get((name, raw))
        if sid is None:
            sid = latest.by_raw.get((name, raw))
        if sid is not None:
            return sid
        if stamp < floor:
            return None  # backfill of a series long gone: it would expire at once
        if name.startswith(RESERVED_PREFIXES):
            latest.dropped_series += 1
            return None
        key = (name, _identity_labels(raw))
        if key[1] is not raw:
            sid = latest.ids.get(key)
            if sid is not None:
                self._alias(latest, name, raw, sid)
                return sid
        k = joining.numbered.get(key)
        if k is None:
            k = joining.numbered[key] = len(joining.keys)
            joining.keys.append(key)
            joining.mtypes.append(mtype)
        joining.waiting.append((pos, k, raw))
        return -1

    def _join(self, latest: _NodeLatest, joining: _Joining) -> list[tuple[int, int]]:
        """Slots for the new series of a batch, together: (position, slot) of each one the
        caps allowed; each refused one is counted (and asked again next time, as before)."""
        if not joining.keys:
            return []
        created, by_fleet = self._create(latest, joining.keys, joining.mtypes)
        out = []
        for pos, k, raw in joining.waiting:
            sid = created[k]
            if sid < 0:
                latest.dropped_series += 1
                self.over_fleet_limit += by_fleet
                continue
            name, labels = joining.keys[k]
            if labels is not raw:
                self._alias(latest, name, raw, sid)
            out.append((pos, sid))
        return out

    def _create(self, latest: _NodeLatest, keys: list[tuple[str, Labels]], mtypes: list[wire.MetricType],
                ) -> tuple[list[int], bool]:
        """Slots for new series, in order, while both caps allow: (each one's slot or -1,
        whether the fleet's cap refused those refused, not the node's own)."""
        node_room = max(self.max_series_per_node - latest.count, 0)
        room = max(min(node_room, self.max_series_total - self.total_series, len(keys)), 0)
        sids = latest.slots(room)
        ids, stored, prefix = latest.ids, latest.keys, latest.prefix
        # Label pairs repeat across a batch's new series (job, device, gpu): each rendered
        # once per batch. Not kept beyond it: what a node's series hold is their prefixes.
        pair_text: dict[tuple[str, str], str] = {}
        site, node = _pair_text(("site", latest.site), pair_text), _pair_text(("node", latest.node), pair_text)
        created = sids.tolist()
        for sid, key in zip(created, keys, strict=False):
            ids[key] = sid
            stored[sid] = key
            prefix[sid] = _prefix(key[0], key[1], site, node, pair_text)
        latest.family[sids] = [self._family(name) for name, _ in keys[:room]]
        latest.mtype[sids] = [int(m) for m in mtypes[:room]]
        latest.live[sids] = True
        latest.born[sids] = np.arange(self._born, self._born + room, dtype=np.int64)
        self._born += room
        self.total_series += room
        return created + [-1] * (len(keys) - room), room < node_room

    def _alias(self, latest: _NodeLatest, name: str, raw: Labels, sid: int) -> None:
        """Remember labels sent in another order (or naming site or node) for a slot."""
        if len(latest.by_raw) >= 2 * self.max_series_per_node:
            latest.by_raw.clear()  # only a cache; bounded so odd label orders cannot grow it
        latest.by_raw[(name, raw)] = sid

    def _family(self, name: str) -> int:
        fid = self._family_ids.get(name)
        if fid is None:
            fid = self._family_ids[name] = len(self._family_names)
            self._family_names.append(name)
        return fid

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

    def snapshot(self) -> Iterator[Row]:
        """Every exposed series as a saved row."""
        for latest in self._latest.values():
            yield from _rows(latest, np.flatnonzero(latest.live[:latest.size]))

    def start_saves(self, position: int) -> None:
        """Before any batch arrives: everything changed so far comes from batches after
        `position` (or is overdue), so a save may record it until this epoch is written."""
        self._epochs[0] = (position, self._epochs[0][1])

    def begin_save(self, position: int, keep: int) -> tuple[SaveDue, set[RowKey], list[NodeMark], int]:
        """Cut an epoch at `position` (every batch up to it is applied) and take what this
        save writes: (series, expired keys, node marks, the position the save records).

        The `keep` newest closed epochs stay unwritten: the batches after the recorded
        position (the oldest kept epoch's start) bring them back at the next start. What is
        older (series not sent for `keep` epochs: SMART, silent nodes) and what is overdue
        is written, so a save costs the slow series and the expired keys, not the fleet.
        """
        self._open += 1
        self._epochs.append((position, self._open))
        cut = _OVERDUE
        while len(self._epochs) > keep + 1:
            cut = self._epochs.popleft()[1]
        parts = []
        for latest in self._latest.values():
            dirty = latest.dirty[:latest.size]
            at = np.flatnonzero((dirty != _CLEAN) & (dirty <= cut))
            if at.size:
                dirty[at] = _CLEAN
                parts.append((latest, at))
        removed, self._removed = self._removed, set()
        return SaveDue(parts), removed, self.marks(), self._epochs[0][0]

    def requeue(self, due: SaveDue, removed: Iterable[RowKey]) -> None:
        """After a save that did not write these: the next save writes them (a series that
        changed again meanwhile waits in its epoch: the replay brings it back)."""
        for latest, at in due.parts:
            dirty = latest.dirty
            dirty[at[(dirty[at] == _CLEAN) & latest.live[at]]] = _OVERDUE
        self._removed.update(removed)

    def mark_all_changed(self) -> None:
        """The next save writes every series (a start that found no saved position)."""
        for latest in self._latest.values():
            n = latest.size
            latest.dirty[:n][latest.live[:n]] = _OVERDUE

    def marks(self) -> list[NodeMark]:
        """Each node's newest sample time and arrival time, for the save."""
        return [(site, node, latest.newest_ms, latest.arrival_ms)
                for (site, node), latest in self._latest.items()]

    def restore_marks(self, marks: Iterable[NodeMark]) -> None:
        """Saved node marks (after the saved rows, before replaying the batches after them):
        a node's newest and arrival time, and the collector's clock, never step back across
        a restart."""
        for site, node, newest_ms, arrival_ms in marks:
            latest = self._node(site, node)
            latest.newest_ms = max(latest.newest_ms, int(newest_ms))
            latest.arrival_ms = max(latest.arrival_ms, int(arrival_ms))
            self.clock_ms = max(self.clock_ms, latest.arrival_ms)

    @staticmethod
    def rows(due: SaveDue) -> list[Row]:
        """Saved rows for series from `begin_save`, with their values as they are now."""
        out: list[Row] = []
        for latest, at in due.parts:
            out.extend(_rows(latest, at))
        return out

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
            for latest in self._latest.values():
                latest.dirty[:latest.size] = _CLEAN
        else:
            self.mark_all_changed()
        return sum(self.series_count(site, node) for site, node in by_node)

    def _expire(self, latest: _NodeLatest) -> None:
        latest.swept_ms = latest.newest_ms
        cutoff = latest.newest_ms - self.series_ttl_ms
        n = latest.size
        stale = np.flatnonzero(latest.live[:n] & (latest.ts[:n] < cutoff))
        if not stale.size:
            return
        keys, ids = latest.keys, latest.ids
        for sid in stale.tolist():
            name, labels = keys[sid]
            del ids[(name, labels)]
            self._removed.add((latest.site, latest.node, name, _labels_json(labels)))
        keys[stale] = None
        latest.prefix[stale] = None
        latest.live[stale] = False
        latest.dirty[stale] = _CLEAN
        latest.free.extend(stale.tolist())
        self.total_series -= stale.size
        # The cache keeps what is still exposed (its slots are about to be reused).
        live = latest.live
        latest.by_raw = {k: sid for k, sid in latest.by_raw.items() if live[sid]}
        latest.by_table = {}  # their slots may name freed ones
        latest.expired_series += stale.size

    def exposition(self, now_ms: int) -> FleetText:
        """Every fleet series as /metrics shows it now, in one go (see `scrape`)."""
        scrape = self.scrape(now_ms)
        while scrape.step(1 << 62):
            pass
        return scrape.text()

    def scrape(self, now_ms: int) -> FleetScrape:
        """A scrape of every fleet series, taken node by node in steps (see FleetScrape), each
        with the timestamp Prometheus should store it at.

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
        return FleetScrape(self, self.clock_ms)

    def _show(self, latest: _NodeLatest, now: int) -> tuple[np.ndarray, ...]:
        """A node's live series as shown now (what each last showed is updated): their
        (families, text before the value, text after it, types), in creation order."""
        at = np.flatnonzero(latest.live[:latest.size])
        if latest.reused:
            at = at[np.argsort(latest.born[at], kind="stable")]
        floor = max(min(max(latest.newest_ms, latest.arrival_ms) - HOLD_MS, now), _NONE_MS)
        ts = np.clip(latest.ts[at], floor, now)
        value = latest.value[at]
        shown = latest.shown_ms[at]
        behind = ts <= shown
        if behind.any():
            shown_value = latest.shown_value[at]
            same = behind & _same(value, shown_value)
            moved = behind & ~same
            bump = moved & (shown + BUMP_MS <= now)
            stay = moved & ~bump
            ts = np.where(same | stay, shown, np.where(bump, shown + BUMP_MS, ts))
            value = np.where(stay, shown_value, value)
        # Rendered again where the shown time or value's bits moved (or nothing was shown yet).
        moved_text = ((ts != shown) | (shown == _NONE_MS)
                      | (value.view(np.int64) != latest.shown_value[at].view(np.int64)))
        if moved_text.any():
            latest.shown_text[at[moved_text]] = _tails(value[moved_text], ts[moved_text])
        latest.shown_ms[at] = ts
        latest.shown_value[at] = value
        return latest.family[at], latest.prefix[at], latest.shown_text[at], latest.mtype[at]

    def _forget_families(self, exposed: int) -> None:
        """Renumber the families when most names held are no longer exposed (label churn
        over months must not grow the name registry)."""
        if len(self._family_names) <= 2 * exposed + 1_000:
            return
        held = [latest.family[:latest.size][latest.live[:latest.size]] for latest in self._latest.values()]
        used = np.unique(np.concatenate(held)) if held else np.empty(0, dtype=np.int32)
        renumber = np.zeros(len(self._family_names), dtype=np.int32)
        renumber[used] = np.arange(used.size, dtype=np.int32)
        self._family_names = [self._family_names[fid] for fid in used.tolist()]
        self._family_ids = {name: fid for fid, name in enumerate(self._family_names)}
        for latest in self._latest.values():
            latest.family[:latest.size] = renumber[latest.family[:latest.size]]

    def series_accounting(self) -> Iterator[tuple[str, str, int, int]]:
        """(site, node, dropped, expired) per node."""
        for (site, node), latest in self._latest.items():
            yield site, node, latest.dropped_series, latest.expired_series


class FleetScrape:
    """One scrape of the fleet, taken a few nodes at a time so the event loop serves acks
    between steps: `step` until it returns False, then `text`. A node is shown as it is
    when its step comes (batches applied meanwhile are in it or not, whole)."""

    def __init__(self, fleet: FleetState, now: int) -> None:
        self.fleet = fleet
        self.now = now
        self._nodes = list(fleet._latest.values())
        self._next = 0
        # The shown series, node after node, written into columns sized for the fleet (so
        # `text` is left only the sort): family, text before the value, value, time, type.
        self._filled = 0
        self._columns = _scrape_columns(fleet.total_series)

    def step(self, budget: int) -> bool:
        """Show whole nodes until about `budget` series were; True while nodes remain."""
        shown = 0
        nodes = self._nodes
        while self._next < len(nodes) and shown < budget:
            latest = nodes[self._next]
            self._next += 1
            if not latest.count:
                continue
            part = self.fleet._show(latest, self.now)
            size = part[0].size
            start, stop = self._filled, self._filled + size
            if stop > self._columns[0].size:  # series joined during the scrape
                grown = _scrape_columns(2 * stop)
                for old, new in zip(self._columns, grown, strict=True):
                    new[:start] = old[:start]
                self._columns = grown
            for column, shown_part in zip(self._columns, part, strict=True):
                column[start:stop] = shown_part
            self._filled = stop
            shown += size
        return self._next < len(nodes)

    def text(self) -> FleetText:
        """The shown series grouped by family (each family typed by its first series)."""
        families, prefixes, tails, mtypes = (column[:self._filled] for column in self._columns)
        if not self._filled:
            return FleetText([], prefixes, tails, [0], np.empty(0, dtype=np.int64))
        # Stable, so a family's samples stay in node and creation order; 16-bit family
        # numbers sort by radix, several times faster than 32-bit ones.
        order = np.argsort(families.astype(np.uint16) if len(self.fleet._family_names) <= 1 << 16 else families,
                           kind="stable")
        grouped = families[order]
        starts = np.flatnonzero(grouped[1:] != grouped[:-1]) + 1
        bounds = [0, *starts.tolist(), grouped.size]
        firsts = order[bounds[:-1]]
        names = self.fleet._family_names
        headers = [_header(names[fid], mtype)
                   for fid, mtype in zip(families[firsts].tolist(), mtypes[firsts].tolist(), strict=True)]
        self.fleet._forget_families(len(headers))
        return FleetText(headers, prefixes, tails, bounds, order)


def _scrape_columns(size: int) -> tuple[np.ndarray, ...]:
    return (np.empty(size, dtype=np.int32), np.empty(size, dtype=object), np.empty(size, dtype=object),
            np.empty(size, dtype=np.int8))


class FleetText:
    """The fleet series of one scrape, ready to render as Prometheus text: a family header
    per family, and per sample its text before and after the value's start, in node order,
    with the `order` that groups them by family (applied a piece at a time). Holds its own
    arrays, so it renders in pieces while the state changes."""

    def __init__(self, headers: list[str], prefixes: np.ndarray, tails: np.ndarray, bounds: list[int],
                 order: np.ndarray) -> None:
        self.headers = headers
        self.prefixes = prefixes
        self.tails = tails
        self.bounds = bounds
        self.order = order

    def __len__(self) -> int:
        return int(self.tails.size)

    def render(self) -> bytes:
        return b"".join(self.chunks(len(self) + 1))

    def chunks(self, lines: int) -> Iterator[bytes]:
        """The text in pieces of about `lines` samples (a family's header with its first)."""
        bounds = self.bounds
        family = 0
        for start in range(0, len(self), lines):
            stop = min(start + lines, len(self))
            rows = self.order[start:stop]
            parts = [""] * (2 * (stop - start))  # per sample: the text before the value, the rest
            parts[0::2] = self.prefixes[rows].tolist()
            parts[1::2] = self.tails[rows].tolist()
            out = []
            at = start
            while at < stop:
                while bounds[family + 1] <= at:
                    family += 1
                if bounds[family] == at:
                    out.append(self.headers[family])
                end = min(bounds[family + 1], stop)
                out.append("".join(parts[2 * (at - start):2 * (end - start)]))
                at = end
            yield "".join(out).encode()


def _tails(values: np.ndarray, stamps: np.ndarray) -> list[str]:
    """Each sample's text after its name and labels: " value timestamp\n"."""
    distinct, where = np.unique(stamps, return_inverse=True)  # a node's series share a few
    stamp_text = np.array([f" {ts}\n" for ts in distinct.tolist()], dtype=object)[where].tolist()
    return list(map(" ".__add__, map(str.__add__, _values_text(values), stamp_text)))


def _values_text(values: np.ndarray) -> list[str]:
    """Sample values as repr writes them (the text format reads them back exactly): whole
    numbers below 2**53 (most of a fleet's: counters, bytes, states) through integers,
    several times faster than repr; NaN and the infinities by name."""
    finite = np.isfinite(values)
    whole = finite & (np.abs(values) < 2.0 ** 53) & (values == np.trunc(values)) & ~np.signbit(values)
    whole |= finite & (values < 0) & (values > -(2.0 ** 53)) & (values == np.trunc(values))
    text = np.empty(values.size, dtype=object)
    text[whole] = list(map("{}.0".format, values[whole].astype(np.int64).tolist()))  # as repr writes them
    rest = ~whole
    text[rest] = list(map(repr, values[rest].tolist()))
    for i in np.flatnonzero(~finite).tolist():
        v = float(values[i])
        text[i] = "NaN" if v != v else ("+Inf" if v > 0 else "-Inf")
    shown: list[str] = text.tolist()
    return shown


def _identity_labels(raw: Labels) -> Labels:
    """A series' labels as its identity: sorted by name, without site and node (every fleet
    series carries the site and node its key proved, whatever it sent). The same tuple when
    it already is."""
    previous = ""
    for k, _ in raw:
        if k <= previous or k == "site" or k == "node":
            names = {k for k, _ in raw}
            if len(names) == len(raw) and "site" not in names and "node" not in names:
                return tuple(sorted(raw))  # only the order differs: the pairs are shared
            labels = dict(raw)
            labels.pop("site", None)
            labels.pop("node", None)
            return tuple(sorted(labels.items()))
        previous = k
    return raw


def _labels_json(labels: Labels) -> str:
    return json.dumps([[k, v] for k, v in labels])


def _rows(latest: _NodeLatest, at: np.ndarray) -> Iterator[Row]:
    keys, site, node = latest.keys, latest.site, latest.node
    for sid, mtype, ts, value in zip(at.tolist(), latest.mtype[at].tolist(), latest.ts[at].tolist(),
                                     latest.value[at].tolist(), strict=True):
        key = keys[sid]
        if key is not None:
            yield site, node, key[0], _labels_json(key[1]), mtype, ts, value


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _prefix(name: str, labels: Labels, site: str, node: str, pair_text: dict[tuple[str, str], str]) -> str:
    """A series' exposition text before its value: name and labels (sorted, without site
    and node), with the node's rendered `site` and `node` pairs among them in order."""
    parts = []
    placed = 0  # 1: node placed; 2: both
    for pair in labels:
        if placed < 2 and pair[0] > "node":
            if placed == 0:
                parts.append(node)
                placed = 1
            if pair[0] > "site":
                parts.append(site)
                placed = 2
        parts.append(pair_text.get(pair) or _pair_text(pair, pair_text))
    if placed == 0:
        parts.append(node)
    if placed < 2:
        parts.append(site)
    return name + "{" + ",".join(parts) + "}"


def _pair_text(pair: tuple[str, str], pair_text: dict[tuple[str, str], str]) -> str:
    text = pair_text.get(pair)
    if text is None:
        text = pair_text[pair] = f'{pair[0]}="{_escape(pair[1])}"'
    return text


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal as Prometheus compares samples: -0.0 is not 0.0, and the text format makes
    every NaN the same NaN."""
    same: np.ndarray = ((a == b) & ((a != 0.0) | (np.signbit(a) == np.signbit(b)))) | (np.isnan(a) & np.isnan(b))
    return same


def _header(name: str, mtype: int) -> str:
    """A family's HELP and TYPE lines: every sample is exposed under exactly its series
    name, with the agent catalog's HELP where the name is catalogued. (Built per scrape: a
    family is one line of many, and a cache would keep names long gone.)"""
    text = (help_of(name) or FLEET_HELP).replace("\\", r"\\").replace("\n", r"\n")
    if mtype == wire.MetricType.COUNTER and name.endswith("_total") and len(name) > 6:
        kind = "counter"
    elif mtype == wire.MetricType.GAUGE or mtype == wire.MetricType.INFO:
        kind = "gauge"
    else:
        kind = "untyped"
    return f"# HELP {name} {text}\n# TYPE {name} {kind}\n"


class FleetCollector(Collector):
    """prometheus_client collector over a FleetState: each node's accounting."""

    def __init__(self, fleet: FleetState) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        # The collector's own families for the fleet: they describe now, and Prometheus stamps
        # them with its scrape time (fleet series carry their sample times: FleetState.exposition).
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
