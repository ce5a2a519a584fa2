"""The v2 data payload decoder (docs/wire.md §10.4, §10.5), with numpy: array operations per batch,
no Python step per series or per sample.

Imported only by readers (wire.open_batch loads it when it meets a v2 data batch), so the
agent, which only encodes, never loads numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from wire.columns import _HEAD, COLUMNS_HEAD_LEN, MAX_SCALE, SCALE_FLOAT64
from wire.model import Limits, Series, WireError
from wire.payload import MAX_SCALED
from wire.table import SeriesTable

_U32 = np.dtype("<u4")
_U64 = np.dtype("<u8")
_POW10 = np.array([10.0**k for k in range(MAX_SCALE + 1)], dtype=np.float64)

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(eq=False)
class Columns:
    """A decoded v2 data batch: table indices of its series, each series' first point in
    the point arrays (`starts`, with the total appended), and every point's time and value.
    `column` (each series' timestamp column) and `column_starts` (each column's first point
    in `column_timestamps`, with the total appended) keep the columns as sent, so series
    that share one share its timestamps."""

    table: SeriesTable
    index: I64
    starts: I64
    timestamps_ms: I64
    values: F64
    column: I64 | None = None
    column_starts: I64 | None = None
    column_timestamps: I64 | None = None

    @property
    def series_count(self) -> int:
        return int(self.index.size)

    @property
    def sample_count(self) -> int:
        return int(self.values.size)

    def to_series(self) -> list[Series]:
        """The batch as wire.Series, one per series (for readers that take series one by one).
        Series of one column share one timestamp tuple, as wire.decode_series gives them."""
        names, labels, mtypes = self.table.names, self.table.labels, self.table.mtypes
        vs = self.values.tolist()
        bounds = self.starts.tolist()
        index = self.index.tolist()
        out: list[Series] = []
        append = out.append
        if self.column is not None and self.column_starts is not None and self.column_timestamps is not None:
            cts = self.column_timestamps.tolist()
            cb = self.column_starts.tolist()
            cols = [tuple(cts[a:b]) for a, b in zip(cb, cb[1:], strict=False)]
            for i, col, a, b in zip(index, self.column.tolist(), bounds, bounds[1:], strict=False):
                append(Series(names[i], labels[i], mtypes[i], cols[col], tuple(vs[a:b])))
            return out
        ts = self.timestamps_ms.tolist()
        for i, a, b in zip(index, bounds, bounds[1:], strict=False):
            append(Series(names[i], labels[i], mtypes[i], tuple(ts[a:b]), tuple(vs[a:b])))
        return out


def _unplane(buf: bytes, at: int, count: int) -> npt.NDArray[np.uint64]:
    """`count` 64-bit words stored as 8 byte planes at `at` (the caller checked that the
    8 * count bytes are there)."""
    planes = np.frombuffer(buf, dtype=np.uint8, count=8 * count, offset=at).reshape(8, count)
    return np.ascontiguousarray(planes.T).view(_U64).reshape(count).astype(np.uint64, copy=False)


def _segment_sums(words: npt.NDArray[np.uint64], starts: I64, counts: I64) -> npt.NDArray[np.uint64]:
    """Running sums (mod 2^64) within each segment: every segment starts from 0. Segments
    are back to back, each of at least one word."""
    with np.errstate(over="ignore"):
        total = np.cumsum(words, dtype=np.uint64)
        base = total[starts] - words[starts]
        out: npt.NDArray[np.uint64] = total - np.repeat(base, counts)
        return out


def _segment_xors(words: npt.NDArray[np.uint64], starts: I64, counts: I64) -> npt.NDArray[np.uint64]:
    """Running XORs within each segment, as _segment_sums."""
    total: npt.NDArray[np.uint64] = np.bitwise_xor.accumulate(words)
    base = np.bitwise_xor(total[starts], words[starts])
    out: npt.NDArray[np.uint64] = np.bitwise_xor(total, np.repeat(base, counts))
    return out


def decode_columns(raw: bytes, table: SeriesTable, limits: Limits) -> Columns:
    """Decode a v2 data payload against its table; raises WireError naming what was wrong,
    and nothing else: every count is checked against the limits and the payload's exact
    size before an array is made from it."""
    try:
        return _decode(raw, table, limits)
    except WireError:
        raise
    except (ValueError, IndexError, TypeError, OverflowError) as exc:  # a bound missed: refuse, never crash
        raise WireError("malformed", f"v2 data payload does not decode: {exc}") from exc


def _decode(raw: bytes, table: SeriesTable, limits: Limits) -> Columns:
    size = len(raw)
    if size < COLUMNS_HEAD_LEN:
        raise WireError("malformed", f"v2 data payload of {size} bytes is shorter than its "
                                     f"{COLUMNS_HEAD_LEN}-byte head")
    tid, table_series, m, c, pc, p = _HEAD.unpack_from(raw, 0)
    if tid != table.id:
        raise WireError("malformed", "the payload names another series table than the one given")
    if table_series != len(table):
        raise WireError("malformed", f"the payload expects a table of {table_series} series, "
                                     f"table {tid.hex()[:16]} has {len(table)}")
    if m > limits.max_series:
        raise WireError("limit", f"{m} series exceeds {limits.max_series}")
    if c > limits.max_series:
        raise WireError("limit", f"{c} timestamp columns exceeds {limits.max_series}")
    if p > limits.max_samples or pc > limits.max_samples:
        raise WireError("limit", f"{max(p, pc)} points exceeds {limits.max_samples}")
    want = COLUMNS_HEAD_LEN + 9 * m + 4 * c + 8 * pc + 8 * p
    if size != want:
        raise WireError("malformed", f"v2 data payload of {size} bytes; its counts ({m} series, {c} columns, "
                                     f"{pc} column points, {p} points) make {want}")
    at = COLUMNS_HEAD_LEN
    gaps = np.frombuffer(raw, _U32, m, at).astype(np.int64)
    at += 4 * m
    series_col = np.frombuffer(raw, _U32, m, at).astype(np.int64)
    at += 4 * m
    lens = np.frombuffer(raw, _U32, c, at).astype(np.int64)
    at += 4 * c
    scales = np.frombuffer(raw, np.uint8, m, at)
    at += m
    # Every sum below is of at most 2 * 10^5 u32 values: far inside int64.
    if m and int(gaps.min()) < 1:
        raise WireError("malformed", "series indices must increase (a gap of 0)")
    index = np.cumsum(gaps) - 1
    if m and int(index[-1]) >= table_series:
        raise WireError("malformed", f"series index {int(index[-1])} outside the table's {table_series}")
    if c and int(lens.min()) < 1:
        raise WireError("malformed", "empty timestamp column")
    if int(lens.sum()) != pc:
        raise WireError("malformed", f"timestamp columns hold {int(lens.sum())} points, the head says {pc}")
    if m and int(series_col.max()) >= c:
        raise WireError("malformed", "series refers to a missing timestamp column")
    bad_scale = (scales > MAX_SCALE) & (scales != SCALE_FLOAT64)
    if bad_scale.any():
        raise WireError("malformed", f"value scale {int(scales[bad_scale][0])} (0..{MAX_SCALE} or {SCALE_FLOAT64})")
    counts = lens[series_col]
    if int(counts.sum()) != p:
        raise WireError("malformed", f"series hold {int(counts.sum())} points, the head says {p}")

    # From here every size is known to fit the payload and the limits.
    col_starts = np.cumsum(lens) - lens
    col_ts = _segment_sums(_unplane(raw, at, pc), col_starts, lens).view(np.int64)
    at += 8 * pc
    starts = np.zeros(m + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    col_bounds = np.zeros(c + 1, np.int64)
    np.cumsum(lens, out=col_bounds[1:])
    if not m:
        return Columns(table, index, starts, np.zeros(0, np.int64), np.zeros(0, np.float64), series_col, col_bounds,
                       col_ts)
    # Point j of series i is point j of its column.
    timestamps = col_ts[np.repeat(col_starts[series_col] - starts[:-1], counts) + np.arange(p, dtype=np.int64)]
    words = _unplane(raw, at, p)
    bits = np.empty(p, np.uint64)  # the values' f64 bits: written whole, never through a float copy
    is_float = scales == SCALE_FLOAT64
    point_float = np.repeat(is_float, counts)
    if not is_float.all():
        scaled = ~is_float
        point_scaled = ~point_float
        n = counts[scaled]
        ints = _segment_sums(words[point_scaled], np.cumsum(n) - n, n).view(np.int64)
        if bool(((ints < -MAX_SCALED) | (ints > MAX_SCALED)).any()):
            raise WireError("malformed", "scaled value outside +-2**53")
        divisors = np.repeat(_POW10[scales[scaled]], n)
        bits[point_scaled] = (ints.astype(np.float64) / divisors).view(np.uint64)
    if is_float.any():
        n = counts[is_float]
        bits[point_float] = _segment_xors(words[point_float], np.cumsum(n) - n, n)
    return Columns(table, index, starts, timestamps, bits.view(np.float64), series_col, col_bounds, col_ts)
