"""Wire v2 (docs/wire.md §10): series tables and fixed-width columns.

Round trips through the whole reader (TableBuilder.place -> prepare_columns -> sign ->
open_batch), the table's ways to the reader (sent with the batch, held per node, encrypted),
hostile input against every decoder (nothing but WireError, ever), each documented reject
reason, the agent's table builder, and §10.8's worked example, which is built here from the
document's layouts by hand and compared byte for byte with the reference encoder.

Run `python3 tests/unit/test_wire_v2.py` to print the blocks docs/wire.md embeds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from nacl.signing import SigningKey

import wire
from wire import Codec, Kind, Limits, MetricType, Series, WireError
from wire.columns import encode_columns
from wire.columns_np import decode_columns
from wire.keys import CollectorKey
from wire.table import (
    TABLE_CODEC_NONE,
    TABLE_CODEC_ZSTD,
    TABLE_FLAG_SEALED,
    CurrentTable,
    encode_table,
    encode_table_raw,
)

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "wire.md"
T0 = 1_700_000_000_000
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
MASK64 = (1 << 64) - 1
LIMITS = Limits()
MAX_RAW = 16 << 20
OPEN_LIMITS = wire.OpenLimits(MAX_RAW, LIMITS)

NODE = SigningKey(hashlib.sha256(b"wire v2 test node").digest())
COLLECTOR_SEALING = PrivateKey(hashlib.sha256(b"wire v2 collector sealing").digest())
PIN = CollectorKey(bytes(SigningKey(hashlib.sha256(b"wire v2 collector signing").digest()).verify_key),
                   bytes(COLLECTOR_SEALING.public_key))
OTHER_SEALING = PrivateKey(hashlib.sha256(b"wire v2 another collector").digest())
OTHER_PIN = CollectorKey(bytes(SigningKey(hashlib.sha256(b"wire v2 another signing").digest()).verify_key),
                         bytes(OTHER_SEALING.public_key))
KEYS = {PIN.key_id: COLLECTOR_SEALING}

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Enrolled:
    """The node's key as open_batch wants it: valid for every site, node and seq."""

    public_key = bytes(NODE.verify_key)

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return None


def lookup(key_id: bytes) -> Enrolled | None:
    return Enrolled() if key_id == wire.key_id(bytes(NODE.verify_key)) else None


def reason(fn: Callable[[], object]) -> str:
    with pytest.raises(WireError) as info:
        fn()
    return info.value.reason


def f64_bits(values: tuple[float, ...] | list[float]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def assert_same(got: list[Series], want: list[Series]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.name, g.labels, g.timestamps_ms) == (w.name, w.labels, w.timestamps_ms)
        assert g.mtype is MetricType(w.mtype)
        assert f64_bits(g.values) == f64_bits(w.values), (g.values, w.values)  # bit for bit


def ctx(seq: int = 1, node: str = "n1") -> wire.BatchContext:
    return wire.BatchContext(NODE, "s1", node, seq, wire.ZERO_HASH, T0 + 5000, 7, 1)


def sign_v2(
    series: list[Series],
    builder: wire.TableBuilder | None = None,
    *,
    seq: int = 1,
    node: str = "n1",
    seal_to: CollectorKey | None = None,
    table_seal_to: CollectorKey | None = None,
    codec: Codec = Codec.ZSTD,
) -> tuple[wire.CurrentTable, list[tuple[int, Series]], bytes]:
    """(table, placed series, signed frame): what the agent does for one batch."""
    builder = builder or wire.TableBuilder(zstd_level=1)
    table, placed = builder.place(series, table_seal_to)
    prepared = wire.prepare_columns(table, placed, 1, T0, codec=codec)
    if seal_to is not None:
        prepared = wire.seal_prepared(prepared, seal_to)
    return table, placed, wire.sign_batch(prepared, ctx(seq, node))


def open_v2(
    raw: bytes,
    tables: wire.TableStore | None = None,
    attached: bytes | None = None,
    keys: dict[bytes, PrivateKey] | None = KEYS,
) -> wire.VerifiedBatch | wire.Refusal:
    return wire.open_batch(raw, lookup, OPEN_LIMITS, sealing_keys=keys, series_tables=tables,
                           attached_table=attached)


def opened(raw: bytes, tables: wire.TableStore | None = None, attached: bytes | None = None,
           keys: dict[bytes, PrivateKey] | None = KEYS) -> wire.VerifiedBatch:
    got = open_v2(raw, tables, attached, keys)
    assert isinstance(got, wire.VerifiedBatch), got
    return got


def refused(raw: bytes, tables: wire.TableStore | None = None, attached: bytes | None = None,
            keys: dict[bytes, PrivateKey] | None = KEYS) -> wire.Refusal:
    got = open_v2(raw, tables, attached, keys)
    assert isinstance(got, wire.Refusal), "a batch that should be refused opened"
    return got


def gauge(name: str, ts: tuple[int, ...], values: tuple[float, ...], *labels: tuple[str, str]) -> Series:
    return Series(name, tuple(labels), MetricType.GAUGE, ts, values)


# ---------------------------------------------------------------- strategies

metric_names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,12}", fullmatch=True)
label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True).filter(lambda k: not k.startswith("__"))
label_values = st.text(max_size=10)  # any UTF-8, empty included (surrogates are not generated)


def nan_with(payload: int, negative: bool) -> float:
    x: float = struct.unpack("<d", struct.pack("<Q", (negative << 63) | 0x7FF0000000000000 | payload))[0]
    return x


STALE = nan_with(2, False)  # Prometheus' staleness marker, 0x7ff0000000000002 (a signalling NaN)
SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, STALE, 5e-324, -5e-324, 2.2250738585072014e-308,
           1.7976931348623157e308, -1.7976931348623157e308, 2.0**53, -(2.0**53), 2.0**53 + 2, 2.0**63, 0.1, 1 / 3]
one_value = st.one_of(
    st.floats(),  # every float: NaN, +-inf, -0.0, subnormals
    st.sampled_from(SPECIAL),
    st.builds(lambda i, k: i / 10**k, st.integers(-(2**53), 2**53), st.integers(0, 9)),
    st.integers(-(2**53) - 4, 2**53 + 4).map(float),
    st.builds(nan_with, st.integers(1, 2**52 - 1), st.booleans()),
    st.integers(0, MASK64).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0]),  # any bit pattern
)


@st.composite
def value_tuples(draw: st.DrawFn, n: int) -> tuple[float, ...]:
    kind = draw(st.sampled_from(["any", "const", "decimal_walk", "counter"]))
    if kind == "const":
        return (draw(one_value),) * n
    if kind == "decimal_walk":
        k = draw(st.integers(0, 9))
        i = draw(st.integers(-(2**53), 2**53))
        out = []
        for _ in range(n):
            out.append(i / 10**k)
            i = max(-(2**53), min(2**53, i + draw(st.integers(-1000, 1000))))
        return tuple(out)
    if kind == "counter":
        v = float(draw(st.integers(0, 2**45)))
        out = []
        for _ in range(n):
            out.append(v)
            v += draw(st.integers(0, 10**6))
        return tuple(out)
    return tuple(draw(st.lists(one_value, min_size=n, max_size=n)))


@st.composite
def timestamp_columns(draw: st.DrawFn) -> tuple[int, ...]:
    n = draw(st.integers(1, 12))
    if draw(st.booleans()):  # anywhere in i64: v2 deltas wrap mod 2**64, so any sequence travels
        return tuple(draw(st.lists(st.integers(I64_MIN, I64_MAX), min_size=n, max_size=n)))
    first = draw(st.integers(-(2**50), 2**50))
    step = draw(st.integers(-(10**4), 10**7))
    return tuple(first + step * i + draw(st.integers(-50, 50)) for i in range(n))


