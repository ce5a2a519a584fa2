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
