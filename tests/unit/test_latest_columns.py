"""The latest state takes a v2 batch by its columns (FleetState.apply_columns) exactly as it
takes the same batch's series (FleetState.apply): same values, same times, same caps and
counts, same expiry and save queues, through series joining, backfill and tables changing."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from nacl.signing import SigningKey

import wire
from collector.exposition import FleetState, reported_backlog, reported_backlog_columns

T0 = 1_700_000_000_000
KEY = SigningKey(bytes(range(32)))


class Enrolled:
    public_key = bytes(KEY.verify_key)

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return None


def batches(seed: int) -> list[tuple[str, list[wire.Series]]]:
    """(node, series) per batch: series joining and leaving, points out of order, a backfill
    far behind, a reserved name, now and then a node's clock far ahead."""
    rng = random.Random(seed)
    out = []
    for b in range(60):
        node = f"n{rng.randrange(3)}"
        names = [f"m_{i}" for i in range(rng.randrange(1, 40))]
        if rng.random() < 0.1:
            names.append("waystation_ingest_fake")  # a reserved family: dropped and counted
        if rng.random() < 0.2:
            names.append("waystation_agent_spool_pending_batches")
        base = T0 + b * 60_000 if rng.random() > 0.15 else T0 + b * 60_000 - 7_200_000  # a backfill
        if rng.random() < 0.05:
            base += 10 * 86_400_000  # a node clock far ahead
        series = []
        for name in names:
            n = rng.randrange(1, 4)
            ts = tuple(sorted(base + rng.randrange(0, 60_000) for _ in range(n)))
            labels = (("job", "x"), ("slot", str(rng.randrange(3))))
            series.append(wire.Series(name, labels, wire.MetricType(rng.randrange(4)), ts,
                                      tuple(rng.choice((0.0, 1.5, rng.random())) for _ in ts)))
        # One identity once per batch: the same name and labels twice would be two series of
        # the format but one of the latest state either way.
        unique = {(s.name, s.labels): s for s in series}
        out.append((node, list(unique.values())))
    return out


def state(fleet: FleetState) -> tuple[object, ...]:
    rows = sorted(fleet.snapshot(), key=repr)
    return (rows, sorted(fleet.series_accounting()), fleet.total_series, fleet.over_fleet_limit,
            {k: (v.newest_ms, v.arrival_ms) for k, v in fleet._latest.items()}, fleet.clock_ms)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("read_every", [1, 7])
def test_columns_and_series_make_the_same_latest_state(seed: int, read_every: int) -> None:
    """Read after every batch, or after every seventh (points wait in the tables' slots
    meanwhile); now and then a node sends a v1 batch between its v2 ones."""
    by_series = FleetState(25, series_ttl_s=1800, max_series_total=60)
    by_columns = FleetState(25, series_ttl_s=1800, max_series_total=60)
    builders = {f"n{i}": wire.TableBuilder(1) for i in range(3)}
    tables = wire.MemoryTables()
    for seq, (node, series) in enumerate(batches(seed), 1):
        table, placed = builders[node].place(series)
        frame = wire.sign_batch(wire.prepare_columns(table, placed, 1),
                                wire.BatchContext(KEY, "s", node, seq, wire.ZERO_HASH, T0, 0))
        opened = wire.open_batch(frame, lambda _k: Enrolled(), series_tables=tables, attached_table=table.blob,
                                 as_series=False)
        assert isinstance(opened, wire.VerifiedBatch) and opened.columns is not None and opened.series == []
        now = T0 + seq * 60_000
        by_series.apply("s", node, [s for _, s in placed], now_ms=now)
        if seq % 11 == 5:
            by_columns.apply("s", node, [s for _, s in placed], now_ms=now)  # a v1 batch
        else:
            by_columns.apply_columns("s", node, opened.columns, now_ms=now)
        assert reported_backlog_columns(opened.columns) == reported_backlog([s for _, s in placed])
        if seq % read_every == 0:
            assert state(by_columns) == state(by_series), f"after batch {seq}"
        if seq % 20 == 0:  # a save takes the same entries from both
            got = by_columns.begin_save(seq, 1)
            want = by_series.begin_save(seq, 1)
            assert sorted(map(repr, by_columns.rows(got[0]))) == sorted(map(repr, by_series.rows(want[0])))
            assert got[1:] == want[1:]
    assert state(by_columns) == state(by_series)
    assert by_columns.total_series > 0