@st.composite
def series_lists(draw: st.DrawFn) -> list[Series]:
    cols = draw(st.lists(timestamp_columns(), min_size=1, max_size=3))
    pool = draw(st.lists(st.tuples(metric_names, st.dictionaries(label_names, label_values, max_size=3),
                                   st.sampled_from(list(MetricType))), min_size=1, max_size=5))
    out = []
    for _ in range(draw(st.integers(0, 7))):
        name, labels, mtype = draw(st.sampled_from(pool))  # identities repeat within a batch
        ts = draw(st.sampled_from(cols))  # series share columns
        out.append(Series(name, tuple(labels.items()), mtype, ts, draw(value_tuples(len(ts)))))
    return out


# ---------------------------------------------------------------- round trips


@FAST
@given(series_lists(), st.booleans())
def test_a_batch_sent_with_its_table_opens_to_exactly_its_series(series: list[Series], sealed: bool) -> None:
    pin = PIN if sealed else None
    table, placed, raw = sign_v2(series, seal_to=pin, table_seal_to=pin)
    got = opened(raw, attached=table.blob)
    assert got.columns is not None and got.columns.index.tolist() == [i for i, _ in placed]
    assert_same(got.series, [s for _, s in placed])
    assert got.table is not None and got.table.id == table.id and len(got.table) == table.series_count
    h = got.header
    assert (h.version, h.kind, h.series_count, h.sample_count) == (2, Kind.DATA, len(series),
                                                                  sum(len(s.values) for s in series))
    if series:
        assert h.window_start_ms == min(t for s in series for t in s.timestamps_ms)
        assert h.window_end_ms == max(t for s in series for t in s.timestamps_ms)
    else:
        assert h.window_start_ms == h.window_end_ms == T0


@FAST
@given(st.lists(series_lists(), min_size=1, max_size=4))
def test_batches_open_through_the_tables_the_reader_holds(batches: list[list[Series]]) -> None:
    """The client's loop: send bare; on unknown_table send again with the table."""
    builder = wire.TableBuilder(zstd_level=1)
    tables = wire.MemoryTables()
    sent: set[bytes] = set()
    for seq, series in enumerate(batches, 1):
        table, placed, raw = sign_v2(series, builder, seq=seq)
        first = open_v2(raw, tables)
        if table.id in sent:
            assert isinstance(first, wire.VerifiedBatch), first
            got = first
        else:
            assert isinstance(first, wire.Refusal) and (first.result, first.signed) == ("unknown_table", True)
            got = opened(raw, tables, wire.split_body(wire.with_table(table.blob, raw))[0])
            sent.add(table.id)
        assert_same(got.series, [s for _, s in placed])
        assert tables.get("s1", "n1", table.id) is got.table


@pytest.mark.parametrize(
    "values",
    [
        (0.0, -0.0, 0.0),
        (-0.0,),
        (STALE,),
        (1.0, STALE, 2.0),
        (STALE, STALE, math.nan, nan_with(2**51 + 5, True)),
        (math.inf, -math.inf, 5e-324, -5e-324, 2.2250738585072014e-308),
        (2.0**53, -(2.0**53), 2.0**53),  # scale 0, the edges of +-2**53
        (2.0**53 - 1, 1 - 2.0**53),
        (2.0**53 + 2, 1.0),  # beyond 2**53: FLOAT64
        (9007199.254740992, -9007199.254740992),  # 2**53 / 10**9: scale 9 at the edge
        (0.1, 0.2, 0.30000000000000004),
        (41.5, 41.75, 42.0),
        (1e308, -1e308),
    ],
)
def test_edge_values_travel_bit_for_bit(values: tuple[float, ...]) -> None:
    s = [gauge("x", tuple(range(len(values))), values)]
    table, placed, raw = sign_v2(s)
    assert_same(opened(raw, attached=table.blob).series, s)


@pytest.mark.parametrize(
    "ts",
    [
        (I64_MIN, I64_MAX),
        (I64_MAX, I64_MIN, 0, I64_MAX),
        (I64_MIN,),
        (I64_MAX, I64_MAX - 1, I64_MAX),
        (0, -1, 1, -(2**62), 2**62),
    ],
)
def test_any_int64_timestamps_travel(ts: tuple[int, ...]) -> None:
    s = [gauge("t", ts, tuple(float(i) for i in range(len(ts))))]
    table, _, raw = sign_v2(s)
    assert_same(opened(raw, attached=table.blob).series, s)


def test_the_encoder_refuses_timestamps_outside_int64_and_series_without_points() -> None:
    table = wire.TableBuilder(1)
    for s in ([gauge("t", (I64_MAX + 1,), (1.0,))], [gauge("t", (I64_MIN - 1, 0), (1.0, 2.0))],
              [gauge("t", (), ())], [gauge("t", (1, 2), (1.0,))]):
        cur, placed = table.place(s)
        assert reason(functools.partial(encode_columns, cur, placed)) == "schema"


def test_many_points_several_columns_and_one_point_series() -> None:
    long_ts = tuple(T0 + 1000 * i for i in range(5000))
    s = [
        gauge("long", long_ts, tuple(float(i % 7) / 4 for i in range(5000))),
        gauge("long_float", long_ts, tuple(math.sin(i) for i in range(5000))),
        gauge("one", (T0,), (3.25,)),
        gauge("one_nan", (T0 + 1,), (STALE,)),
        gauge("one_float", (T0 + 2,), (1 / 3,)),
        gauge("short", (T0, T0 - 5, T0 + 10**9), (1.0, 2.0, 3.0)),
    ]
    table, placed, raw = sign_v2(s)
    got = opened(raw, attached=table.blob)
    assert_same(got.series, s)
    assert got.columns is not None and got.columns.starts.tolist() == [0, 5000, 10000, 10001, 10002, 10003, 10006]
    assert got.columns.column is not None and got.columns.column.tolist() == [0, 0, 1, 2, 3, 4]
    assert got.series[0].timestamps_ms is got.series[1].timestamps_ms  # one column, one tuple
    assert got.columns.timestamps_ms.tolist() == [t for x in s for t in x.timestamps_ms]
    assert got.columns.values.astype("<f8").tobytes() == f64_bits([v for x in s for v in x.values])


def test_one_identity_twice_in_a_batch_gets_an_index_per_occurrence() -> None:
    a = gauge("dup", (T0,), (1.0,), ("k", "v"))
    b = gauge("dup", (T0 + 1,), (2.0,), ("k", "v"))
    builder = wire.TableBuilder(1)
    table, placed, raw = sign_v2([a, b, a], builder)
    assert [i for i, _ in placed] == [0, 1, 2] and table.series_count == 3
    assert_same(opened(raw, attached=table.blob).series, [a, b, a])
    # The same batch again uses the same three indices; one occurrence fewer uses the first two.
    assert [i for i, _ in builder.place([a, b, a])[1]] == [0, 1, 2]
    again, placed2 = builder.place([b, a])
    assert again.id == table.id and [i for i, _ in placed2] == [0, 1]


def test_an_empty_batch_opens_with_no_series() -> None:
    table, placed, raw = sign_v2([])
    got = opened(raw, attached=table.blob)
    assert got.series == [] and placed == [] and table.series_count == 0
    assert got.columns is not None and got.columns.starts.tolist() == [0]


def test_a_v1_batch_opens_next_to_v2_with_the_same_reader() -> None:
    tables = wire.MemoryTables()
    s = [gauge("up", (T0,), (1.0,), ("job", "a"))]
    v1 = wire.sign_batch(wire.prepare_data(s, 1), ctx(1))
    table, _, v2 = sign_v2(s, seq=2)
    got1 = opened(v1, tables)
    assert got1.header.version == 1 and got1.table is None and got1.columns is None
    assert_same(got1.series, s)
    assert_same(opened(v2, tables, table.blob).series, s)
    assert_same(opened(v1, tables).series, s)
    # A table sent with a batch that names none is malformed.
    assert refused(v1, tables, table.blob).result == "malformed"


