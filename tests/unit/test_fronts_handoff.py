"""What a front hands serve for a verified batch (collector/fronts.py pack_batch/unpack_batch):
the columns come back exactly, the series table is serve's own object when it holds one,
the one sent when not, and asked for when neither."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from nacl.signing import SigningKey

import wire
from collector.fronts import NeedTable, pack_batch, unpack_batch
from wire.columns_np import Columns

T0 = 1_700_000_000_000


def frame() -> wire.Frame:
    key = SigningKey.generate()
    series = [wire.Series("up", (), wire.MetricType.GAUGE, (T0,), (1.0,))]
    raw = wire.encode_data_batch(wire.BatchContext(key, "s1", "n1", 1, wire.ZERO_HASH, T0, 1, 3), series)
    return wire.parse_frame(raw)


def table(tid: bytes = b"t" * 32) -> wire.SeriesTable:
    return wire.SeriesTable(tid, b"blob", ["a", "b"], [(), (("k", "v"),)], [wire.MetricType.GAUGE] * 2)


def batch(t: wire.SeriesTable, shared_column: bool) -> wire.VerifiedBatch:
    rng = np.random.default_rng(7)
    cols = Columns(
        t, np.array([1, 0], dtype=np.int64), np.array([0, 3, 5], dtype=np.int64),
        rng.integers(0, 2**62, 5, dtype=np.int64), rng.standard_normal(5),
        *((np.array([0, 0], dtype=np.int64), np.array([0, 3], dtype=np.int64),
           np.array([T0, T0 + 1, T0 + 2], dtype=np.int64)) if shared_column else (None, None, None)),
    )
    return wire.VerifiedBatch(frame(), key="k", table=t, columns=cols)  # type: ignore[arg-type]


def across(packed: tuple[object, ...]) -> tuple[object, ...]:
    return pickle.loads(pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL))  # type: ignore[no-any-return]


@pytest.mark.parametrize("shared_column", [True, False])
def test_columns_come_back_exactly_and_writable(shared_column: bool) -> None:
    t = table()
    opened = batch(t, shared_column)
    held = wire.MemoryTables()
    held.add("s1", "n1", t)
    got = unpack_batch(across(pack_batch(opened, send_table=False)), held)
    assert got.table is t and got.columns is not None and opened.columns is not None
    for name in ("index", "starts", "timestamps_ms", "values", "column", "column_starts", "column_timestamps"):
        sent, back = getattr(opened.columns, name), getattr(got.columns, name)
        if sent is None:
            assert back is None
            continue
        assert back.dtype == sent.dtype and np.array_equal(back, sent, equal_nan=True), name
        assert back.flags.writeable
    assert got.frame.raw == opened.frame.raw and got.header == opened.header


def test_a_table_serve_does_not_hold_is_asked_for_then_taken_as_sent() -> None:
    t = table()
    opened = batch(t, True)
    held = wire.MemoryTables()
    with pytest.raises(NeedTable):
        unpack_batch(across(pack_batch(opened, send_table=False)), held)
    t.durable = True  # the front's view: its ledger holds it; serve's ledger decides for itself
    got = unpack_batch(across(pack_batch(opened, send_table=True)), held)
    assert got.table is not None and got.table.id == t.id and not got.table.durable
    assert held.get("s1", "n1", t.id) is got.table
    # Later batches naming it take serve's object, not another copy.
    again = unpack_batch(across(pack_batch(opened, send_table=True)), held)
    assert again.table is got.table
