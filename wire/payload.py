"""Payload codec v1: series as columns (strings once, shared timestamp columns, compact values).

docs/wire.md is the normative description; the collector's hot path is decode_series.
"""

from __future__ import annotations

import io
import math
import struct
from array import array
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate
from typing import Any

from wire.model import I64_MAX, I64_MIN, Limits, MetricType, Series, WireError


class ValueMode(IntEnum):
    CONST = 0
    SCALED_DELTA = 1
    FLOAT64 = 2


def _width_for(values: list[int]) -> int:
    lo = min(values)
    hi = max(values)
    for width in (1, 2, 4):
        limit = 1 << (8 * width - 1)
        if -limit <= lo and hi < limit:
            return width
    return 8


_ARRAY_CODE = {1: "b", 2: "h", 4: "i", 8: "q"}


def _pack_ints(out: io.BytesIO, values: list[int]) -> None:
    width = _width_for(values) if values else 1
    out.write(bytes((width,)))
    arr = array(_ARRAY_CODE[width], values)
    if arr.itemsize != width:  # platforms where 'i' is not 4 bytes
        raise WireError("platform", "unsupported integer width")
    out.write(arr.tobytes() if _LITTLE else _swapped(arr))


def _swapped(arr: array[int]) -> bytes:
    copy = array(arr.typecode, arr)
    copy.byteswap()
    return copy.tobytes()


_LITTLE = struct.pack("=H", 1) == struct.pack("<H", 1)

# SCALED_DELTA integers stay within +-2**53 so that int -> float64 is exact and i / 10**k is
# one correctly rounded IEEE division in every language, not only Python's exact int division.
MAX_SCALED = 1 << 53


def _fits_i64(values: list[int] | tuple[int, ...]) -> bool:
    return not values or (I64_MIN <= min(values) and max(values) <= I64_MAX)


def _scaled(values: tuple[float, ...]) -> tuple[int, list[int]] | None:
    """Find the smallest decimal scale k making every value an exact integer/10^k."""
    for v in values:
        # -0.0 would come back as +0.0; huge values would overflow v * factor to inf
        if not math.isfinite(v) or abs(v) > MAX_SCALED or (v == 0 and math.copysign(1.0, v) < 0):
            return None
    for k in range(0, 10):
        factor = 10**k
        ints: list[int] = []
        for v in values:
            scaled = round(v * factor)
            if abs(scaled) > MAX_SCALED or (scaled / factor if k else float(scaled)) != v:
                break
            ints.append(scaled)
        else:
            return k, ints
    return None


def _encode_values(out: io.BytesIO, values: tuple[float, ...]) -> None:
    packed = struct.pack(f"<{len(values)}d", *values)
    if packed == packed[:8] * len(values):  # bit-identical: keeps -0.0 and NaN payloads
        out.write(bytes((ValueMode.CONST,)) + packed[:8])
        return
    scaled = _scaled(values)
    if scaled is not None:
        k, ints = scaled
        out.write(struct.pack("<BBq", ValueMode.SCALED_DELTA, k, ints[0]))
        _pack_ints(out, [b - a for a, b in zip(ints, ints[1:], strict=False)])
        return
    out.write(bytes((ValueMode.FLOAT64,)))
    out.write(packed)


def encode_series(series: list[Series]) -> bytes:
    """Encode series into the uncompressed data payload (columnar, see docs/wire.md)."""
    strings: dict[str, int] = {}

    def intern(s: str) -> int:
        idx = strings.get(s)
        if idx is None:
            idx = strings[s] = len(strings)
        return idx

    columns: dict[tuple[int, ...], int] = {}
    meta = io.BytesIO()
    vals = io.BytesIO()
    for s in series:
        n = len(s.timestamps_ms)
        if n == 0 or n != len(s.values):
            raise WireError("schema", f"series {s.name!r} has {n} timestamps, {len(s.values)} values")
        col = columns.get(s.timestamps_ms)
        if col is None:
            col = columns[s.timestamps_ms] = len(columns)
        meta.write(struct.pack("<IBHI", intern(s.name), s.mtype, len(s.labels), col))
        for k, v in s.labels:
            meta.write(struct.pack("<II", intern(k), intern(v)))
        _encode_values(vals, s.values)

    out = io.BytesIO()
    encoded = [s.encode("utf-8") for s in strings]
    out.write(struct.pack("<I", len(encoded)))
    out.write(struct.pack(f"<{len(encoded)}I", *(len(e) for e in encoded)))
    out.write(b"".join(encoded))
    out.write(struct.pack("<I", len(columns)))
    for ts in columns:
        deltas = [b - a for a, b in zip(ts, ts[1:], strict=False)]
        dods = [b - a for a, b in zip(deltas, deltas[1:], strict=False)]
        if not (_fits_i64(ts) and _fits_i64(deltas) and _fits_i64(dods)):
            raise WireError("schema", "timestamps, their deltas and delta-of-deltas must fit int64")
        out.write(struct.pack("<Iq", len(ts), ts[0]))
        if len(ts) > 1:
            out.write(struct.pack("<q", deltas[0]))
            _pack_ints(out, dods)
    out.write(struct.pack("<I", len(series)))
    out.write(meta.getvalue())
    out.write(vals.getvalue())
    return out.getvalue()