def test_drop_receipts_and_key_rotations_read_the_same_in_version_2() -> None:
    receipt = wire.DropReceipt(((1, 3),), T0, T0 + 10, 3, 30, 300, "spool_quota")
    v1 = wire.parse_frame(wire.encode_drop_receipt(ctx(5), receipt))
    h = v1.header
    p = wire.Prepared(Kind.DROP_RECEIPT, Codec.NONE, v1.payload, h.raw_len, h.window_start_ms, h.window_end_ms,
                      0, 0, version=wire.WIRE_VERSION_2)
    got = opened(wire.sign_batch(p, ctx(5)))
    assert got.header.version == 2 and got.drop == receipt


def test_the_header_counts_must_match_the_payload() -> None:
    s = [gauge("a", (T0, T0 + 1), (1.0, 2.0))]
    table, placed = wire.TableBuilder(1).place(s)
    p = wire.prepare_columns(table, placed, 1)
    for counts in ((2, 2), (1, 3), (0, 0)):
        bad = dataclasses.replace(p, series_count=counts[0], sample_count=counts[1])
        assert refused(wire.sign_batch(bad, ctx()), attached=table.blob).result == "schema"


# ---------------------------------------------------------------- where the table comes from


def test_a_batch_whose_table_is_not_held_is_refused_unknown_table_once_signed() -> None:
    table, _, raw = sign_v2([gauge("up", (T0,), (1.0,))])
    for tables in (None, wire.MemoryTables()):
        r = refused(raw, tables)
        assert (r.result, r.signed) == ("unknown_table", True)
        assert r.header is not None and r.header.seq == 1 and table.id.hex()[:16] in r.detail
    # Unsigned (a bad signature) it is refused for that, before the table is looked for.
    bad = bytearray(raw)
    bad[-1] ^= 1
    assert refused(bytes(bad)).result == "bad_signature"


def test_a_table_that_is_not_the_one_the_batch_names_is_malformed() -> None:
    table, _, raw = sign_v2([gauge("up", (T0,), (1.0,))])
    other = wire.TableBuilder(1).place([gauge("down", (T0,), (1.0,))])[0]
    tables = wire.MemoryTables()
    r = refused(raw, tables, other.blob)
    assert r.result == "malformed" and "not the one it names" in r.detail
    assert tables.get("s1", "n1", other.id) is None  # nothing kept
    # Also when the reader holds the right one.
    opened(raw, tables, table.blob)
    assert refused(raw, tables, other.blob).result == "malformed"
    assert refused(raw, tables, table.blob + b"\0").result == "malformed"


def test_tables_are_per_node() -> None:
    s = [gauge("up", (T0,), (1.0,))]
    tables = wire.MemoryTables()
    table1, _, raw1 = sign_v2(s, node="n1")
    table2, _, raw2 = sign_v2(s, node="n2")
    assert table1.id == table2.id  # the same series, the same bytes
    opened(raw1, tables, table1.blob)
    assert refused(raw2, tables).result == "unknown_table"
    opened(raw2, tables, table2.blob)
    opened(raw2, tables)


def test_a_table_is_kept_only_with_a_batch_that_opened() -> None:
    s = [gauge("up", (T0, T0 + 1), (1.0, 2.0))]
    table, placed = wire.TableBuilder(1).place(s)
    p = wire.prepare_columns(table, placed, 1)
    tables = wire.MemoryTables()
    bad = wire.sign_batch(dataclasses.replace(p, sample_count=3), ctx())
    assert refused(bad, tables, table.blob).result == "schema"
    assert tables.get("s1", "n1", table.id) is None
    opened(wire.sign_batch(p, ctx()), tables, table.blob)
    assert tables.get("s1", "n1", table.id) is not None


def test_memory_tables_forget_the_least_recently_used_and_ask_load_on_a_miss() -> None:
    loaded: list[bytes] = []
    held: dict[bytes, wire.SeriesTable] = {}

    class Durable(wire.MemoryTables):
        def load(self, site: str, node: str, table_id: bytes) -> wire.SeriesTable | None:
            loaded.append(table_id)
            return held.get(table_id)

    tables = Durable(max_tables=2)
    blobs = [wire.TableBuilder(1).place([gauge(f"m{i}", (T0,), (1.0,))])[0] for i in range(3)]
    opened_tables = [wire.open_table(b.blob, LIMITS, MAX_RAW) for b in blobs]
    for t in opened_tables:
        tables.add("s", "n", t)
    assert tables.get("s", "n", blobs[0].id) is None and loaded == [blobs[0].id]  # trimmed
    held[blobs[0].id] = opened_tables[0]
    assert tables.get("s", "n", blobs[0].id) is opened_tables[0]
    assert tables.get("s", "n", blobs[2].id) is opened_tables[2]
    tables.add("s", "n", opened_tables[0])
    assert tables.get("s", "n", blobs[1].id) is None  # the least recently used went


def test_an_encrypted_table_and_payload_open_with_the_collectors_key() -> None:
    s = [gauge("secret_metric_name", (T0, T0 + 1), (1.5, 2.5), ("secret_label", "secret_value"))]
    table, _, raw = sign_v2(s, seal_to=PIN, table_seal_to=PIN)
    head = wire.parse_table_head(table.blob)
    assert head.flags == TABLE_FLAG_SEALED and table.blob[20] == 1 and table.blob[21:29] == PIN.key_id
    for blob in (table.blob, raw):
        assert b"secret" not in blob
    assert_same(opened(raw, attached=table.blob).series, s)
    # The table alone, encrypted to a collector whose key the reader does not hold.
    table2, _, raw2 = sign_v2(s, seal_to=PIN, table_seal_to=OTHER_PIN)
    r = refused(raw2, attached=table2.blob)
    assert (r.result, r.signed) == ("sealed_to_unknown_key", True) and OTHER_PIN.key_id.hex() in r.detail
    r = refused(raw2, attached=table2.blob, keys=None)
    assert r.result == "sealed_to_unknown_key"
    # An envelope that names our key but was made for another: undecryptable.
    forged = table2.blob[:21] + PIN.key_id + table2.blob[29:]
    assert reason(lambda: wire.open_table(forged, LIMITS, MAX_RAW, KEYS)) == "undecryptable"


def test_every_new_seal_key_makes_a_new_table_of_the_same_series() -> None:
    s = [gauge("up", (T0,), (1.0,))]
    builder = wire.TableBuilder(1)
    plain = builder.place(s)[0]
    assert builder.place(s)[0] is plain
    sealed = builder.place(s, PIN)[0]
    assert sealed.id != plain.id and sealed.series_count == plain.series_count
    assert builder.place(s, PIN)[0] is sealed
    other = builder.place(s, OTHER_PIN)[0]
    assert other.id not in (plain.id, sealed.id)
    back = builder.place(s)[0]
    assert back.id == plain.id  # unencrypted tables are the same bytes again
    assert wire.open_table(other.blob, LIMITS, MAX_RAW, {OTHER_PIN.key_id: OTHER_SEALING}).names == ["up"]


def test_split_body_and_with_table() -> None:
    table, _, raw = sign_v2([gauge("up", (T0,), (1.0,))])
    assert wire.split_body(raw) == (None, raw)
    assert wire.with_table(None, raw) == raw
    assert wire.split_body(wire.with_table(table.blob, raw)) == (table.blob, raw)
    for body in (table.blob, table.blob[:10], b"WSTB"):
        assert reason(functools.partial(wire.split_body, body)) == "malformed"


# ---------------------------------------------------------------- the table builder


def series_named(names: list[str]) -> list[Series]:
    return [gauge(n, (T0,), (1.0,)) for n in names]


