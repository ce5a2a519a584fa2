"""Prometheus remote-write 1.0 wire encoding, written by hand for throughput.

The collector forwards every sample it receives, millions a second, so building
a protobuf message object per sample is out of the question. Instead:

* a series' labels are encoded once (`encode_labels`) and the bytes are reused
  batch after batch;
* a batch of one series' samples becomes one `timeseries` field
  (`encode_timeseries`) whose per-sample work happens in C, not in a Python
  loop per sample: everything but the values depends on the timestamps only
  and is cached per timestamp vector (a scrape's series all share theirs),
  and the values go in with `map` over struct's packer and a join (the
  segment path) or, for long uniform batches, with eight strided slice
  assignments (the column path). Batches mixing +0.0 with other values, which
  proto3 encodes with differently shaped samples, take a per-sample loop;
* a whole decoded batch of columns (wire v2: every series' points back to back
  in one timestamp and one value array) becomes its `timeseries` fields at once
  (`encode_timeseries_columns`), with array operations and no Python step per
  series or per sample but the final cut into one bytes object per series;
* a request body is the plain concatenation of such fields
  (`encode_write_request`), then raw-snappy compressed (`compress`).

The output is byte-for-byte what protobuf's own serializer (upb/C++ backends)
writes for the same WriteRequest, including proto3's omission of zero-valued
scalars and empty strings, so the generated code in `collector.prompb` is the
oracle in the tests and is used here only to decode (`decode_write_request`).

A request also needs the headers in `REMOTE_WRITE_HEADERS` plus a User-Agent
naming the sender and its version (the 1.0 spec requires one; it is the
caller's to set).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType
from typing import Final, TypeVar

import cramjam
import numpy as np
import numpy.typing as npt

from collector.prompb import remote_write_pb2

CONTENT_ENCODING: Final = "snappy"
CONTENT_TYPE: Final = "application/x-protobuf"
REMOTE_WRITE_VERSION: Final = "0.1.0"
REMOTE_WRITE_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Content-Encoding": CONTENT_ENCODING,
        "Content-Type": CONTENT_TYPE,
        "X-Prometheus-Remote-Write-Version": REMOTE_WRITE_VERSION,
    }
)

# A guard against a forged snappy length preamble making decompress allocate
# gigabytes; real requests are a few MiB (receivers cap them around 32 MiB).
DEFAULT_MAX_DECOMPRESSED: Final = 64 << 20

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
_U64_ARRAY = npt.NDArray[np.uint64]
_U8_ARRAY = npt.NDArray[np.uint8]

_K = TypeVar("_K")
_V = TypeVar("_V")

# Tags: (field number << 3) | wire type. LEN = 2, I64 = 1, VARINT = 0.
_TAG_TIMESERIES: Final = b"\x0a"  # WriteRequest.timeseries = 1, LEN
_TAG_LABEL: Final = b"\x0a"  # TimeSeries.labels = 1, LEN
_TAG_SAMPLE: Final = 0x12  # TimeSeries.samples = 2, LEN
_TAG_LABEL_NAME: Final = b"\x0a"  # Label.name = 1, LEN
_TAG_LABEL_VALUE: Final = b"\x12"  # Label.value = 2, LEN
_TAG_VALUE: Final = 0x09  # Sample.value = 1, I64 (little-endian double)
_TAG_TIMESTAMP: Final = 0x10  # Sample.timestamp = 2, VARINT

_I64_MIN: Final = -(1 << 63)
_I64_END: Final = 1 << 63
_U64: Final = (1 << 64) - 1
_ONE_BYTE: Final = tuple(bytes((i,)) for i in range(256))
_ZERO_DOUBLE: Final = bytes(8)
_PACK_DOUBLE: Final = struct.Struct("<d").pack
_TIMESTAMP_TAG: Final = bytes((_TAG_TIMESTAMP,))
# A Sample's head (its tag, its length, and the value's tag when the value is
# sent), indexed by the length of its timestamp field (0, or tag + 1..10 bytes).
_HEAD_WITH_VALUE: Final = tuple(bytes((_TAG_SAMPLE, 9 + n, _TAG_VALUE)) for n in range(12))
_HEAD_WITHOUT_VALUE: Final = tuple(bytes((_TAG_SAMPLE, n)) for n in range(12))

# Below this many samples the column path's fixed cost (a copy and eight
# strided slice assignments whatever n is) loses to the segment path's join
# (one C call per sample); measured, the two are even between 64 and 128.
_COLUMN_MIN_SAMPLES: Final = 64
# The column path spreads each timestamp's 7-bit groups inside its own 64-bit
# lane, so the varint must fit in 8 bytes: timestamps below 2**56.
_COLUMN_MAX_VARINT: Final = 8

# Timestamps repeat: every series of one scrape shares the scrape's timestamp,
# and every series of one agent batch shares the batch's timestamps. So their
# encodings are memoised, per timestamp for the per-sample path and per
# timestamp vector for the column path. A cache is emptied when full, which
# costs one rebuild per live entry and keeps memory bounded (about 1 MiB for
# the per-timestamp cache; 2 MiB for a template cache at 60 samples a vector,
# 7.5 MiB at most).
_CACHE_ENTRIES: Final = 4096
_TEMPLATE_CACHE_ENTRIES: Final = 1024
_TEMPLATE_CACHE_MAX_SAMPLES: Final = 256
# timestamp -> (sample head when the value is sent, sample head when it is not,
# the timestamp field); the heads carry the sample's length, hence per timestamp.
_sample_parts: dict[int, tuple[bytes, bytes, bytes]] = {}
# packed timestamps -> Sample submessages with the timestamps written in and the
# values zeroed (or, for all-+0.0 values, absent); b"" when the layout is not uniform.
_templates_with_value: dict[bytes, bytes] = {}
_templates_zero_value: dict[bytes, bytes] = {}
# packed timestamps -> [head 0, (value 0), ts 0 + head 1, (value 1), ..., ts n-1]:
# the samples region with holes for the values, for the segment path.
_segments: dict[bytes, list[bytes]] = {}


def _uvarint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:  # a request's series lengths, the usual case past one byte
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _remember(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def encode_labels(labels: Sequence[tuple[str, str]]) -> bytes:
    """The `labels` fields of one TimeSeries, to be cached per series.

    `labels` must be sorted by name (bytewise, as Prometheus sorts; Python's
    str order is the same as UTF-8 byte order) without repeats: a receiver
    rejects the whole request otherwise, so a caller bug fails here instead,
    once per series. Empty strings are omitted, as protobuf does for proto3.
    """
    parts: list[bytes] = []
    previous: str | None = None
    for name, value in labels:
        if previous is not None and name <= previous:
            raise ValueError(f"labels must be sorted by name without repeats: {previous!r} then {name!r}")
        previous = name
        name_b = name.encode()
        value_b = value.encode()
        body = b""
        if name_b:
            body = _TAG_LABEL_NAME + _uvarint(len(name_b)) + name_b
        if value_b:
            body += _TAG_LABEL_VALUE + _uvarint(len(value_b)) + value_b
        parts.append(_TAG_LABEL + _uvarint(len(body)) + body)
    return b"".join(parts)


def _new_sample_parts(timestamp: int) -> tuple[bytes, bytes, bytes]:
    # proto3 leaves a scalar at its default out, so timestamp 0 has no field.
    ts = _TIMESTAMP_TAG + _uvarint(timestamp & _U64) if timestamp else b""
    parts = (_HEAD_WITH_VALUE[len(ts)], _HEAD_WITHOUT_VALUE[len(ts)], ts)
    _remember(_sample_parts, timestamp, parts, _CACHE_ENTRIES)
    return parts


def _sample(timestamp: int, value_bits: bytes) -> bytes:
    parts = _sample_parts.get(timestamp) or _new_sample_parts(timestamp)
    # proto3 leaves the double out at its default, which is the bit pattern of
    # +0.0 only: -0.0 is sent (as upb and C++ do), so compare bits, not floats.
    if value_bits != _ZERO_DOUBLE:
        return parts[0] + value_bits + parts[2]
    return parts[1] + parts[2]


def _samples_by_loop(timestamps_ms: Sequence[int], packed_values: bytes) -> bytes:
    offsets = range(0, len(packed_values), 8)
    return b"".join([_sample(t, packed_values[i : i + 8]) for t, i in zip(timestamps_ms, offsets, strict=True)])


def _new_segments(timestamps_ms: Sequence[int], packed_timestamps: bytes) -> list[bytes]:
    n = len(timestamps_ms)
    pieces = [b""] * (2 * n + 1)
    # Even for a few samples, the template's few dozen C-level operations beat
    # encoding each timestamp on its own (measured from n = 4).
    template = _new_template(timestamps_ms, packed_timestamps, True)
    if template:
        # Uniform timestamps: cut the column path's template between its value holes.
        stride = len(template) // n
        pieces[0] = template[:3]
        pieces[2::2] = [template[at : at + stride - 8] for at in range(11, len(template), stride)]
    else:
        parts = [_sample_parts.get(t) or _new_sample_parts(t) for t in timestamps_ms]
        pieces[0] = parts[0][0]
        pieces[2::2] = [ts[2] + head[0] for ts, head in zip(parts, parts[1:], strict=False)] + [parts[-1][2]]
    if n <= _TEMPLATE_CACHE_MAX_SAMPLES:
        _remember(_segments, packed_timestamps, pieces, _TEMPLATE_CACHE_ENTRIES)
    return pieces


def _samples_by_segments(timestamps_ms: Sequence[int], packed_timestamps: bytes, values: Sequence[float]) -> bytes:
    """The samples region for values that are all sent (none is +0.0), any timestamps.

    Everything between two values depends on the timestamps only, so it is
    cached per timestamp vector, and the values go into the holes by `map`
    over a C function and a join: no Python code runs per sample.
    """
    pieces = _segments.get(packed_timestamps) or _new_segments(timestamps_ms, packed_timestamps)
    pieces = pieces.copy()  # the cached list must keep its holes
    pieces[1::2] = map(_PACK_DOUBLE, values)
    return b"".join(pieces)


def _lane_masks(n: int, varint_len: int) -> tuple[tuple[int, ...], int]:
    """For n 64-bit lanes: the mask of 7-bit group k in every lane, and every lane's continuation bits."""
    lane_ones = int.from_bytes((b"\x01" + bytes(7)) * n, "little")  # 1 at the bottom of every lane
    groups = tuple((0x7F << (7 * k)) * lane_ones for k in range(varint_len))
    continuation = sum(0x80 << (8 * k) for k in range(varint_len - 1)) * lane_ones
    return groups, continuation