DEFAULT_LIMITS = Limits()


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise WireError("malformed", f"payload truncated at byte {self.pos} (wanted {n} more)")
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size))

    def ints(self, count: int) -> list[int]:
        width = self.take(1)[0]
        code = _ARRAY_CODE.get(width)
        if code is None:
            raise WireError("malformed", f"bad integer width {width}")
        arr = array(code)
        arr.frombytes(self.take(width * count))
        if not _LITTLE:
            arr.byteswap()
        return arr.tolist()


_U32 = struct.Struct("<I")
_COL_HEAD = struct.Struct("<Iq")
_Q = struct.Struct("<q")
_SERIES_HEAD = struct.Struct("<IBHI")
_LABEL = struct.Struct("<II")
_CONST = struct.Struct("<d")
_SCALED_HEAD = struct.Struct("<Bq")



_MTYPES = {int(m): m for m in MetricType}
# i / 10**k as a C-level callable per scale (int.__rtruediv__ is correctly rounded, like i / f).
_DIVIDE_BY_POWER_OF_TEN = [(10**k).__rtruediv__ for k in range(10)]


def _truncated(pos: int, want: int) -> WireError:
    return WireError("malformed", f"payload truncated at byte {pos} (wanted {want} more)")


@dataclass
class _SeriesTable:
    strings: list[str]
    heads_bytes: bytes  # the series count and table exactly as sent
    heads: list[tuple[str, int, tuple[tuple[str, str], ...], int]]  # name, type, labels, column
    max_col: int