def test_appended_series_keep_every_earlier_index() -> None:
    builder = wire.TableBuilder(1)
    t1, p1 = builder.place(series_named(["a", "b", "c"]))
    t2, p2 = builder.place(series_named(["d", "b", "a"]))
    assert t2.id != t1.id and t2.series_count == 4
    assert [(i, s.name) for i, s in p2] == [(0, "a"), (1, "b"), (3, "d")]
    t3, p3 = builder.place(series_named(["c"]))
    assert t3 is t2 and [i for i, _ in p3] == [2]
    table = wire.open_table(t2.blob, LIMITS, MAX_RAW)
    assert table.names == ["a", "b", "c", "d"]
    # Batches signed against the first table still open with it.
    raw = wire.sign_batch(wire.prepare_columns(t1, p1, 1), ctx())
    assert [s.name for s in opened(raw, attached=t1.blob).series] == ["a", "b", "c"]


def test_a_table_grown_past_twice_the_batch_and_64_series_starts_afresh() -> None:
    builder = wire.TableBuilder(1)
    first = [f"a{i}" for i in range(40)]
    builder.place(series_named(first))
    t, _ = builder.place(series_named([f"b{i}" for i in range(40)]))
    assert t.series_count == 80  # 80 > 64 but not > 2 x 40: appended
    t, placed = builder.place(series_named(["a1"] + [f"b{i}" for i in range(39)] + ["c"]))
    assert t.series_count == 81 and placed[-1][0] == 80  # 81 > 64 but not > 2 x 41: appended
    t, placed = builder.place(series_named([f"c{i}" for i in range(5)]))
    assert t.series_count == 5 and [i for i, _ in placed] == [0, 1, 2, 3, 4]  # 86 > 2 x 5: afresh
    # A batch that only uses a few series of a big table keeps it: nothing to append.
    big = [f"d{i}" for i in range(100)]
    t_big, _ = builder.place(series_named(big))
    assert t_big.series_count == 105  # 105 > 64 but not > 2 x 100: appended
    t_small, placed = builder.place(series_named(big[:3]))
    assert t_small is t_big and [i for i, _ in placed] == [5, 6, 7]
    # Up to 64 series a table only grows.
    small = wire.TableBuilder(1)
    for i in range(64):
        t, _ = small.place(series_named([f"e{i}"]))
    assert t.series_count == 64
    t, placed = small.place(series_named(["f"]))
    assert t.series_count == 1 and placed[0][0] == 0


def test_a_table_that_would_pass_max_series_starts_afresh() -> None:
    builder = wire.TableBuilder(1, max_series=10)
    builder.place(series_named([f"a{i}" for i in range(8)]))
    t, _ = builder.place(series_named([f"a{i}" for i in range(6)] + ["b1", "b2"]))
    assert t.series_count == 10
    t, placed = builder.place(series_named(["a0", "c1"]))
    assert t.series_count == 2 and [(i, s.name) for i, s in placed] == [(0, "a0"), (1, "c1")]


def test_an_empty_batch_keeps_the_current_table() -> None:
    builder = wire.TableBuilder(1)
    t, _ = builder.place(series_named([f"a{i}" for i in range(100)]))
    assert builder.place([])[0] is t
    assert builder.place(series_named(["a5"]))[0] is t
    assert wire.TableBuilder(1).place([])[0].series_count == 0


def test_a_series_that_cannot_be_encoded_leaves_the_builder_as_it_was() -> None:
    builder = wire.TableBuilder(1)
    t, _ = builder.place(series_named(["a"]))
    unencodable = Series("bad", (("k", "\udc80"),), MetricType.GAUGE, (T0,), (1.0,))
    with pytest.raises(UnicodeEncodeError):
        builder.place([*series_named(["a"]), unencodable])
    t2, placed = builder.place(series_named(["a", "b"]))
    assert t2.series_count == 2 and [i for i, _ in placed] == [0, 1]
    assert wire.open_table(t2.blob, LIMITS, MAX_RAW).names == ["a", "b"]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (Series("bad name", (), MetricType.GAUGE, (T0,), (1.0,)), "not a valid Prometheus name"),
        (Series("up", (("__x", "1"),), MetricType.GAUGE, (T0,), (1.0,)), "label name '__x'"),
        (Series("up", tuple((f"l{i}", "v") for i in range(65)), MetricType.GAUGE, (T0,), (1.0,)), "65 labels"),
        (Series("up", (("k", "v" * 4097),), MetricType.GAUGE, (T0,), (1.0,)), "over 4096 bytes"),
    ],
)
def test_a_series_the_collector_would_refuse_never_enters_the_table(bad: Series, why: str) -> None:
    """Once in, such a series would get every later batch naming the table refused, with it
    or without it: the builder refuses it (the agent drops only that series) and stays as it was."""
    builder = wire.TableBuilder(1)
    t1, _ = builder.place(series_named(["a"]))
    with pytest.raises(wire.WireError, match=why) as info:
        builder.place([*series_named(["a"]), bad])
    assert info.value.reason == "schema"
    t2, placed = builder.place(series_named(["a"]))
    assert t2.id == t1.id and [i for i, _ in placed] == [0]


# ---------------------------------------------------------------- hand-built payloads (the document's layouts)

HEAD = struct.Struct("<32sIIIII")  # §10.4, spelled out here rather than taken from wire.columns
TABLE_HEAD = struct.Struct("<4sBBBBIII")  # §10.1


def planes(words: list[int]) -> bytes:
    """§10.4: plane j holds byte j (least significant first) of every word."""
    return bytes((w >> (8 * j)) & 0xFF for j in range(8) for w in words)


