"""The hand-written remote-write encoder, checked against protoc's generated code.

The generated code (upb backend, protobuf's default) is the oracle: the fast
path must produce the very bytes it serializes, and decode back to exactly
what went in, bit for bit (NaN payloads, -0.0).
"""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cramjam
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.internal import api_implementation
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import remote_write_proto as rw
from collector.prompb import remote_write_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "collector" / "prompb" / "remote_write.proto"
STALE_NAN_BITS = 0x7FF0000000000002  # Prometheus' staleness marker
NOW_MS = 1_750_000_000_000
# The pure-Python protobuf backend decodes every NaN as the canonical quiet NaN.
DECODER_KEEPS_NAN_PAYLOADS = api_implementation.Type() != "python"

Labels = list[tuple[str, str]]


def _float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


def _bits(value: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", value))[0])


def _same_value(got: float, want: float) -> bool:
    if not DECODER_KEEPS_NAN_PAYLOADS and math.isnan(want):
        return math.isnan(got)
    return _bits(got) == _bits(want)


def _reference(series: Sequence[tuple[Labels, Sequence[int], Sequence[float]]]) -> bytes:
    request = pb.WriteRequest(
        timeseries=[
            pb.TimeSeries(
                labels=[pb.Label(name=n, value=v) for n, v in labels],
                samples=[pb.Sample(value=v, timestamp=t) for t, v in zip(ts, vs, strict=True)],
            )
            for labels, ts, vs in series
        ]
    )
    return request.SerializeToString()


def _ours(series: Sequence[tuple[Labels, Sequence[int], Sequence[float]]]) -> bytes:
    return rw.encode_write_request(rw.encode_timeseries(rw.encode_labels(labels), ts, vs) for labels, ts, vs in series)


def _assert_round_trip(series: Sequence[tuple[Labels, Sequence[int], Sequence[float]]]) -> None:
    body = _ours(series)
    assert body == _reference(series)
    decoded = rw.decode_write_request(body)
    assert [labels for labels, _ in decoded] == [tuple(labels) for labels, _, _ in series]
    for (_, samples), (_, ts, vs) in zip(decoded, series, strict=True):
        assert [t for t, _ in samples] == list(ts)
        assert all(_same_value(got, want) for (_, got), want in zip(samples, vs, strict=True)), (samples, vs)


# --- strategies -------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # str that UTF-8 can carry
labels_st = st.dictionaries(_text, _text, max_size=6).map(lambda d: sorted(d.items()))

special_values = st.sampled_from(
    [0.0, -0.0, math.inf, -math.inf, math.nan, _float(STALE_NAN_BITS), 5e-324, -1.7976931348623157e308, 1.0]
)
any_double = st.integers(0, 2**64 - 1).map(_float)  # every bit pattern: NaN payloads, subnormals, -0.0
values_el = st.one_of(special_values, any_double, st.floats(allow_nan=True, allow_infinity=True))

any_int64 = st.integers(-(2**63), 2**63 - 1)
boundary_ts = st.sampled_from(
    [0, 1, 127, 128, 2**14 - 1, 2**14, 2**35 - 1, 2**35, 2**42 - 1, 2**42, 2**56 - 1, 2**56, 2**63 - 1, -1, -(2**63)]
)


@st.composite
def series_st(draw: st.DrawFn) -> tuple[Labels, list[int], list[float]]:
    """One series: mostly shaped like real batches (the cached paths), sometimes anything (the fallbacks)."""
    labels = draw(labels_st)
    n = draw(st.sampled_from([0, 1, 2, 6, 60, 63, 64, 65, 100]) | st.integers(0, 140))
    shape = draw(st.sampled_from(["scrape", "scrape", "any", "boundary"]))
    if shape == "scrape":
        start = draw(st.integers(2**35, 2**42 - 100_000 * 140))
        step = draw(st.integers(0, 100_000))
        timestamps = [start + i * step for i in range(n)]
    elif shape == "boundary":
        timestamps = draw(st.lists(boundary_ts, min_size=n, max_size=n))
    else:
        timestamps = draw(st.lists(any_int64, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["mixed", "nonzero", "zero"]))
    if kind == "zero":
        values = [0.0] * n
    else:
        values = draw(st.lists(values_el, min_size=n, max_size=n))
        if kind == "nonzero":
            values = [v if _bits(v) else 1.0 for v in values]
    return labels, timestamps, values


# --- the encoder against the generated code ----------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(series_st(), max_size=4))
def test_fast_path_bytes_equal_generated_code_and_decode_exactly(
    series: list[tuple[Labels, list[int], list[float]]],
) -> None:
    _assert_round_trip(series)


@settings(max_examples=100, deadline=None)
@given(labels_st, st.lists(values_el, min_size=2, max_size=140))
def test_same_timestamps_with_other_values_reuse_the_template_correctly(labels: Labels, values: list[float]) -> None:
    timestamps = [NOW_MS + 15_000 * i for i in range(len(values))]
    _assert_round_trip([(labels, timestamps, [1.0] * len(values))])
    _assert_round_trip([(labels, timestamps, values), (labels, timestamps, list(reversed(values)))])


@pytest.mark.parametrize("timestamp", [0, 1, 127, 128, 2**35 - 1, 2**35, 2**56 - 1, 2**56, 2**63 - 1, -1, -(2**63)])
@pytest.mark.parametrize("n", [1, 2, 10])
@pytest.mark.parametrize(
    "value",
    [1.5, 0.0, -0.0, math.inf, -math.inf, math.nan, _float(STALE_NAN_BITS)],
    ids=["1.5", "0", "-0", "inf", "-inf", "nan", "stale"],
)
def test_varint_boundaries_and_special_values(timestamp: int, n: int, value: float) -> None:
    _assert_round_trip([([("__name__", "up")], [timestamp] * n, [value] * n)])


def test_stale_marker_survives_bit_exactly_in_the_bytes() -> None:
    series = rw.encode_timeseries(b"", [NOW_MS] * 10, [_float(STALE_NAN_BITS)] * 10)
    assert series.count(struct.pack("<Q", STALE_NAN_BITS)) == 10


def test_no_values_gives_a_series_without_samples() -> None:
    labels = rw.encode_labels([("__name__", "up"), ("job", "node")])
    body = rw.encode_timeseries(labels, [], [])
    assert body == b"\x0a" + bytes([len(labels)]) + labels
    assert rw.decode_write_request(body) == [((("__name__", "up"), ("job", "node")), [])]


def test_one_sample_exact_bytes() -> None:
    body = rw.encode_timeseries(rw.encode_labels([("a", "b")]), [1], [1.0])
    label = b"\x0a\x06" + b"\x0a\x01a" + b"\x12\x01b"
    sample = b"\x12\x0b" + b"\x09" + struct.pack("<d", 1.0) + b"\x10\x01"
    assert body == b"\x0a" + bytes([len(label + sample)]) + label + sample


def test_sample_fields_are_not_packed_and_field_order_is_by_number() -> None:
    sample = pb.Sample.DESCRIPTOR
    assert [(f.name, f.number) for f in sample.fields] == [("value", 1), ("timestamp", 2)]
    assert pb.Sample(value=2.0, timestamp=300).SerializeToString() == b"\x09" + struct.pack("<d", 2.0) + b"\x10\xac\x02"
    series = pb.TimeSeries.DESCRIPTOR.fields_by_name
    assert series["samples"].message_type is sample  # a repeated message is never packed: one field per Sample
    assert series["labels"].message_type is pb.Label.DESCRIPTOR
    request = pb.WriteRequest(
        timeseries=[pb.TimeSeries(labels=[pb.Label(name="z"), pb.Label(name="a")]), pb.TimeSeries()]
    )
    # Deterministic serialization only reorders map entries; this schema has none.
    assert request.SerializeToString(deterministic=True) == request.SerializeToString()
    assert [label.name for label in pb.WriteRequest.FromString(request.SerializeToString()).timeseries[0].labels] == [
        "z",
        "a",
    ]


def test_many_series_keep_their_order() -> None:
    series = [([("__name__", f"m{i:03d}"), ("i", str(i))], [NOW_MS + i] * 3, [float(i)] * 3) for i in range(50)]
    _assert_round_trip(series)


# --- whole batches from columns (wire v2) ------------------------------------

Batch = list[tuple[bytes, list[int], list[float]]]  # (encoded labels, timestamps, values) per series


@st.composite
def column_batches(draw: st.DrawFn) -> Batch:
    """Series of a batch as the forwarder meets them: often sharing one timestamp column
    (a scrape), sometimes anything, values of every bit pattern; 1 point and many; empty."""
    shared = draw(st.lists(st.one_of(boundary_ts, any_int64), min_size=1, max_size=70)) if draw(st.booleans()) else None
    out: Batch = []
    for _ in range(draw(st.integers(0, 8))):
        labels = rw.encode_labels(draw(labels_st))
        if shared is not None and draw(st.booleans()):
            timestamps = shared
        else:
            n = draw(st.sampled_from([0, 1, 1, 2, 60]) | st.integers(0, 80))
            start = draw(st.integers(-(2**63), 2**63 - 1 - 1000 * n))
            step = draw(st.sampled_from([0, 1, 1000]))
            # mixed varint lengths within a series, or all one length
            timestamps = draw(st.lists(st.one_of(boundary_ts, any_int64), min_size=n, max_size=n)
                              | st.just([start + i * step for i in range(n)]))
        kind = draw(st.sampled_from(["any", "all sent", "zeros"]))
        if kind == "zeros":
            values = [draw(st.sampled_from([0.0, -0.0])) for _ in timestamps]
        else:
            values = draw(st.lists(values_el, min_size=len(timestamps), max_size=len(timestamps)))
            if kind == "all sent":
                values = [v if _bits(v) else 2.5 for v in values]
        out.append((labels, list(timestamps), values))
    return out


def _columns_args(batch: Batch, layout: str, rng: Any) -> tuple[bytes, Any, Any, Any, Any, Any]:
    """The batch as encode_timeseries_columns takes it, its labels laid out in one bytes
    object: back to back in series order, in order with junk between, or in any order."""
    order = list(range(len(batch)))
    if layout == "any order":
        rng.shuffle(order)
    blob = b""
    label_starts = [0] * len(batch)
    label_ends = [0] * len(batch)
    for i in order:
        if layout != "back to back":
            blob += b"\xff" * rng.randint(0, 3)
        label_starts[i] = len(blob)
        blob += batch[i][0]
        label_ends[i] = len(blob)
    starts = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum([len(ts) for _, ts, _ in batch], out=starts[1:])
    timestamps = np.array([t for _, ts, _ in batch for t in ts], dtype=np.int64)
    values = np.array([_bits(v) for _, _, vs in batch for v in vs], dtype=np.uint64).view(np.float64)
    bounds = np.array(label_starts, dtype=np.int64), np.array(label_ends, dtype=np.int64)
    return blob, *bounds, starts, timestamps, values


@settings(max_examples=200, deadline=None)
@given(column_batches(), st.sampled_from(["back to back", "in order", "any order"]), st.randoms(use_true_random=False))
def test_columns_give_each_series_the_very_bytes_of_encode_timeseries(batch: Batch, layout: str, rng: Any) -> None:
    got = rw.encode_timeseries_columns(*_columns_args(batch, layout, rng))
    assert len(got) == len(batch)
    for field, (labels, timestamps, values) in zip(got, batch, strict=True):
        assert field == rw.encode_timeseries(labels, timestamps, values)


def test_columns_special_values_and_timestamps_exact_bytes() -> None:
    labels = rw.encode_labels([("__name__", "up")])
    timestamps = [0, 1, -1, 127, 128, 2**63 - 1, -(2**63), NOW_MS]
    values = [0.0, -0.0, math.inf, _float(STALE_NAN_BITS), _float(0xFFF8000000000001), 5e-324, 0.0, 1.5]
    batch: Batch = [(labels, timestamps, values), (labels, [], []), (b"", [NOW_MS], [0.0])]
    got = rw.encode_timeseries_columns(*_columns_args(batch, "back to back", None))
    assert got == [rw.encode_timeseries(*series) for series in batch]
    # Written out by hand: +0.0 at timestamp 0 is an empty Sample, -0.0 is sent, a negative
    # timestamp takes 10 bytes.
    samples = b"".join(_sample_by_hand(t, v) for t, v in zip(timestamps, values, strict=True))
    assert _sample_by_hand(0, 0.0) == b"\x12\x00"
    assert _sample_by_hand(1, -0.0) == b"\x12\x0b\x09" + struct.pack("<d", -0.0) + b"\x10\x01"
    assert _sample_by_hand(-1, 1.0)[-11:] == b"\x10" + b"\xff" * 9 + b"\x01"
    assert got[0] == b"\x0a" + _uvarint_by_hand(len(labels) + len(samples)) + labels + samples
    assert got[1] == b"\x0a" + bytes([len(labels)]) + labels
    assert got[2] == b"\x0a\x09\x12\x07\x10" + _uvarint_by_hand(NOW_MS)


def _uvarint_by_hand(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += bytes([(n & 0x7F) | 0x80])
        n >>= 7
    return out + bytes([n])


def _sample_by_hand(timestamp: int, value: float) -> bytes:
    body = b""
    if _bits(value):
        body += b"\x09" + struct.pack("<d", value)
    if timestamp:
        body += b"\x10" + _uvarint_by_hand(timestamp & (2**64 - 1))
    return b"\x12" + bytes([len(body)]) + body


def test_columns_take_strided_views_and_long_fields() -> None:
    labels = rw.encode_labels([("__name__", "x" * 300), ("job", "y" * 20_000)])  # a 3-byte field length
    timestamps = np.arange(NOW_MS, NOW_MS + 2 * 200 * 15_000, 15_000, dtype=np.int64)[::2]
    values = np.linspace(-1.0, 1.0, 400)[::2]
    starts = np.array([0, 100, 200], dtype=np.int64)
    n = len(labels)
    got = rw.encode_timeseries_columns(labels * 2, np.array([0, n]), np.array([n, 2 * n]), starts, timestamps, values)
    assert got == [rw.encode_timeseries(labels, timestamps[a:b].tolist(), values[a:b].tolist())
                   for a, b in ((0, 100), (100, 200))]


@pytest.mark.parametrize(
    ("label_bounds", "starts", "timestamps", "values"),
    [
        (([0], [2]), [0, 1], np.array([1.0]), np.array([1.0])),  # float timestamps
        (([0], [2]), [0, 1], np.array([1]), np.array([1], dtype=np.int64)),  # int values
        (([0], [2]), [0, 2], np.array([1]), np.array([1.0])),  # more points named than given
        (([0], [2]), [1, 1], np.array([1]), np.array([1.0])),  # not from 0
        (([0], [9]), [0, 1], np.array([1]), np.array([1.0])),  # labels past the bytes
        (([1], [0]), [0, 1], np.array([1]), np.array([1.0])),  # labels ending before they start
        (([0, 0], [2, 2]), [0, 1], np.array([1]), np.array([1.0])),  # label bounds for two series, one series
        (([], []), [], np.array([], dtype=np.int64), np.array([])),  # no starts at all
    ],
)
def test_columns_refuse_what_does_not_describe_one_batch(
    label_bounds: tuple[list[int], list[int]], starts: list[int], timestamps: Any, values: Any
) -> None:
    with pytest.raises(ValueError):
        rw.encode_timeseries_columns(b"ab", np.array(label_bounds[0], dtype=np.int64),
                                     np.array(label_bounds[1], dtype=np.int64), np.array(starts, dtype=np.int64),
                                     timestamps, values)


def test_columns_of_no_series_give_nothing() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert rw.encode_timeseries_columns(b"", empty, empty, np.zeros(1, dtype=np.int64), empty, np.zeros(0)) == []


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records which encoding path produced each samples region."""
    taken: list[str] = []
    for name in ("_samples_by_loop", "_samples_by_segments", "_samples_by_column"):
        real = getattr(rw, name)

        def spy(*args: Any, _real: Callable[..., Any] = real, _name: str = name) -> Any:
            out = _real(*args)
            if out is not None:
                taken.append(_name.removeprefix("_samples_by_"))
            return out

        monkeypatch.setattr(rw, name, spy)
    return taken


@pytest.mark.parametrize(
    ("timestamps", "values", "path"),
    [
        ([NOW_MS + 15_000 * i for i in range(100)], [float(i + 1) for i in range(100)], "column"),
        ([NOW_MS + 15_000 * i for i in range(100)], [_float(STALE_NAN_BITS)] * 100, "column"),
        ([NOW_MS + 15_000 * i for i in range(60)], [0.0] * 60, "column"),  # all +0.0: no value fields
        ([NOW_MS + 15_000 * i for i in range(60)], [float(i + 1) for i in range(60)], "segments"),
        ([-1] + [NOW_MS] * 99, [1.0] * 100, "segments"),  # not uniform, so not the column path
        ([NOW_MS + 15_000 * i for i in range(3)], [0.0] * 3, "column"),
        ([NOW_MS + 15_000 * i for i in range(6)], [1.0] * 6, "segments"),
        ([127, 128] * 5, [1.0] * 10, "segments"),  # varint lengths differ
        ([-5] * 10, [1.0] * 10, "segments"),  # negative: 10-byte varints
        ([0] * 10, [1.0] * 10, "segments"),  # timestamp 0 has no field
        ([2**56] * 10, [1.0] * 10, "segments"),  # a 9-byte varint overflows the 64-bit lanes
        ([NOW_MS + i for i in range(10)], [0.0, 1.0] * 5, "loop"),  # +0.0 among others
        ([NOW_MS + i for i in range(10)], [-0.0] * 10, "loop"),
        ([NOW_MS + i for i in range(2)], [0.0, 1.0], "loop"),
    ],
)
def test_each_batch_shape_takes_its_path(
    paths: list[str], timestamps: list[int], values: list[float], path: str
) -> None:
    _assert_round_trip([([("a", "b")], timestamps, values)])
    assert paths == [path]


def test_caches_stay_bounded_and_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rw, "_CACHE_ENTRIES", 3)
    monkeypatch.setattr(rw, "_TEMPLATE_CACHE_ENTRIES", 3)
    for cache in (rw._sample_parts, rw._templates_with_value, rw._templates_zero_value, rw._segments):
        cache.clear()  # other tests filled them past 3; a miss is what empties a cache
    for i in range(20):
        _assert_round_trip([([("a", "b")], [NOW_MS + i + k for k in range(9)], [float(i)] * 9)])
        _assert_round_trip([([("a", "b")], [NOW_MS + i], [float(i + 1)])])
        _assert_round_trip([([("a", "b")], [NOW_MS + i + k for k in range(4)], [float(i + 1)] * 4)])
    assert len(rw._templates_with_value) <= 3
    assert len(rw._segments) <= 3
    assert len(rw._sample_parts) <= 3


# --- input checks -------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [[("b", "1"), ("a", "2")], [("a", "1"), ("a", "2")], [("job", "x"), ("__name__", "up")]],
    ids=["unsorted", "repeated", "name-not-first-when-unsorted"],
)
def test_labels_must_be_sorted_without_repeats(labels: Labels) -> None:
    with pytest.raises(ValueError, match="sorted"):
        rw.encode_labels(labels)


def test_label_order_is_bytewise_so_uppercase_sorts_before_name() -> None:
    labels = [("Zone", "eu"), ("__name__", "up"), ("instance", "x")]
    assert labels == sorted(labels)
    _assert_round_trip([(labels, [NOW_MS], [1.0])])


@pytest.mark.parametrize(
    ("timestamps", "values"),
    [
        ([1, 2], [1.0]),
        ([2**63], [1.0]),
        ([-(2**63) - 1], [1.0]),
        ([1.5], [1.0]),
        ([2**63] * 9, [1.0] * 9),
        ([NOW_MS], ["x"]),
        ([NOW_MS, NOW_MS + 1], [1.0, "x"]),
        ([NOW_MS] * 100, [1.0] * 99 + ["x"]),
    ],
)
def test_bad_samples_are_rejected(timestamps: list[object], values: list[object]) -> None:
    with pytest.raises(ValueError):
        rw.encode_timeseries(b"", timestamps, values)  # type: ignore[arg-type]


# --- snappy -------------------------------------------------------------------


@given(st.binary(max_size=20_000) | st.just(b"\x00" * 100_000))
def test_snappy_block_round_trip(body: bytes) -> None:
    compressed = rw.compress(body)
    assert bytes(cramjam.snappy.decompress_raw(compressed)) == body
    assert rw.decompress(compressed) == body
    assert not compressed.startswith(b"\xff\x06\x00\x00sNaPpY")  # not the framed format


def test_request_body_compresses_and_decodes() -> None:
    series = [
        ([("__name__", "up"), ("i", str(i))], [NOW_MS + 15_000 * k for k in range(6)], [1.0] * 6) for i in range(100)
    ]
    body = _ours(series)
    assert rw.decompress(rw.compress(body)) == body
    assert len(rw.compress(body)) < len(body)


def test_decompress_refuses_oversized_or_broken_blocks() -> None:
    compressed = rw.compress(b"a" * 1000)
    with pytest.raises(ValueError, match="limit"):
        rw.decompress(compressed, max_size=999)
    with pytest.raises(ValueError):
        rw.decompress(b"\xff\xff\xff\xff\xff\xff")
    with pytest.raises(ValueError):
        rw.decompress(b"\x0a\x00garbage")


def test_remote_write_headers() -> None:
    assert dict(rw.REMOTE_WRITE_HEADERS) == {
        "Content-Encoding": "snappy",
        "Content-Type": "application/x-protobuf",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
    }


# --- the generated module against its .proto ---------------------------------

_SCALARS = {
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "sint32": descriptor_pb2.FieldDescriptorProto.TYPE_SINT32,
    "sint64": descriptor_pb2.FieldDescriptorProto.TYPE_SINT64,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
}


def _schema_from_proto_text(text: str) -> dict[str, object]:
    """A small reader for the subset of proto3 remote_write.proto uses.

    Not a protobuf parser: enough to notice the .proto and the committed
    generated module drifting apart when protoc is not installed to regenerate.
    """
    tokens = re.findall(r'"[^"]*"|\w+(?:\.\w+)*|[{};=]', re.sub(r"//[^\n]*", "", text))
    schema: dict[str, object] = {}
    scope: list[tuple[str, str]] = []  # (kind, name) of the open blocks
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("syntax", "package", "reserved"):
            where = ".".join(n for k, n in scope if k != "oneof")
            if tok == "reserved":
                schema[f"{where}#reserved"] = tokens[i + 1]
            else:
                schema[f"#{tok}"] = tokens[i + 2].strip('"') if tok == "syntax" else tokens[i + 1]
            i = tokens.index(";", i) + 1
        elif tok in ("message", "enum", "oneof"):
            scope.append((tok, tokens[i + 1]))
            i += 3
        elif tok == "}":
            scope.pop()
            i += 1
        elif scope and scope[-1][0] == "enum":
            schema[".".join(n for _, n in scope) + "." + tok] = int(tokens[i + 2])
            i += 4
        else:
            repeated = tok == "repeated"
            i += repeated
            type_name, name, number = tokens[i], tokens[i + 1], int(tokens[i + 3])
            message = ".".join(n for k, n in scope if k != "oneof")
            oneof = scope[-1][1] if scope[-1][0] == "oneof" else None
            schema[f"{message}.{name}"] = (number, type_name.split(".")[-1], repeated, oneof)
            i += 5
    return schema


def _schema_from_descriptor(file: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    schema: dict[str, object] = {"#syntax": file.syntax, "#package": file.package}

    def enum(prefix: str, e: descriptor_pb2.EnumDescriptorProto) -> None:
        for value in e.value:
            schema[f"{prefix}{e.name}.{value.name}"] = value.number

    def message(prefix: str, m: descriptor_pb2.DescriptorProto) -> None:
        name = prefix + m.name
        for r in m.reserved_range:
            schema[f"{name}#reserved"] = str(r.start) if r.end == r.start + 1 else f"{r.start}-{r.end}"
        for f in m.field:
            scalar = {v: k for k, v in _SCALARS.items()}.get(f.type)
            type_name = scalar or f.type_name.split(".")[-1]
            oneof = m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
            repeated = f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            schema[f"{name}.{f.name}"] = (f.number, type_name, repeated, oneof)
        for e in m.enum_type:
            enum(name + ".", e)
        for nested in m.nested_type:
            message(name + ".", nested)

    for e in file.enum_type:
        enum("", e)
    for m in file.message_type:
        message("", m)
    return schema


def _committed_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The serialized FileDescriptorProto embedded in the committed module, read from its source.

    Taken from the text rather than from `pb.DESCRIPTOR.serialized_pb`, which
    some runtimes rebuild from their own tables (4.21's upb drops reserved ranges).
    """
    tree = ast.parse((REPO / "collector" / "prompb" / "remote_write_pb2.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile":
            serialized = node.args[0]
            assert isinstance(serialized, ast.Constant) and isinstance(serialized.value, bytes)
            return descriptor_pb2.FileDescriptorProto.FromString(serialized.value)
    raise AssertionError("no AddSerializedFile call in remote_write_pb2.py")


def test_generated_module_matches_the_proto_source() -> None:
    file = _committed_file_descriptor()
    assert file.name == "collector/prompb/remote_write.proto"
    assert _schema_from_descriptor(file) == _schema_from_proto_text(PROTO.read_text())
    # and the runtime loaded what the module embeds
    assert pb.DESCRIPTOR.name == file.name
    assert sorted(m.name for m in pb.DESCRIPTOR.message_types_by_name.values()) == sorted(
        m.name for m in file.message_type
    )


def test_proto_reader_notices_a_changed_field() -> None:
    text = PROTO.read_text()
    assert _schema_from_proto_text(text.replace("int64 timestamp = 2;", "int64 timestamp = 3;")) != (
        _schema_from_descriptor(_committed_file_descriptor())
    )


def test_generated_module_loads_without_warnings() -> None:
    """A runtime that starts warning about (or refusing) this gencode's age shows up here first."""
    code = "import collector.prompb.remote_write_pb2"
    subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO, check=True)


def _protoc_3_21() -> bool:
    if shutil.which("protoc") is None:
        return False
    out = subprocess.run(["protoc", "--version"], capture_output=True, text=True, check=False).stdout
    return out.startswith("libprotoc 3.21.")


@pytest.mark.skipif(not _protoc_3_21(), reason="protoc 3.21.x not installed (apt-get install protobuf-compiler)")
def test_committed_generated_code_matches_a_fresh_regeneration(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROTOC"} | {"OUT": str(tmp_path)}
    subprocess.run(["bash", "scripts/gen_prompb.sh"], cwd=REPO, env=env, check=True)
    for name in ("remote_write_pb2.py", "remote_write_pb2.pyi"):
        fresh = (tmp_path / "collector" / "prompb" / name).read_bytes()
        assert fresh == (REPO / "collector" / "prompb" / name).read_bytes(), name
