"""Payload codec v2 for DATA (docs/wire.md §10): fixed-width columns against a series table.

A v2 data payload names its series table (wire/table.py) by id and carries, for the series
of the batch, their table indices, timestamp columns and values, each an array of one
fixed width. The collector decodes it with array operations (wire/columns_np.py), not a
step per series; this module is the encoder and stays free of numpy, because the agent
encodes and must stay small.

Integers and values travel as 64-bit words, **byte-planed**: all first bytes, then all
second bytes, and so on, so the zero high bytes of small deltas and the shared exponent
bytes of nearby floats sit together and compress to almost nothing.
"""

from __future__ import annotations

import struct
from array import array

from wire.compression import compress
from wire.frame import WIRE_VERSION_2, Codec, Kind, Prepared
from wire.model import I64_MAX, I64_MIN, Series, WireError
from wire.payload import MAX_SCALED, _scaled
from wire.table import TABLE_ID_LEN, CurrentTable

# table id, table series count, series count, column count, column points, sample count
_HEAD = struct.Struct("<32sIIIII")
COLUMNS_HEAD_LEN = _HEAD.size  # 52
SCALE_FLOAT64 = 255  # the series' values are f64 bits, each XOR the one before
MAX_SCALE = 9
MASK64 = (1 << 64) - 1
_LITTLE = struct.pack("=H", 1) == struct.pack("<H", 1)


def planes(words: list[int]) -> bytes:
    """Unsigned 64-bit words as 8 byte planes (plane j holds byte j of every word)."""
    arr = array("Q", words)
    if not _LITTLE:
        arr.byteswap()
    raw = arr.tobytes()
    return b"".join(raw[j::8] for j in range(8))


def _u32s(values: list[int]) -> bytes:
    arr = array("I", values)
    if arr.itemsize != 4:
        raise WireError("platform", "unsupported integer width")
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _value_words(values: tuple[float, ...]) -> tuple[int, list[int]]:
    """(scale, words) for one series: a decimal scale k and the deltas of value * 10^k when
    every value is such a decimal, else SCALE_FLOAT64 and each value's bits XOR the last's."""
    scaled = _scaled(values)
    if scaled is not None:
        k, ints = scaled
        prev = 0
        words = []
        for i in ints:
            words.append((i - prev) & MASK64)
            prev = i
        return k, words
    bits = struct.unpack(f"<{len(values)}Q", struct.pack(f"<{len(values)}d", *values))
    prev = 0
    words = []
    for b in bits:
        words.append(b ^ prev)
        prev = b
    return SCALE_FLOAT64, words


def encode_columns(table: CurrentTable, placed: list[tuple[int, Series]]) -> bytes:
    """The uncompressed v2 data payload for series already placed in `table` (wire.table.
    TableBuilder.place: indices strictly increasing)."""
    if len(table.id) != TABLE_ID_LEN:
        raise ValueError("a table id is 32 bytes")
    gaps: list[int] = []
    series_cols: list[int] = []
    scales = bytearray()
    value_words: list[int] = []
    columns: dict[tuple[int, ...], int] = {}
    last = -1
    samples = 0
    for index, s in placed:
        n = len(s.timestamps_ms)
        if n == 0 or n != len(s.values):
            raise WireError("schema", f"series {s.name!r} has {n} timestamps, {len(s.values)} values")
        if not last < index < table.series_count:
            raise ValueError(f"table index {index} out of order or outside the table's {table.series_count}")
        gaps.append(index - last)
        last = index
        col = columns.get(s.timestamps_ms)
        if col is None:
            col = columns[s.timestamps_ms] = len(columns)
        series_cols.append(col)
        k, words = _value_words(s.values)
        scales.append(k)
        value_words.extend(words)
        samples += n
    ts_words: list[int] = []
    lens: list[int] = []
    for ts in columns:
        if min(ts) < I64_MIN or max(ts) > I64_MAX:
            raise WireError("schema", "timestamps must fit int64")
        prev = 0
        for t in ts:
            ts_words.append((t - prev) & MASK64)
            prev = t
        lens.append(len(ts))
    return b"".join((
        _HEAD.pack(table.id, table.series_count, len(placed), len(columns), len(ts_words), samples),
        _u32s(gaps), _u32s(series_cols), _u32s(lens), bytes(scales), planes(ts_words), planes(value_words),
    ))


def prepare_columns(
    table: CurrentTable,
    placed: list[tuple[int, Series]],
    zstd_level: int = 19,
    empty_window_ms: int = 0,
    codec: Codec = Codec.ZSTD,
) -> Prepared:
    """A v2 data payload, compressed (codec ZSTD; NONE only for examples and tests) and
    counted, ready to be sealed and signed."""
    raw = encode_columns(table, placed)
    series = [s for _, s in placed]
    return Prepared(
        Kind.DATA,
        codec,
        compress(raw, zstd_level) if codec == Codec.ZSTD else raw,
        len(raw),
        min((min(s.timestamps_ms) for s in series), default=empty_window_ms),
        max((max(s.timestamps_ms) for s in series), default=empty_window_ms),
        len(series),
        sum(len(s.timestamps_ms) for s in series),
        version=WIRE_VERSION_2,
    )


def columns_table_id(raw: bytes) -> bytes:
    """The table id a v2 data payload names (its first 32 bytes)."""
    if len(raw) < COLUMNS_HEAD_LEN:
        raise WireError("malformed", f"v2 data payload of {len(raw)} bytes is shorter than its "
                                     f"{COLUMNS_HEAD_LEN}-byte head")
    return bytes(raw[:TABLE_ID_LEN])


__all__ = ["COLUMNS_HEAD_LEN", "MAX_SCALE", "MAX_SCALED", "SCALE_FLOAT64", "columns_table_id", "encode_columns",
           "planes", "prepare_columns"]