def u32s(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def raw_table(strings: list[bytes], series: list[tuple[int, int, list[tuple[int, int]]]],
              count: int | None = None) -> bytes:
    out = u32s([len(strings)]) + u32s([len(s) for s in strings]) + b"".join(strings)
    out += u32s([len(series) if count is None else count])
    for name, mtype, labels in series:
        out += struct.pack("<IBH", name, mtype, len(labels)) + b"".join(struct.pack("<II", k, v) for k, v in labels)
    return out


def table_blob(raw: bytes, *, series_count: int, magic: bytes = b"WSTB", version: int = 1, codec: int = 0,
               flags: int = 0, reserved: int = 0, raw_len: int | None = None, payload: bytes | None = None) -> bytes:
    payload = raw if payload is None else payload
    return TABLE_HEAD.pack(magic, version, codec, flags, reserved, series_count,
                           len(raw) if raw_len is None else raw_len, len(payload)) + payload


# A table of three gauges a, b{k="v"}, c.
TABLE_RAW = raw_table([b"a", b"b", b"k", b"v", b"c"], [(0, 0, []), (1, 0, [(2, 3)]), (4, 0, [])])
TABLE_BLOB = table_blob(TABLE_RAW, series_count=3)
TABLE = wire.open_table(TABLE_BLOB, LIMITS, MAX_RAW)
TID = hashlib.sha256(TABLE_BLOB).digest()


def columns_raw(
    *,
    gaps: list[int] | None = None,
    cols: list[int] | None = None,
    lens: list[int] | None = None,
    scales: list[int] | None = None,
    ts_words: list[int] | None = None,
    value_words: list[int] | None = None,
    head: dict[str, int] | None = None,
    tid: bytes = TID,
) -> bytes:
    """Series a (index 0, column 0, scale 0: 5, 6) and c (index 2, column 1, FLOAT64: 1/3)."""
    gaps = [1, 2] if gaps is None else gaps
    cols = [0, 1] if cols is None else cols
    lens = [2, 1] if lens is None else lens
    scales = [0, 255] if scales is None else scales
    ts_words = [T0, 1000, T0 + 7] if ts_words is None else ts_words
    third = struct.unpack("<Q", struct.pack("<d", 1 / 3))[0]
    value_words = [5, 1, third] if value_words is None else value_words
    fields = {"T": 3, "m": len(gaps), "c": len(lens), "Pc": len(ts_words), "P": len(value_words)}
    fields.update(head or {})
    return (HEAD.pack(tid, fields["T"], fields["m"], fields["c"], fields["Pc"], fields["P"]) + u32s(gaps)
            + u32s(cols) + u32s(lens) + bytes(scales) + planes([w & MASK64 for w in ts_words])
            + planes([w & MASK64 for w in value_words]))


def decoded(raw: bytes) -> list[Series]:
    return decode_columns(raw, TABLE, LIMITS).to_series()


def test_the_hand_built_payload_is_what_the_encoder_writes() -> None:
    want = [Series("a", (), MetricType.GAUGE, (T0, T0 + 1000), (5.0, 6.0)),
            Series("c", (), MetricType.GAUGE, (T0 + 7,), (1 / 3,))]
    assert_same(decoded(columns_raw()), want)
    current = CurrentTable(TID, TABLE_BLOB, 3)
    assert encode_columns(current, [(0, want[0]), (2, want[1])]) == columns_raw()
    assert encode_table_raw([TABLE.identity(i) for i in range(3)]) == TABLE_RAW
    assert encode_table([TABLE.identity(i) for i in range(3)], codec=TABLE_CODEC_NONE) == TABLE_BLOB


def test_words_wrap_mod_2_64() -> None:
    # Timestamps: 0 - 1 = -1, then + 2**63 wraps to 2**63 - 1.
    (a, c) = decoded(columns_raw(ts_words=[0, MASK64, 1 << 63], lens=[2, 1], value_words=[0, 0, 0]))
    assert a.timestamps_ms == (0, -1) and c.timestamps_ms == (I64_MIN,)
    (a, _) = decoded(columns_raw(ts_words=[I64_MAX, 1, 5]))
    assert a.timestamps_ms == (I64_MAX, I64_MIN)
    # Scaled values: the running sum is read as i64, so a word of 2**64 - 3 is -3.
    (a, _) = decoded(columns_raw(value_words=[-3, 10, 0]))
    assert a.values == (-3.0, 7.0)
    (a, _) = decoded(columns_raw(value_words=[1 << 53, -(1 << 54), 0], scales=[3, 255]))
    assert a.values == (2.0**53 / 1000, -(2.0**53) / 1000)
    # FLOAT64: each word XOR the running value, so a word of 0 repeats the value exactly.
    (_, c) = decoded(columns_raw(value_words=[0, 0, 0x7FF0000000000002]))
    assert f64_bits(c.values) == struct.pack("<Q", 0x7FF0000000000002)


def test_a_scaled_value_is_one_correctly_rounded_division() -> None:
    for k in range(10):
        for i in (1, 3, 7, 41_75, 2**53, -(2**53), 123_456_789_012_345):
            (a, _) = decoded(columns_raw(value_words=[i, 0, 0], scales=[k, 255]))
            assert a.values == (i / 10**k, i / 10**k), (i, k)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (columns_raw()[:51], "malformed"),  # shorter than the head
        (columns_raw(gaps=[0, 2]), "malformed"),  # gap 0
        (columns_raw(gaps=[1, 0]), "malformed"),
        (columns_raw(gaps=[1, 3]), "malformed"),  # index 3 >= T
        (columns_raw(gaps=[4, 1]), "malformed"),
        (columns_raw(gaps=[1, 0xFFFFFFFF]), "malformed"),
        (columns_raw(cols=[0, 2]), "malformed"),  # column index >= c
        (columns_raw(cols=[0xFFFFFFFF, 1]), "malformed"),
        (columns_raw(lens=[2, 0], ts_words=[T0, 1000]), "malformed"),  # column_len 0
        (columns_raw(lens=[2, 1], ts_words=[T0, 1, 2, 3]), "malformed"),  # sum(column_len) != Pc
        (columns_raw(lens=[1, 2], head={"P": 4}, value_words=[1, 2, 3, 4]), "malformed"),  # sum(n_i) != P
        (columns_raw(cols=[0, 0]), "malformed"),  # series points 2 + 2 != P 3
        (columns_raw(scales=[10, 255]), "malformed"),  # bad scales
        (columns_raw(scales=[0, 254]), "malformed"),
        (columns_raw(scales=[0, 100]), "malformed"),
        (columns_raw(value_words=[(1 << 53) + 1, 0, 0]), "malformed"),  # beyond 2**53
        (columns_raw(value_words=[1 << 53, 1, 0]), "malformed"),
        (columns_raw(value_words=[-(1 << 53), -1, 0]), "malformed"),
        (columns_raw(value_words=[MASK64 >> 1, 0, 0]), "malformed"),
        (columns_raw() + b"\0", "malformed"),  # trailing bytes
        (columns_raw()[:-1], "malformed"),
        (columns_raw(head={"T": 4}), "malformed"),  # T is not the table's
        (columns_raw(head={"T": 2}), "malformed"),
        (columns_raw(tid=bytes(32)), "malformed"),  # another table's id
        (columns_raw(head={"m": 3}), "malformed"),  # counts that do not make the size
        (columns_raw(head={"Pc": 4}), "malformed"),
        (columns_raw(head={"c": 0xFFFFFFFF}), "limit"),
        (columns_raw(head={"m": LIMITS.max_series + 1}), "limit"),
        (columns_raw(head={"P": LIMITS.max_samples + 1}), "limit"),
        (columns_raw(head={"Pc": 0xFFFFFFFF}), "limit"),
    ],
)
def test_each_payload_rule_names_its_reason(raw: bytes, why: str) -> None:
    assert reason(lambda: decoded(raw)) == why


def test_the_edges_of_the_payload_rules_are_accepted() -> None:
    decoded(columns_raw(value_words=[1 << 53, 0, 0]))
    decoded(columns_raw(value_words=[-(1 << 53), 0, 0]))
    decoded(columns_raw(gaps=[2, 1], cols=[1, 0], lens=[1, 2], ts_words=[T0, T0, 5],
                        value_words=[0x3FE0000000000000, 5, 1], scales=[255, 0]))
    for k in range(10):
        decoded(columns_raw(scales=[k, 255]))
    # A column no series uses is allowed (as in v1), if not empty.
    decoded(columns_raw(lens=[2, 1, 3], ts_words=[T0, 1, T0, 1, 2, 3]))
    # No series at all.
    assert decoded(columns_raw(gaps=[], cols=[], lens=[], scales=[], ts_words=[], value_words=[])) == []


def limits_table(**over: int) -> Limits:
    return dataclasses.replace(LIMITS, **over)


