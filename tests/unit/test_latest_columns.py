"""The latest state takes a v2 batch by its columns (FleetState.apply_columns) exactly as it
takes the same batch's series (FleetState.apply): same values, same times, same caps and
counts, same expiry and save queues, through series joining, backfill and tables changing."""

from __future__ import annotations

import random

import pytest
from nacl.signing import SigningKey

import wire
from collector.exposition import FleetState, _row, reported_backlog, reported_backlog_columns

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
def test_columns_and_series_make_the_same_latest_state(seed: int) -> None:
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
        by_columns.apply_columns("s", node, opened.columns, now_ms=now)
        assert reported_backlog_columns(opened.columns) == reported_backlog([s for _, s in placed])
        assert state(by_columns) == state(by_series), f"after batch {seq}"
        if seq % 20 == 0:  # a save takes the same entries from both
            got = by_columns.begin_save(seq, 1)
            want = by_series.begin_save(seq, 1)
            assert sorted(map(repr, map(_row, got[0]))) == sorted(map(repr, map(_row, want[0])))
            assert got[1:] == want[1:]
    assert by_columns.total_series > 0