class SeriesTableCache:
    """One sender's recently seen series tables, so identities are not rebuilt per batch.

    A node sends the same series set batch after batch: its string table and series table
    bytes repeat exactly, only timestamps and values change. decode_series with a cache
    reuses the decoded names and labels when both byte ranges match a confirmed entry.
    The caller confirms a table (confirm()) only after it validated the series decoded
    from it, and reads `hit` to skip validating them again. Not thread-safe: one per sender."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.hit = False
        self._entries: dict[bytes, _SeriesTable] = {}
        self._pending: tuple[bytes, _SeriesTable] | None = None

    def confirm(self) -> None:
        if self._pending is not None:
            key, table = self._pending
            self._entries.pop(key, None)
            self._entries[key] = table
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]
            self._pending = None


def decode_series(
    raw: bytes, limits: Limits = DEFAULT_LIMITS, cache: SeriesTableCache | None = None
) -> list[Series]:
    """Decode an uncompressed data payload; raises WireError naming what was wrong.

    This is the collector's hot path: per-series work is kept to a few C-level calls
    (unpack_from, array.frombytes, accumulate), never a Python loop per sample, and with a
    cache a repeated series table costs two byte comparisons instead of a decode."""
    buf = bytes(raw)
    r = _Reader(buf)
    (n_strings,) = r.unpack(_U32)
    if n_strings > limits.max_series * (2 * limits.max_labels + 1):
        raise WireError("limit", f"{n_strings} strings in payload")
    lengths = array("I")
    lengths.frombytes(r.take(4 * n_strings))
    if not _LITTLE:
        lengths.byteswap()
    if n_strings and max(lengths) > limits.max_string_len:
        raise WireError("limit", f"string of {max(lengths)} bytes exceeds {limits.max_string_len}")
    blob = bytes(r.take(sum(lengths)))
    table_key = buf[: r.pos]
    known = cache._entries.get(table_key) if cache is not None else None
    if known is not None:
        strings = known.strings
    else:
        try:
            offsets = list(accumulate(lengths, initial=0))
            strings = [blob[a:b].decode("utf-8") for a, b in zip(offsets, offsets[1:], strict=False)]
        except UnicodeDecodeError as exc:
            raise WireError("malformed", "a string in the payload is not UTF-8") from exc

    (n_cols,) = r.unpack(_U32)
    if n_cols > limits.max_series:
        raise WireError("limit", f"{n_cols} timestamp columns")
    cols: list[tuple[int, ...]] = []
    total_points = 0
    for _ in range(n_cols):
        n, first = r.unpack(_COL_HEAD)
        total_points += n
        if n == 0:
            raise WireError("malformed", "empty timestamp column")
        if total_points > limits.max_samples:
            raise WireError("limit", f"timestamp column of {n} points (total {total_points})")
        if n == 1:  # no first delta and no intarray: a one-point column is its u32 and i64
            cols.append((first,))
            continue
        (d0,) = r.unpack(_Q)  # then intarray(n - 2): for n == 2 only its width byte
        deltas = list(accumulate(r.ints(n - 2), initial=d0))
        ts = tuple(accumulate(deltas, initial=first))
        if not (_fits_i64(deltas) and _fits_i64(ts)):
            raise WireError("malformed", "timestamp column leaves the int64 range")
        cols.append(ts)

    table_at = r.pos
    if (
        known is not None
        and known.max_col < n_cols
        and buf[table_at : table_at + len(known.heads_bytes)] == known.heads_bytes
    ):
        heads = known.heads
        pos = table_at + len(known.heads_bytes)
    else:
        known = None
        heads, pos = _decode_heads(buf, r, strings, n_cols, limits)
    if cache is not None:
        cache.hit = known is not None
        cache._pending = None if known is not None else (
            table_key,
            _SeriesTable(strings, buf[table_at:pos], heads, max((h[3] for h in heads), default=-1)),
        )
    return _decode_values(buf, pos, heads, cols, limits)


def _decode_heads(
    buf: bytes, r: _Reader, strings: list[str], n_cols: int, limits: Limits
) -> tuple[list[tuple[str, int, tuple[tuple[str, str], ...], int]], int]:
    size = len(buf)
    (n_series,) = r.unpack(_U32)
    if n_series > limits.max_series:
        raise WireError("limit", f"{n_series} series exceeds {limits.max_series}")
    pos = r.pos
    head_unpack = _SERIES_HEAD.unpack_from
    label_size = _LABEL.size
    iter_labels = _LABEL.iter_unpack
    max_labels = limits.max_labels
    heads: list[tuple[str, int, tuple[tuple[str, str], ...], int]] = []
    try:
        for _ in range(n_series):
            name_i, mtype, n_labels, col = head_unpack(buf, pos)
            pos += 11
            if n_labels > max_labels:
                raise WireError("limit", f"series with {n_labels} labels exceeds {max_labels}")
            stop = pos + label_size * n_labels
            if stop > size:
                raise _truncated(pos, stop - pos)
            labels = tuple([(strings[k], strings[v]) for k, v in iter_labels(buf[pos:stop])])
            pos = stop
            if col >= n_cols:
                raise IndexError
            heads.append((strings[name_i], mtype, labels, col))
    except struct.error as exc:
        raise _truncated(pos, 11) from exc
    except IndexError as exc:
        raise WireError("malformed", "series refers to a missing string or column") from exc
    return heads, pos


def _decode_values(
    buf: bytes,
    pos: int,
    heads: list[tuple[str, int, tuple[tuple[str, str], ...], int]],
    cols: list[tuple[int, ...]],
    limits: Limits,
) -> list[Series]:
    size = len(buf)
    series: list[Series] = []
    append = series.append
    samples = 0
    max_samples = limits.max_samples
    const_unpack = _CONST.unpack_from
    scaled_unpack = _SCALED_HEAD.unpack_from
    mtypes = _MTYPES
    for name, mtype, labels, col in heads:
        ts = cols[col]
        n = len(ts)
        samples += n
        if samples > max_samples:
            raise WireError("limit", f"more than {max_samples} samples")
        mt = mtypes.get(mtype)
        if mt is None:
            raise WireError("malformed", f"unknown metric type {mtype}")
        if pos >= size:
            raise _truncated(pos, 1)
        mode = buf[pos]
        pos += 1
        values: tuple[float, ...]
        try:
            if mode == 0:  # CONST
                values = const_unpack(buf, pos) * n
                pos += 8
            elif mode == 1:  # SCALED_DELTA
                k, first = scaled_unpack(buf, pos)
                pos += 9
                if k > 9:
                    raise WireError("malformed", f"decimal scale {k} out of range")
                # The deltas are an intarray(n - 1): its width byte is there even when n == 1.
                width = buf[pos]
                code = _ARRAY_CODE.get(width)
                if code is None:
                    raise WireError("malformed", f"bad integer width {width}")
                pos += 1
                if n > 1:
                    stop = pos + width * (n - 1)
                    if stop > size:
                        raise _truncated(pos, stop - pos)
                    arr = array(code)
                    arr.frombytes(buf[pos:stop])
                    if not _LITTLE:
                        arr.byteswap()
                    pos = stop
                    ints = list(accumulate(arr, initial=first))
                    # Narrow deltas from a first value well inside the range cannot leave it;
                    # only other cases pay for the scan.
                    if not (width <= 4 and n < 1 << 21 and -(1 << 52) <= first <= 1 << 52) and not (
                        -MAX_SCALED <= min(ints) <= max(ints) <= MAX_SCALED
                    ):
                        raise WireError("malformed", "scaled value outside +-2**53")
                else:
                    ints = [first]
                    if not -MAX_SCALED <= first <= MAX_SCALED:
                        raise WireError("malformed", "scaled value outside +-2**53")
                if k:
                    values = tuple(map(_DIVIDE_BY_POWER_OF_TEN[k], ints))
                else:
                    values = tuple(map(float, ints))
            elif mode == 2:  # FLOAT64
                stop = pos + 8 * n
                if stop > size:
                    raise _truncated(pos, stop - pos)
                arr_d = array("d")
                arr_d.frombytes(buf[pos:stop])
                if not _LITTLE:
                    arr_d.byteswap()
                values = tuple(arr_d)
                pos = stop
            else:
                raise WireError("malformed", f"unknown value mode {mode}")
        except (struct.error, IndexError) as exc:
            raise _truncated(pos, 9) from exc
        append(Series(name, labels, mt, ts, values))
    if pos != size:
        raise WireError("malformed", f"{size - pos} trailing bytes after series")
    return series