# Only for vectors short enough to be cached themselves: masks grow with n.
_small_lane_masks = lru_cache(maxsize=64)(_lane_masks)


def _new_template(timestamps_ms: Sequence[int], packed_timestamps: bytes, with_value: bool) -> bytes:
    """Sample submessages for these timestamps, values zeroed; b"" if their layouts differ.

    Uniform layout needs every timestamp > 0 with the same varint length (ms
    since 1970 are all 6 bytes until the year 2527). The varints are computed
    for all timestamps at once: each timestamp sits in its own 64-bit lane of
    one big integer, and 7-bit group k is moved up k bits to fill byte k.
    """
    n = len(timestamps_ms)
    t_min = min(timestamps_ms)
    varint_len = _varint_len(max(timestamps_ms))
    if t_min <= 0 or varint_len > _COLUMN_MAX_VARINT or _varint_len(t_min) != varint_len:
        return b""
    masks = _small_lane_masks if n <= _TEMPLATE_CACHE_MAX_SAMPLES else _lane_masks
    groups, continuation = masks(n, varint_len)
    lanes = int.from_bytes(packed_timestamps, "little")
    spread = continuation
    for k, group in enumerate(groups):
        spread |= (lanes & group) << k
    varints = spread.to_bytes(8 * n, "little")

    head = _HEAD_WITH_VALUE[1 + varint_len] + _ZERO_DOUBLE if with_value else _HEAD_WITHOUT_VALUE[1 + varint_len]
    sample = head + _TIMESTAMP_TAG
    stride = len(sample) + varint_len
    out = bytearray((sample + bytes(varint_len)) * n)
    for k in range(varint_len):
        out[len(sample) + k :: stride] = varints[k::8]
    return bytes(out)