@pytest.mark.parametrize(
    ("blob", "why", "limits"),
    [
        (TABLE_BLOB[:19], "malformed", LIMITS),  # shorter than its head
        (table_blob(TABLE_RAW, series_count=3, magic=b"WSB1"), "malformed", LIMITS),
        (table_blob(TABLE_RAW, series_count=3, version=2), "unsupported_version", LIMITS),
        (table_blob(TABLE_RAW, series_count=3, version=0), "unsupported_version", LIMITS),
        (table_blob(TABLE_RAW, series_count=3, codec=2), "malformed", LIMITS),
        (table_blob(TABLE_RAW, series_count=3, flags=2), "malformed", LIMITS),
        (table_blob(TABLE_RAW, series_count=3, flags=0x81), "malformed", LIMITS),
        (table_blob(TABLE_RAW, series_count=3, reserved=1), "malformed", LIMITS),
        (TABLE_BLOB + b"\0", "malformed", LIMITS),  # trailing bytes after the table
        (TABLE_BLOB[:-1], "malformed", LIMITS),
        (table_blob(TABLE_RAW, series_count=2), "malformed", LIMITS),  # head and body disagree
        (table_blob(TABLE_RAW, series_count=4), "malformed", LIMITS),
        (table_blob(raw_table([b"a"], [(0, 0, [])], count=2), series_count=2), "malformed", LIMITS),
        (table_blob(TABLE_RAW + b"\0", series_count=3), "malformed", LIMITS),  # trailing bytes in the raw table
        (table_blob(TABLE_RAW, series_count=3, raw_len=len(TABLE_RAW) + 1), "malformed", LIMITS),  # NONE: lengths
        (table_blob(TABLE_RAW, series_count=3, codec=1), "malformed", LIMITS),  # not zstd
        (table_blob(TABLE_RAW, series_count=3, flags=1), "unsupported", LIMITS),  # an envelope of scheme 5
        (table_blob(TABLE_RAW[:56], series_count=3, flags=1), "malformed", LIMITS),  # too short for one
        (TABLE_BLOB, "limit", limits_table(max_series=2)),  # over the limits
        (TABLE_BLOB, "limit", limits_table(max_labels=0)),
        (TABLE_BLOB, "limit", limits_table(max_string_len=0)),
        (table_blob(raw_table([b"a"] * 4, [(0, 0, [])]), series_count=1), "limit", limits_table(max_labels=1)),
        (table_blob(raw_table([b"a"] * 130, [(0, 0, [])]), series_count=1), "limit", LIMITS),
        (table_blob(raw_table([b"a"] * 129, [(0, 0, [])]), series_count=1), "ok", LIMITS),
        (table_blob(TABLE_RAW, series_count=3, raw_len=MAX_RAW + 1), "too_large", LIMITS),
        (table_blob(raw_table([b"a"], [(1, 0, [])]), series_count=1), "malformed", LIMITS),  # no string 1
        (table_blob(raw_table([b"a", b"k"], [(0, 0, [(1, 2)])]), series_count=1), "malformed", LIMITS),
        (table_blob(raw_table([b"a"], [(0, 4, [])]), series_count=1), "malformed", LIMITS),  # metric type 4
        (table_blob(raw_table([b"\xff"], [(0, 0, [])]), series_count=1), "malformed", LIMITS),  # not UTF-8
        (table_blob(raw_table([b"a"], [(0, 0, [])])[:-1], series_count=1), "malformed", LIMITS),  # cut
        (table_blob(raw_table([b"1a"], [(0, 0, [])]), series_count=1), "schema", LIMITS),
        (table_blob(raw_table([b"a", b"__k", b"v"], [(0, 0, [(1, 2)])]), series_count=1), "schema", LIMITS),
        (table_blob(raw_table([b"a", b"k", b"v"], [(0, 0, [(1, 2), (1, 2)])]), series_count=1), "schema", LIMITS),
    ],
)
def test_each_table_rule_names_its_reason(blob: bytes, why: str, limits: Limits) -> None:
    if why == "ok":
        wire.open_table(blob, limits, MAX_RAW)
    else:
        assert reason(lambda: wire.open_table(blob, limits, MAX_RAW)) == why


def test_the_table_head_rules_are_checked_by_parse_table_head_and_give_the_length() -> None:
    head = wire.parse_table_head(b"xx" + TABLE_BLOB, 2)
    assert (head.version, head.codec, head.flags, head.series_count, head.raw_len, head.length) == (
        1, TABLE_CODEC_NONE, 0, 3, len(TABLE_RAW), len(TABLE_BLOB))
    assert reason(lambda: wire.parse_table_head(TABLE_BLOB[:19])) == "malformed"


def test_a_compressed_table_decodes_like_its_raw_form() -> None:
    ids = [TABLE.identity(i) for i in range(3)]
    blob = encode_table(ids, 3)
    assert wire.parse_table_head(blob).codec == TABLE_CODEC_ZSTD
    t = wire.open_table(blob, LIMITS, MAX_RAW)
    assert (t.names, t.labels, t.mtypes) == (TABLE.names, TABLE.labels, TABLE.mtypes)
    assert t.id == wire.table_id(blob) == hashlib.sha256(blob).digest()
    assert reason(lambda: wire.open_table(blob, LIMITS, len(TABLE_RAW) - 1)) == "too_large"


# ---------------------------------------------------------------- hostile input: nothing but WireError


def mutations(raw: bytes) -> list[bytes]:
    """Every single-byte change to a few telling values and every bit flip, every cut, one more byte."""
    out = []
    for i in range(len(raw)):
        for v in {0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF} | {raw[i] ^ (1 << b) for b in range(8)}:
            if v != raw[i]:
                out.append(raw[:i] + bytes((v,)) + raw[i + 1 :])
    out += [raw[:n] for n in range(len(raw))]
    out += [raw + b"\0", raw + b"\xff"]
    return out


def small_v2() -> tuple[wire.CurrentTable, list[tuple[int, Series]]]:
    s = [gauge("a", (T0, T0 + 1000), (1.0, 2.0), ("k", "v")),
         gauge("b", (T0, T0 + 1000), (0.5, STALE)),
         gauge("c", (T0 + 5,), (41.75,))]
    builder = wire.TableBuilder(1)
    builder.place([gauge("z", (T0,), (0.0,))])
    table = builder.place(s)[0]  # appended: the series sit at 1, 2, 3 of 4
    blob = encode_table([("z", (), MetricType.GAUGE)] + [(x.name, x.labels, x.mtype) for x in s],
                        codec=TABLE_CODEC_NONE)
    current = CurrentTable(wire.table_id(blob), blob, table.series_count)
    return current, list(zip([1, 2, 3], s, strict=True))


def test_every_mutation_of_a_v2_payload_decodes_or_is_a_wire_error() -> None:
    current, placed = small_v2()
    table = wire.open_table(current.blob, LIMITS, MAX_RAW)
    raw = encode_columns(current, placed)
    outcomes: dict[str, int] = {}
    for bad in mutations(raw):
        try:
            decode_columns(bad, table, LIMITS)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except WireError as exc:
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
    assert set(outcomes) <= {"ok", "malformed", "limit"} and outcomes["malformed"] > 0, outcomes


def test_every_mutation_of_a_signed_v2_payload_is_opened_or_refused() -> None:
    current, placed = small_v2()
    raw = encode_columns(current, placed)
    p = wire.prepare_columns(current, placed, codec=Codec.NONE)
    assert p.payload == raw
    c = ctx()
    for bad in mutations(raw)[:: 3]:
        got = open_v2(wire.sign_batch(dataclasses.replace(p, payload=bad, raw_len=len(bad)), c),
                      attached=current.blob)
        assert isinstance(got, (wire.VerifiedBatch, wire.Refusal))
        if isinstance(got, wire.Refusal):
            assert got.signed and got.result in {"malformed", "limit", "schema"}, got


def test_every_mutation_of_a_table_opens_or_is_a_wire_error() -> None:
    current, _ = small_v2()
    for blob in (current.blob, encode_table([("a", (("k", "v"),), MetricType.COUNTER)], 3)):
        seen: set[str] = set()
        for bad in mutations(blob):
            try:
                wire.open_table(bad, LIMITS, MAX_RAW, KEYS)
                seen.add("ok")
            except WireError as exc:
                seen.add(exc.reason)
        assert "malformed" in seen and seen <= {"ok", "malformed", "limit", "schema", "too_large", "unsupported",
                                                "unsupported_version", "sealed_to_unknown_key"}, seen


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 4))
def test_random_payloads_and_tables_are_wire_errors(junk: bytes, heads: int) -> None:
    # With a plausible head, so the decoders get past their first checks.
    raw = HEAD.pack(TID, 3, heads, heads, heads, heads) + junk
    for attempt in (raw, junk):
        try:
            decode_columns(attempt, TABLE, LIMITS)
        except WireError:
            pass
    for attempt in (TABLE_HEAD.pack(b"WSTB", 1, 0, 0, 0, heads, len(junk), len(junk)) + junk, junk):
        try:
            wire.open_table(attempt, LIMITS, MAX_RAW)
        except WireError:
            pass