def steady_batches(seed: int) -> list[tuple[str, list[wire.Series]]]:
    """Two nodes with a settled set of series, as agents send most of the time: each batch a
    random part of the set, a backfill now and then, a point at a time already held with
    another value, and rarely a series joining (the table changes)."""
    rng = random.Random(seed)
    names = {"n0": [f"m_{i}" for i in range(30)], "n1": [f"m_{i}" for i in range(12)]}
    out = []
    for b in range(120):
        node = f"n{rng.randrange(2)}"
        if rng.random() < 0.04:
            names[node].append(f"joined_{b}")
        base = T0 + b * 10_000
        if rng.random() < 0.15:
            base -= rng.choice((30_000, 900_000))  # a backfill behind what is held
        if rng.random() < 0.1:
            base = T0 + (b - 1) * 10_000  # the previous batch's times again, other values
        series = []
        for name in rng.sample(names[node], k=rng.randrange(len(names[node]) // 2, len(names[node]) + 1)):
            ts = tuple(base + k * 1_000 for k in range(rng.randrange(1, 4)))
            series.append(wire.Series(name, (("job", "x"),), wire.MetricType.GAUGE, ts,
                                      tuple(float(rng.randrange(1000)) for _ in ts)))
        out.append((node, series))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("read_every", "ttl_s"), [(1, 600), (5, 600), (5, 40)])
def test_a_settled_table_is_taken_without_a_step_per_series_and_reads_the_same(
    seed: int, read_every: int, ttl_s: int
) -> None:
    """Batches whose indices all resolved are taken with array operations (no index is
    resolved again); whatever reads the state then (a snapshot, a save, expiry, a v1
    batch, a scrape) sees exactly what taking them series by series makes. With a short
    TTL, series a batch left out expire and their slots are reused."""
    by_series = FleetState(1000, series_ttl_s=ttl_s)
    by_columns = FleetState(1000, series_ttl_s=ttl_s)
    resolving = 0
    resolve_table = by_columns._resolve_table

    def counted(*args: Any) -> Any:
        nonlocal resolving
        resolving += 1
        return resolve_table(*args)

    by_columns._resolve_table = counted  # type: ignore[method-assign]
    builders = {f"n{i}": wire.TableBuilder(1) for i in range(2)}
    tables = wire.MemoryTables()
    by_columns_batches = 0
    for seq, (node, series) in enumerate(steady_batches(seed), 1):
        table, placed = builders[node].place(series)
        frame = wire.sign_batch(wire.prepare_columns(table, placed, 1),
                                wire.BatchContext(KEY, "s", node, seq, wire.ZERO_HASH, T0, 0))
        opened = wire.open_batch(frame, lambda _k: Enrolled(), series_tables=tables, attached_table=table.blob,
                                 as_series=False)
        assert isinstance(opened, wire.VerifiedBatch) and opened.columns is not None
        now = T0 + seq * 10_000
        by_series.apply("s", node, [s for _, s in placed], now_ms=now)
        if seq % 17 == 9:
            by_columns.apply("s", node, [s for _, s in placed], now_ms=now)  # a v1 batch
        else:
            by_columns.apply_columns("s", node, opened.columns, now_ms=now)
            by_columns_batches += 1
        if seq % read_every == 0:
            assert state(by_columns) == state(by_series), f"after batch {seq}"
            assert scrape(by_columns, now) == scrape(by_series, now)
        if seq % 13 == 0:
            got, want = by_columns.begin_save(seq, 1), by_series.begin_save(seq, 1)
            assert sorted(map(repr, by_columns.rows(got[0]))) == sorted(map(repr, by_series.rows(want[0])))
            assert got[1:] == want[1:]
    assert state(by_columns) == state(by_series)
    assert by_columns_batches - resolving > (60 if ttl_s > 60 else 20)  # most batches took the array path
    assert ttl_s > 60 or sum(n for *_, n in by_columns.series_accounting()) > 0
    assert scrape(by_columns, T0 + 10**7) == scrape(by_series, T0 + 10**7)


def scrape(fleet: FleetState, now_ms: int) -> list[str]:
    """The fleet's /metrics lines, in an order that does not depend on slot numbers."""
    return sorted(fleet.exposition(now_ms).render().decode().splitlines())


def test_a_table_with_one_series_under_two_indices_keeps_the_first_point_to_arrive() -> None:
    """Labels that differ only in order are two table indices but one series of the latest
    state: at one timestamp the first point to arrive stays, as apply keeps it, whichever
    index carried it (a flush by index order would take the other)."""
    by_series, by_columns = FleetState(1000), FleetState(1000)
    builder = wire.TableBuilder(1)
    tables = wire.MemoryTables()
    first = (("a", "1"), ("b", "2"))
    again = (("b", "2"), ("a", "1"))
    steps = [((first, 1.0), (again, 1.5)), ((again, 2.0),), ((first, 3.0),), ((again, 4.0), (first, 5.0))]
    for seq, step in enumerate(steps, 1):
        ts = T0 + (seq // 2) * 1000  # batches 2 and 3 share a timestamp
        series = [wire.Series("m", labels, wire.MetricType.GAUGE, (ts,), (value,)) for labels, value in step]
        series.append(wire.Series("other", (), wire.MetricType.GAUGE, (ts,), (float(seq),)))
        table, placed = builder.place(series)
        frame = wire.sign_batch(wire.prepare_columns(table, placed, 1),
                                wire.BatchContext(KEY, "s", "n", seq, wire.ZERO_HASH, T0, 0))
        opened = wire.open_batch(frame, lambda _k: Enrolled(), series_tables=tables, attached_table=table.blob,
                                 as_series=False)
        assert isinstance(opened, wire.VerifiedBatch) and opened.columns is not None
        by_series.apply("s", "n", [s for _, s in placed], now_ms=T0 + 10_000)
        by_columns.apply_columns("s", "n", opened.columns, now_ms=T0 + 10_000)
        if seq == 3:
            assert state(by_columns) == state(by_series)
    assert state(by_columns) == state(by_series)


class Model:
    """The latest state's rules as plainly as they can be written: a dict per node from
    identity (name, labels with the node's site and node, sorted) to its newest point."""

    def __init__(self, per_node: int, total: int, ttl_s: int) -> None:
        self.per_node, self.total, self.ttl_ms = per_node, total, ttl_s * 1000
        self.nodes: dict[str, dict[tuple[object, ...], list[Any]]] = {}
        self.newest: dict[str, int] = {}
        self.swept: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.expired: dict[str, int] = {}
        self.series = self.over = 0

    def apply(self, node: str, series: list[wire.Series], now: int) -> None:
        entries = self.nodes.setdefault(node, {})
        newest = self.newest.get(node, -(1 << 63))
        floor = newest - self.ttl_ms
        for s in series:
            ts = s.timestamps_ms[-1]
            if newest < ts < now + self.ttl_ms:
                newest = ts
            identity = (s.name, tuple(sorted({**dict(s.labels), "site": "s", "node": node}.items())))
            if identity not in entries:
                if ts < floor:
                    continue
                refused = (s.name.startswith("waystation_ingest_") or len(entries) >= self.per_node
                           or self.series >= self.total)
                if refused:
                    self.dropped[node] = self.dropped.get(node, 0) + 1
                    self.over += (not s.name.startswith("waystation_ingest_") and len(entries) < self.per_node)
                    continue
                entries[identity] = [-(1 << 63), 0.0, 0]
                self.series += 1
            entry = entries[identity]
            if ts > entry[0]:
                entry[:] = [ts, s.values[-1], int(s.mtype)]
        self.newest[node] = newest
        if newest - self.swept.get(node, -(1 << 63)) >= max(60_000, self.ttl_ms // 8):
            self.swept[node] = newest
            stale = [k for k, e in entries.items() if e[0] < newest - self.ttl_ms]
            for k in stale:
                del entries[k]
            self.series -= len(stale)
            self.expired[node] = self.expired.get(node, 0) + len(stale)

    def rows(self) -> list[tuple[object, ...]]:
        return sorted(((dict(labels)["node"], name, tuple((k, v) for k, v in labels if k not in ("site", "node")),
                        mtype, ts, value)
                       for entries in self.nodes.values() for (name, labels), (ts, value, mtype) in entries.items()),
                      key=repr)


@pytest.mark.parametrize("seed", range(6))
def test_the_latest_state_keeps_the_rules_a_plain_model_of_them_keeps(seed: int) -> None:
    """Newest point per identity, backfill of a gone series skipped, both caps in the order
    series arrive (counted as refused, and as over the fleet's limit when that one refused),
    expiry by the node's own newest sample: the arrays against a dict per node."""
    fleet = FleetState(25, series_ttl_s=1800, max_series_total=60)
    model = Model(25, 60, 1800)
    builders = {f"n{i}": wire.TableBuilder(1) for i in range(3)}
    tables = wire.MemoryTables()
    for seq, (node, series) in enumerate(batches(seed), 1):
        table, placed = builders[node].place(series)
        frame = wire.sign_batch(wire.prepare_columns(table, placed, 1),
                                wire.BatchContext(KEY, "s", node, seq, wire.ZERO_HASH, T0, 0))
        opened = wire.open_batch(frame, lambda _k: Enrolled(), series_tables=tables, attached_table=table.blob,
                                 as_series=False)
        assert isinstance(opened, wire.VerifiedBatch) and opened.columns is not None
        now = T0 + seq * 60_000
        fleet.apply_columns("s", node, opened.columns, now_ms=now)
        model.apply(node, [s for _, s in placed], now)
        got = sorted(((node, name, tuple(map(tuple, json.loads(labels))), mtype, ts, value)
                      for _, node, name, labels, mtype, ts, value in fleet.snapshot()), key=repr)
        assert got == model.rows(), f"after batch {seq}"
        assert fleet.total_series == model.series and fleet.over_fleet_limit == model.over
        assert {n: (d, e) for _, n, d, e in fleet.series_accounting()} == {
            n: (model.dropped.get(n, 0), model.expired.get(n, 0)) for n in model.nodes}
    assert model.over > 0 and any(model.expired.values())  # both caps and expiry were exercised