def _samples_by_column(
    timestamps_ms: Sequence[int], packed_timestamps: bytes, packed_values: bytes, with_value: bool
) -> bytes | bytearray | None:
    """The samples region written column by column, or None when its layout is not uniform.

    Every Sample submessage must have the same layout: uniform timestamps (see
    `_new_template`) and values all sent or all +0.0 (left out). Then the n
    doubles go in with eight strided slice assignments, one per byte column.
    """
    cache = _templates_with_value if with_value else _templates_zero_value
    template = cache.get(packed_timestamps)
    if template is None:
        template = _new_template(timestamps_ms, packed_timestamps, with_value)
        if len(timestamps_ms) <= _TEMPLATE_CACHE_MAX_SAMPLES:
            _remember(cache, packed_timestamps, template, _TEMPLATE_CACHE_ENTRIES)
    if not template:
        return None
    if not with_value:
        return template
    out = bytearray(template)
    stride = len(template) // len(timestamps_ms)
    for k in range(8):
        out[3 + k :: stride] = packed_values[k::8]  # past sample tag, length and value tag
    return out


def encode_timeseries(labels_bytes: bytes, timestamps_ms: Sequence[int], values: Sequence[float]) -> bytes:
    """One complete WriteRequest `timeseries` field: tag, length, TimeSeries.

    `labels_bytes` comes from `encode_labels`. Timestamps are int64 ms (any
    sign); values are doubles sent bit for bit (NaN payloads such as the
    stale marker 0x7ff0000000000002, infinities and -0.0 survive). No values
    gives a series without samples.
    """
    n = len(values)
    if len(timestamps_ms) != n:
        raise ValueError(f"{len(timestamps_ms)} timestamps for {n} values")
    samples: bytes | bytearray | None = None
    try:
        if n == 1 and type(t := timestamps_ms[0]) is int and _I64_MIN <= t < _I64_END:
            # One sample per series is the commonest batch: skip the vector packing.
            samples = _sample(t, _PACK_DOUBLE(values[0]))
        elif n:
            # Packing the timestamps also checks, in C, that each is an int64.
            packed_timestamps = struct.pack(f"<{n}q", *timestamps_ms)
            # `in` compares in C; it also matches -0.0, which merely sends such
            # a batch down the +0.0 route, where the bits tell the two apart.
            with_value = 0.0 not in values
            if with_value and n < _COLUMN_MIN_SAMPLES:
                samples = _samples_by_segments(timestamps_ms, packed_timestamps, values)
            else:
                packed_values = struct.pack(f"<{n}d", *values)
                if with_value or packed_values.count(0) == len(packed_values):
                    samples = _samples_by_column(timestamps_ms, packed_timestamps, packed_values, with_value)
                if samples is None and with_value:
                    samples = _samples_by_segments(timestamps_ms, packed_timestamps, values)
                if samples is None:
                    samples = _samples_by_loop(timestamps_ms, packed_values)
        else:
            samples = b""
    except struct.error as exc:
        raise ValueError(f"timestamps must be int64 milliseconds and values floats: {exc}") from None
    return b"".join((_TAG_TIMESERIES, _uvarint(len(labels_bytes) + len(samples)), labels_bytes, samples))