def test_counts_that_would_allocate_much_are_refused_before_any_array() -> None:
    # The exact size is required before anything is read past the head: a payload claiming
    # 5 million points in 60 bytes costs nothing.
    big = columns_raw(head={"P": LIMITS.max_samples, "Pc": LIMITS.max_samples, "m": LIMITS.max_series,
                            "c": LIMITS.max_series})
    assert reason(lambda: decoded(big)) == "malformed"
    raw = TABLE_HEAD.pack(b"WSTB", 1, 0, 0, 0, LIMITS.max_series, 8, 8) + struct.pack("<II", 0xFFFFFFFF, 0)
    assert reason(lambda: wire.open_table(raw, LIMITS, MAX_RAW)) == "limit"


# ---------------------------------------------------------------- numpy stays with readers


def test_importing_wire_does_not_load_numpy_and_opening_a_v2_batch_does() -> None:
    script = (
        "import sys, wire\n"
        "from nacl.signing import SigningKey\n"
        "assert 'numpy' not in sys.modules, 'import wire loaded numpy'\n"
        "key = SigningKey(bytes(32))\n"
        "s = [wire.Series('up', (), wire.MetricType.GAUGE, (1,), (1.0,))]\n"
        "table, placed = wire.TableBuilder(1).place(s)\n"
        "raw = wire.sign_batch(wire.prepare_columns(table, placed, 1),\n"
        "                      wire.BatchContext(key, 's', 'n', 1, wire.ZERO_HASH, 1, 1))\n"
        "assert 'numpy' not in sys.modules, 'making a v2 batch loaded numpy'\n"
        "class Key:\n"
        "    public_key = bytes(key.verify_key)\n"
        "    def refusal(self, site, node, seq): return None\n"
        "got = wire.open_batch(raw, lambda k: Key(), attached_table=table.blob)\n"
        "assert isinstance(got, wire.VerifiedBatch), got\n"
        "assert 'numpy' in sys.modules, 'opening a v2 batch did not load numpy'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- docs/wire.md §10.8 worked example

EXAMPLE_SEED = bytes(range(32))
FIXED = struct.Struct("<4sBBBBQ32sqQqqIIII8s")  # §1.1


def example_series() -> list[Series]:
    a = (T0, T0 + 1000, T0 + 2000)
    b = (T0, T0 + 1000, T0 + 2001, T0 + 2999)
    return [
        Series("up", (("job", "agent"),), MetricType.GAUGE, a, (1.0, 1.0, 1.0)),
        Series("temp_c", (("gpu", "0"),), MetricType.GAUGE, a, (41.5, 41.75, 42.0)),
        Series("load", (), MetricType.GAUGE, b, (1 / 3, 0.5, 2 / 3, 0.75)),
    ]


def u64_of(x: float) -> int:
    bits: int = struct.unpack("<Q", struct.pack("<d", x))[0]
    return bits


def example_table_by_hand() -> bytes:
    """§10.1 and §10.2, byte by byte: codec NONE, not encrypted."""
    raw = raw_table([b"up", b"job", b"agent", b"temp_c", b"gpu", b"0", b"load"],
                    [(0, 0, [(1, 2)]), (3, 0, [(4, 5)]), (6, 0, [])])
    return table_blob(raw, series_count=3)


def example_words() -> tuple[list[int], list[int]]:
    ts = [T0, 1000, 1000, T0, 1000, 1001, 998]
    load = [u64_of(v) for v in (1 / 3, 0.5, 2 / 3, 0.75)]
    values = [1, 0, 0, 4150, 25, 25, load[0], load[0] ^ load[1], load[1] ^ load[2], load[2] ^ load[3]]
    return ts, values


def example_batch_by_hand() -> bytes:
    """§10.4 and §1, byte by byte: codec NONE, not encrypted, signed with §8's key."""
    ts, values = example_words()
    payload = (HEAD.pack(hashlib.sha256(example_table_by_hand()).digest(), 3, 3, 2, 7, 10) + u32s([1, 1, 1])
               + u32s([0, 0, 1]) + u32s([3, 4]) + bytes([0, 2, 255]) + planes(ts) + planes(values))
    key = SigningKey(EXAMPLE_SEED)
    head = FIXED.pack(b"WSB1", 2, 0, 0, 0, 1, bytes(32), T0 + 3000, 5_000_000_000, T0, T0 + 2999, 3, 10,
                      len(payload), len(payload), hashlib.sha256(bytes(key.verify_key)).digest()[:8])
    signed = head + b"\x02s1\x02n1" + payload
    return signed + key.sign(signed).signature


def example_table() -> bytes:
    """The reference encoder's table for the example (codec NONE: zstd output may vary by version)."""
    return encode_table([(s.name, s.labels, MetricType(s.mtype)) for s in example_series()], codec=TABLE_CODEC_NONE)


def example_batch() -> bytes:
    blob = example_table()
    current = CurrentTable(wire.table_id(blob), blob, 3)
    prepared = wire.prepare_columns(current, list(enumerate(example_series())), codec=Codec.NONE)
    ctx = wire.BatchContext(SigningKey(EXAMPLE_SEED), "s1", "n1", 1, wire.ZERO_HASH, T0 + 3000, 5_000_000_000)
    return wire.sign_batch(prepared, ctx)


def hexdump(raw: bytes) -> str:
    return "\n".join(f"{i:04x}: {raw[i : i + 16].hex(' ')}" for i in range(0, len(raw), 16))


class Walk:
    """Rows of (offset, bytes, meaning), as a reader of the document walks the bytes."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0
        self.rows: list[tuple[int, bytes, str]] = []

    def take(self, n: int, what: str) -> bytes:
        chunk = self.raw[self.pos : self.pos + n]
        assert len(chunk) == n
        self.rows.append((self.pos, chunk, what))
        self.pos += n
        return chunk

    def note(self, what: str) -> None:
        self.rows.append((self.pos, b"", what))

    def text(self) -> str:
        assert self.pos == len(self.raw)
        lines = []
        for off, chunk, what in self.rows:
            hexed = chunk.hex(" ") if len(chunk) <= 12 else chunk[:12].hex(" ") + " .."
            lines.append(f"{off:4d} {len(chunk):3d}  {hexed:<38} {what}")
        return "\n".join(lines)


def example_table_annotated() -> str:
    w = Walk(example_table())
    w.take(4, 'magic "WSTB"')
    w.take(1, "version 1")
    w.take(1, "codec 0 = NONE")
    w.take(1, "flags 0: not encrypted")
    w.take(1, "reserved 0")
    w.take(4, "series_count 3 (u32)")
    w.take(4, "raw_len 97 (u32)")
    w.take(4, "payload_len 97 (u32): equal to raw_len for codec NONE")
    w.note("--- raw table (97 bytes) starts")
    w.take(4, "string count 7 (u32)")
    w.take(28, "7 string lengths (u32 each): 2 3 5 6 3 1 4")
    w.take(24, 'strings "up" "job" "agent" "temp_c" "gpu" "0" "load"')
    w.take(4, "series count 3 (u32), as in the head")
    w.take(7, "series 0: name 0 'up', type 0 GAUGE, 1 label (u32 u8 u16)")
    w.take(8, "  label: key 1 'job' = value 2 'agent' (u32 u32)")
    w.take(7, "series 1: name 3 'temp_c', GAUGE, 1 label")
    w.take(8, "  label: key 4 'gpu' = value 5 '0'")
    w.take(7, "series 2: name 6 'load', GAUGE, 0 labels")
    w.note("--- table ends: its id is the SHA-256 of these 117 bytes")
    return w.text()


def example_annotated() -> str:
    raw = example_batch()
    w = Walk(raw)
    w.take(4, 'magic "WSB1"')
    w.take(1, "version 2")
    w.take(1, "kind 0 = DATA")
    w.take(1, "codec 0 = NONE")
    w.take(1, "flags 0")
    w.take(8, "seq 1 (u64)")
    w.take(32, "prev_hash: zero, first batch")
    w.take(8, f"created_wall_ms {T0 + 3000} (i64)")
    w.take(8, "created_mono_ns 5000000000 (u64)")
    w.take(8, f"window_start_ms {T0} (i64)")
    w.take(8, f"window_end_ms {T0 + 2999} (i64)")
    w.take(4, "series_count 3 (u32)")
    w.take(4, "sample_count 10 (u32)")
    raw_len = struct.unpack("<I", raw[88:92])[0]
    w.take(4, f"raw_len {raw_len} (u32)")
    w.take(4, f"payload_len {raw_len} (u32): equal to raw_len for codec NONE")
    w.take(8, "key_id = SHA-256(public key)[:8]")
    w.take(1, "site length 2")
    w.take(2, 'site "s1"')
    w.take(1, "node length 2")
    w.take(2, 'node "n1"')
    w.note(f"--- payload ({raw_len} bytes) starts")
    w.take(32, "table_id: SHA-256 of the 117-byte table")
    w.take(4, "T 3: the table's series count (u32)")
    w.take(4, "m 3 series (u32)")
    w.take(4, "c 2 timestamp columns (u32)")
    w.take(4, "Pc 7 column points (u32)")
    w.take(4, "P 10 points (u32)")
    w.take(12, "gap[3]: 1 1 1 -> table indices 0 1 2 (u32 each)")
    w.take(12, "column[3]: 0 0 1 (u32 each)")
    w.take(8, "column_len[2]: 3 4 (u32 each)")
    w.take(3, "scale[3]: 0, 2, 255 = FLOAT64 (u8 each)")
    w.note("--- 7 timestamp words as 8 byte planes of 7 bytes")
    for j in range(8):
        w.take(7, f"  plane {j}: byte {j} of each word")
    w.note("--- 10 value words as 8 byte planes of 10 bytes")
    for j in range(8):
        w.take(10, f"  plane {j}: byte {j} of each word")
    w.note(f"--- payload ends; the signature covers bytes 0..{w.pos - 1}")
    w.take(64, "Ed25519 signature")
    return w.text()


def example_words_text() -> str:
    """The words the planes hold (read back from the frame's bytes), and what they decode to."""
    raw = example_batch()
    at = 110 + 52 + 12 + 12 + 8 + 3

    def words(at: int, n: int) -> list[int]:
        return [sum(raw[at + j * n + i] << (8 * j) for j in range(8)) for i in range(n)]

    ts, vs = words(at, 7), words(at + 56, 10)
    assert (ts, vs) == example_words()
    rows = []
    t = 0
    for i, word in enumerate(ts):
        col, j = (0, i) if i < 3 else (1, i - 3)
        t = word if j == 0 else t + word
        what = "first" if j == 0 else f"+ {word}"
        rows.append(f"timestamp {i}  {word:016x}  column {col}, point {j}: {what} -> {t}")
    series = [("up", 0, 3), ("temp_c", 2, 3), ("load", 255, 4)]
    i = 0
    for name, k, n in series:
        acc = 0
        for j in range(n):
            word = vs[i]
            if k == 255:
                acc ^= word
                value = struct.unpack("<d", struct.pack("<Q", acc))[0]
                step = "first" if j == 0 else "XOR"
                what = f"{step}: bits {acc:016x} -> {value!r}"
            else:
                acc = (acc + word) & MASK64
                step = "first" if j == 0 else f"+ {word}"
                what = f"{step}: i = {acc} -> {acc} / 10^{k} = {acc / 10**k!r}"
            rows.append(f"value {i:<5}  {word:016x}  {name}, point {j}: {what}")
            i += 1
    return "\n".join(rows)


def example_values() -> str:
    key = SigningKey(EXAMPLE_SEED)
    table, raw = example_table(), example_batch()
    rows = [
        ("node public key", bytes(key.verify_key).hex()),
        ("node key id", wire.key_id(bytes(key.verify_key)).hex()),
        ("table length", f"{len(table)} bytes"),
        ("table id", wire.table_id(table).hex()),
        ("frame length", f"{len(raw)} bytes"),
        ("chain hash of the frame", wire.batch_hash(raw).hex()),
        ("body sent with the table", f"{len(table) + len(raw)} bytes: the table, then the frame"),
    ]
    return "\n".join(f"{k:<25} {v}" for k, v in rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "v2-example-values": example_values,
    "v2-table-hex": lambda: hexdump(example_table()),
    "v2-table-annotated": example_table_annotated,
    "v2-example-hex": lambda: hexdump(example_batch()),
    "v2-example-annotated": example_annotated,
    "v2-example-words": example_words_text,
}


def doc_block(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    assert begin in text and end in text, f"docs/wire.md lacks the {name} block"
    block = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert block.startswith("```text\n") and block.endswith("\n```")
    return block[len("```text\n") : -len("\n```")]


def test_the_example_built_from_the_document_is_what_the_reference_writes() -> None:
    assert example_table_by_hand() == example_table()
    assert example_batch_by_hand() == example_batch()


@pytest.mark.parametrize("name", list(BLOCKS))
def test_doc_v2_worked_example_is_byte_identical(name: str) -> None:
    assert doc_block(name) == BLOCKS[name]()


def test_the_v2_example_opens_and_its_values_are_stated() -> None:
    table, raw = example_table(), example_batch()
    got = wire.open_batch(wire.split_body(wire.with_table(table, raw))[1],
                          lambda k: _ExampleKey() if k == wire.key_id(_ExampleKey.public_key) else None,
                          attached_table=table)
    assert isinstance(got, wire.VerifiedBatch), got
    assert_same(got.series, example_series())
    text = DOC.read_text(encoding="utf-8")
    assert wire.table_id(table).hex() in text and wire.batch_hash(raw).hex() in text


class _ExampleKey:
    public_key = bytes(SigningKey(EXAMPLE_SEED).verify_key)

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return None


if __name__ == "__main__":
    for name, make in BLOCKS.items():
        print(f"<!-- BEGIN {name} -->\n```text\n{make()}\n```\n<!-- END {name} -->\n")


def _table_of(n: int, prefix: str) -> wire.SeriesTable:
    blob = wire.encode_table([(f"{prefix}_{i}", (), MetricType.GAUGE) for i in range(n)], 1)
    return wire.open_table(blob, LIMITS, MAX_RAW)


def test_memory_tables_are_bounded_by_series_and_per_node() -> None:
    """One node key bringing new big tables must not fill the collector's memory, nor push
    out every other node's current table: the cache counts series, and a node's replaced
    tables go first."""
    tables = wire.MemoryTables(max_tables=100, max_series=1000, per_node=2)
    other = _table_of(10, "other")
    tables.add("s", "quiet", other)
    churn = [_table_of(300, f"t{i}") for i in range(5)]
    for t in churn:
        tables.add("s", "busy", t)
        assert tables.series <= 1000 and len(tables) <= 3
    # The busy node keeps its newest two; the quiet node's table was never pushed out.
    assert tables.get("s", "busy", churn[-1].id) is churn[-1]
    assert tables.get("s", "busy", churn[-2].id) is churn[-2]
    assert tables.get("s", "busy", churn[0].id) is None
    assert tables.get("s", "quiet", other.id) is other
    # Past the series budget the least recently used go, but never the table just added.
    huge = _table_of(2000, "huge")
    tables.add("s", "big", huge)
    assert tables.get("s", "big", huge.id) is huge and len(tables) == 1 and tables.series == 2000