# A uvarint of n takes k + 1 bytes from n >= 2**(7k) on: the thresholds for k = 1..9.
_UVARINT_STEPS: Final = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_VALUE_BYTES: Final = np.arange(8, dtype=np.int64)
_PARTS: Final = np.array([0, 1, 2], dtype=np.uint8)  # a field's head, labels, samples
_PICKED: Final = np.array([False, True])  # a gap, then a slice


def _uvarint_lens(n: _U64_ARRAY) -> I64:
    lens: I64 = np.searchsorted(_UVARINT_STEPS, n, side="right").astype(np.int64) + 1
    return lens


def _uvarint_group(n: _U64_ARRAY, k: int, more: bool | npt.NDArray[np.bool_]) -> _U8_ARRAY:
    """Byte k of each n's uvarint: its 7-bit group k, with the continuation bit where `more`."""
    group: _U8_ARRAY = ((n >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
    if more is True:
        group |= np.uint8(0x80)
    elif more is not False:
        group[more] |= np.uint8(0x80)
    return group


def _put_uvarints(out: _U8_ARRAY, at: I64, n: _U64_ARRAY, lens: I64) -> None:
    """Write each n[i] as a uvarint of lens[i] bytes at out[at[i]:]: all first bytes, then all
    second bytes, and so on."""
    if not n.size:
        return
    longest = int(lens.max())
    uniform = int(lens.min()) == longest
    for k in range(longest):
        if uniform:
            out[at + k] = _uvarint_group(n, k, k < longest - 1)
        else:
            live = lens > k
            out[at[live] + k] = _uvarint_group(n[live], k, lens[live] > k + 1)


def _uvarint_rows(rows: _U8_ARRAY, n: _U64_ARRAY) -> None:
    """Each n[i] as a uvarint filling row i of `rows` (as many columns as every n's uvarint has bytes)."""
    width = rows.shape[1]
    for k in range(width):
        rows[:, k] = _uvarint_group(n, k, k < width - 1)


def _samples(stamps: _U64_ARRAY, bits: _U64_ARRAY) -> tuple[_U8_ARRAY, I64]:
    """Every Sample submessage (tag, length, body) back to back, and where each starts (plus the end).

    proto3 leaves out a value whose bits are +0.0's and a timestamp of 0. When every sample
    has the same layout (values sent, timestamps of one varint length: the usual batch) the
    samples are the rows of one 2-D array, written a column at a time."""
    points = stamps.size
    with_value = bits != 0
    with_stamp = stamps != 0
    stamp_lens = _uvarint_lens(stamps)
    if points and with_value.all() and with_stamp.all() and int(stamp_lens.min()) == int(stamp_lens.max()):
        width = 12 + int(stamp_lens[0])  # tag, length, 0x09 + 8 bytes, 0x10 + varint
        rows = np.empty((points, width), dtype=np.uint8)
        rows[:, 0] = 0x12
        rows[:, 1] = width - 2
        rows[:, 2] = 0x09
        rows[:, 3:11] = bits.astype("<u8", copy=False).view(np.uint8).reshape(points, 8)
        rows[:, 11] = 0x10
        _uvarint_rows(rows[:, 12:], stamps)
        return rows.reshape(-1), np.arange(points + 1, dtype=np.int64) * width
    stamp_lens = np.where(with_stamp, stamp_lens, 0)
    bodies = 9 * with_value + (stamp_lens + with_stamp)  # at most 9 + 11: its length takes one byte
    bounds = np.zeros(points + 1, dtype=np.int64)
    np.cumsum(bodies + 2, out=bounds[1:])
    out = np.empty(int(bounds[-1]), dtype=np.uint8)
    at = bounds[:-1]
    out[at] = 0x12
    out[at + 1] = bodies.astype(np.uint8)
    value_at = at[with_value] + 2
    out[value_at] = 0x09
    out[(value_at + 1)[:, None] + _VALUE_BYTES] = (
        bits[with_value].astype("<u8", copy=False).view(np.uint8).reshape(-1, 8))
    stamp_at = at[with_stamp] + 2 + 9 * with_value[with_stamp]
    out[stamp_at] = 0x10
    _put_uvarints(out, stamp_at + 1, stamps[with_stamp], stamp_lens[with_stamp])
    return out, bounds


def _heads(inner: I64) -> tuple[_U8_ARRAY, I64]:
    """Each field's head back to back (the WriteRequest.timeseries tag and the uvarint of its
    length), and each head's length."""
    n = inner.astype(np.uint64)
    lens = _uvarint_lens(n)
    if int(lens.min()) == int(lens.max()):
        rows = np.empty((n.size, 1 + int(lens[0])), dtype=np.uint8)
        rows[:, 0] = 0x0A
        _uvarint_rows(rows[:, 1:], n)
        return rows.reshape(-1), lens + 1
    bounds = np.zeros(n.size + 1, dtype=np.int64)
    np.cumsum(1 + lens, out=bounds[1:])
    out = np.empty(int(bounds[-1]), dtype=np.uint8)
    out[bounds[:-1]] = 0x0A
    _put_uvarints(out, bounds[:-1] + 1, n, lens)
    return out, lens + 1


def _gather(blob: _U8_ARRAY, starts: I64, ends: I64) -> _U8_ARRAY:
    """blob[starts[0]:ends[0]], blob[starts[1]:ends[1]], ... back to back (at least one slice)."""
    lens = ends - starts
    if np.array_equal(starts[1:], ends[:-1]):  # one run: the usual batch
        return blob[int(starts[0]):int(ends[-1])]
    gaps = starts - np.concatenate((np.zeros(1, dtype=np.int64), ends[:-1]))
    if int(gaps.min()) >= 0:  # in order, not overlapping: one mask over the blob picks them
        spans = np.empty(2 * starts.size, dtype=np.int64)
        spans[0::2], spans[1::2] = gaps, lens
        picked = np.broadcast_to(_PICKED, (starts.size, 2)).reshape(-1).repeat(spans)
        in_order: _U8_ARRAY = blob[:int(ends[-1])][picked]
        return in_order
    total = int(lens.sum())
    within = np.arange(total, dtype=np.int64)
    any_order: _U8_ARRAY = blob[within + np.repeat(starts - (np.cumsum(lens) - lens), lens)]
    return any_order


def encode_timeseries_columns(
    labels: bytes, label_starts: I64, label_ends: I64, starts: I64, timestamps_ms: I64, values: F64
) -> list[bytes]:
    """Each series' complete WriteRequest `timeseries` field, for a batch held as columns.

    Series i's labels are `labels[label_starts[i]:label_ends[i]]` (what
    `encode_labels` gave for it; any slices of one bytes object, in any order,
    though slices in rising order are cheapest); its points are
    `timestamps_ms[starts[i]:starts[i + 1]]` and the `values` there (int64 ms
    and float64; `starts` has one more entry than there are series, the last
    being the number of points).

    Contract: element i is byte for byte `encode_timeseries(labels_i, ts_i,
    values_i)`, hence what protobuf's serializer writes. The proto3 rules
    apply per sample: the value (tag 0x09 and 8 little-endian bytes) is left
    out when its bits are +0.0's, so -0.0 and every NaN payload are sent; the
    timestamp (tag 0x10 and the uvarint of the int64 read as u64, so a
    negative one takes 10 bytes) is left out when 0. Each sample is tag 0x12,
    a one-byte length and its body; each field is tag 0x0A, the uvarint of
    the labels' and samples' length, the labels, the samples. A series
    without points gives a field of its labels alone.

    Heads, labels and samples are each written back to back by array
    operations (a column at a time where every sample has the same layout),
    then interleaved into one buffer by masks; only the cut into one bytes
    object per series is a step per series.
    """
    starts = np.asarray(starts, dtype=np.int64)
    label_starts = np.asarray(label_starts, dtype=np.int64)
    label_ends = np.asarray(label_ends, dtype=np.int64)
    if timestamps_ms.dtype != np.int64 or values.dtype != np.float64:
        raise ValueError(f"timestamps must be int64 and values float64, not {timestamps_ms.dtype}/{values.dtype}")
    points = int(values.size)
    m = int(starts.size) - 1
    if m < 0 or timestamps_ms.size != points or label_starts.size != m or label_ends.size != m:
        raise ValueError(f"{m + 1} starts, {label_starts.size}/{label_ends.size} label bounds, "
                         f"{timestamps_ms.size} timestamps and {points} values do not describe one batch")
    counts = np.diff(starts)
    label_lens = label_ends - label_starts
    if m and (int(starts[0]) != 0 or int(starts[-1]) != points or int(counts.min()) < 0
              or int(label_lens.min()) < 0 or int(label_starts.min()) < 0 or int(label_ends.max()) > len(labels)):
        raise ValueError("starts must rise from 0 to the number of points, and label bounds lie inside labels")
    if not m:
        return []

    stamps = np.ascontiguousarray(timestamps_ms).view(np.uint64)  # two's complement, as protobuf sends int64
    samples, sample_bounds = _samples(stamps, np.ascontiguousarray(values).view(np.uint64))
    samples_lens = np.diff(sample_bounds[starts])
    inner = label_lens + samples_lens
    heads, head_lens = _heads(inner)
    label_bytes = _gather(np.frombuffer(labels, dtype=np.uint8), label_starts, label_ends)

    # Interleave: series i is its head, its labels, its samples.
    spans = np.empty(3 * m, dtype=np.int64)
    spans[0::3] = head_lens
    spans[1::3] = label_lens
    spans[2::3] = samples_lens
    part = np.broadcast_to(_PARTS, (m, 3)).reshape(-1).repeat(spans)
    out = np.empty(part.size, dtype=np.uint8)
    out[part == 0] = heads
    out[part == 1] = label_bytes
    out[part == 2] = samples

    buf = out.tobytes()
    field_bounds = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(head_lens + inner, out=field_bounds[1:])
    bounds = field_bounds.tolist()
    return [buf[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def encode_write_request(timeseries: Iterable[bytes]) -> bytes:
    """A WriteRequest body from `encode_timeseries` outputs, in the order given.

    A repeated field is its elements' fields back to back, so concatenation is
    the whole of it.
    """
    return b"".join(timeseries)


def compress(body: bytes) -> bytes:
    """Snappy block ("raw") format, as remote write requires; not the framed format."""
    return bytes(cramjam.snappy.compress_raw(body))


def decompress(data: bytes, *, max_size: int = DEFAULT_MAX_DECOMPRESSED) -> bytes:
    """Inverse of `compress`; refuses a body that says it inflates past `max_size`."""
    size = 0
    for i, byte in enumerate(data[:5]):  # the preamble is a uvarint of at most 32 bits
        size |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            break
    else:
        raise ValueError("not a snappy block: bad length preamble")
    if size > max_size:
        raise ValueError(f"snappy block inflates to {size} bytes, over the {max_size} limit")
    try:
        return bytes(cramjam.snappy.decompress_raw(data))
    except cramjam.DecompressionError as exc:
        raise ValueError(f"not a snappy block: {exc}") from None


def decode_write_request(body: bytes) -> list[tuple[tuple[tuple[str, str], ...], list[tuple[int, float]]]]:
    """(labels, [(timestamp_ms, value), ...]) per series, parsed by the generated code.

    For tests and debugging, not the hot path. Exemplars, histograms and
    metadata are parsed but not returned. NaN payloads come back bit-exact
    with the upb/C++ backends; the pure-Python backend canonicalises NaN.
    """
    request = remote_write_pb2.WriteRequest.FromString(body)
    return [
        (
            tuple((label.name, label.value) for label in series.labels),
            [(sample.timestamp, sample.value) for sample in series.samples],
        )
        for series in request.timeseries
    ]
