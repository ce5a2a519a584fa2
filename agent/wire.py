"""Wire v1: the signed batch format shared by the agent and the collector.

docs/wire.md is the normative description; this module is its reference
implementation. Everything here is pure: bytes in, bytes or dataclasses out.
"""

from __future__ import annotations

import io
import json
import math
import struct
from array import array
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import accumulate
from typing import Any, NamedTuple

import zstandard
from nacl.bindings import crypto_hash_sha256
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

MAGIC = b"WSB1"
WIRE_VERSION = 1
SIGNATURE_LEN = 64
HASH_LEN = 32
KEY_ID_LEN = 8
ZERO_HASH = bytes(HASH_LEN)

# magic, version, kind, codec, flags, seq, prev_hash, created_wall_ms, created_mono_ns,
# window_start_ms, window_end_ms, series_count, sample_count, raw_len, payload_len, key_id
_FIXED = struct.Struct("<4sBBBBQ32sqQqqIIII8s")
FIXED_HEADER_LEN = _FIXED.size
MAX_NAME_LEN = 255  # site and node names are one length byte each

FLAG_SEALED = 0x01  # reserved: payload sealed to the collector's key (not produced by v1 agents)
KNOWN_FLAGS = FLAG_SEALED


class Kind(IntEnum):
    DATA = 0
    DROP_RECEIPT = 1
    KEY_ROTATION = 2


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1


class MetricType(IntEnum):
    GAUGE = 0
    COUNTER = 1
    UNTYPED = 2
    INFO = 3


class ValueMode(IntEnum):
    CONST = 0
    SCALED_DELTA = 1
    FLOAT64 = 2


class WireError(ValueError):
    """A batch that cannot be accepted; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Series(NamedTuple):
    """One time series in a batch: identity plus its points, oldest first.

    A NamedTuple rather than a frozen dataclass: the collector builds one per series it
    decodes, and tuple construction is several times cheaper."""

    name: str
    labels: tuple[tuple[str, str], ...]
    mtype: MetricType
    timestamps_ms: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Header:
    version: int
    kind: Kind
    codec: Codec
    flags: int
    seq: int
    prev_hash: bytes
    created_wall_ms: int
    created_mono_ns: int
    window_start_ms: int
    window_end_ms: int
    series_count: int
    sample_count: int
    raw_len: int
    payload_len: int
    key_id: bytes
    site: str
    node: str
    header_len: int = 0


@dataclass(frozen=True)
class Frame:
    """A parsed but not yet verified batch: header, still-compressed payload, signature."""

    header: Header
    payload: bytes
    signature: bytes
    signed_part: bytes
    raw: bytes = field(repr=False)

    @property
    def hash(self) -> bytes:
        return batch_hash(self.raw)


@dataclass(frozen=True)
class DropReceipt:
    """The spool evicted these seq ranges before they were delivered."""

    ranges: tuple[tuple[int, int], ...]
    t0_ms: int
    t1_ms: int
    batches: int
    samples: int
    bytes: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "ranges": [list(r) for r in self.ranges],
            "t0_ms": self.t0_ms,
            "t1_ms": self.t1_ms,
            "batches": self.batches,
            "samples": self.samples,
            "bytes": self.bytes,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class KeyRotation:
    """Announces the node's next key; signed by the old key, proven by the new one."""

    new_public_key: bytes
    proof: bytes  # new key's signature over rotation_proof_message(...)


def key_id(public_key: bytes) -> bytes:
    """The 8-byte id of an Ed25519 public key: the head of its SHA-256."""
    return crypto_hash_sha256(public_key)[:KEY_ID_LEN]


def batch_hash(frame: bytes) -> bytes:
    """The chain hash of a batch: SHA-256 over the whole frame, signature included."""
    return crypto_hash_sha256(frame)


def rotation_proof_message(site: str, node: str, old_key_id: bytes, new_public_key: bytes) -> bytes:
    return b"waystation-key-rotation\0" + site.encode() + b"\0" + node.encode() + b"\0" + old_key_id + new_public_key


# ---------------------------------------------------------------- payload: data


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

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
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


@dataclass(frozen=True)
class Limits:
    """Schema and cardinality limits the decoder enforces (collector input is hostile)."""

    max_series: int = 200_000
    max_samples: int = 5_000_000
    max_labels: int = 64
    max_string_len: int = 4096


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
    raw: bytes, limits: Limits = Limits(), cache: SeriesTableCache | None = None
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
        if n == 1:
            cols.append((first,))
            continue
        (d0,) = r.unpack(_Q)
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
                if n > 1:
                    width = buf[pos]
                    code = _ARRAY_CODE.get(width)
                    if code is None:
                        raise WireError("malformed", f"bad integer width {width}")
                    stop = pos + 1 + width * (n - 1)
                    if stop > size:
                        raise _truncated(pos, stop - pos)
                    arr = array(code)
                    arr.frombytes(buf[pos + 1 : stop])
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


# ---------------------------------------------------------------- frame


@dataclass(frozen=True)
class Prepared:
    """A payload ready to be sealed: compressed and counted, not yet placed in a chain."""

    kind: Kind
    codec: Codec
    payload: bytes
    raw_len: int
    window_start_ms: int
    window_end_ms: int
    series_count: int
    sample_count: int


def _seal(
    p: Prepared,
    signing_key: SigningKey,
    site: str,
    node: str,
    seq: int,
    prev_hash: bytes,
    created_wall_ms: int,
    created_mono_ns: int,
) -> bytes:
    if seq < 1:
        raise ValueError("seq starts at 1")
    if len(prev_hash) != HASH_LEN:
        raise ValueError("prev_hash must be 32 bytes")
    site_b = site.encode("utf-8")
    node_b = node.encode("utf-8")
    if not 0 < len(site_b) <= MAX_NAME_LEN or not 0 < len(node_b) <= MAX_NAME_LEN:
        raise ValueError("site and node must be 1..255 bytes of UTF-8")
    head = _FIXED.pack(
        MAGIC,
        WIRE_VERSION,
        p.kind,
        p.codec,
        0,
        seq,
        prev_hash,
        created_wall_ms,
        created_mono_ns,
        p.window_start_ms,
        p.window_end_ms,
        p.series_count,
        p.sample_count,
        p.raw_len,
        len(p.payload),
        key_id(bytes(signing_key.verify_key)),
    )
    signed = b"".join((head, bytes((len(site_b),)), site_b, bytes((len(node_b),)), node_b, p.payload))
    return signed + signing_key.sign(signed).signature


def _build(
    *,
    signing_key: SigningKey,
    kind: Kind,
    raw: bytes,
    site: str,
    node: str,
    seq: int,
    prev_hash: bytes,
    created_wall_ms: int,
    created_mono_ns: int,
    window_start_ms: int,
    window_end_ms: int,
    series_count: int,
    sample_count: int,
    codec: Codec,
    zstd_level: int,
) -> bytes:
    payload = compress(raw, zstd_level) if codec == Codec.ZSTD else raw
    prepared = Prepared(kind, codec, payload, len(raw), window_start_ms, window_end_ms, series_count,
                        sample_count)
    return _seal(prepared, signing_key, site, node, seq, prev_hash, created_wall_ms, created_mono_ns)


# zstd's match-finder tables, as log2 of entries. At level 19 zstd sizes them from the input
# (2^19 each for a 134 KB batch, a minute of every source: 5.9 MB of context, the agent's
# peak RSS at each flush). Capped at 2^17 that batch compresses to the same bytes from a
# 2.8 MB context. Beyond ZSTD_CAP_MAX_INPUT the cap starts to cost bytes (+0.6% at 1.3 MB
# of node_exporter-like series, more on less repetitive data), and uplink bytes win: bigger
# batches keep zstd's own tables.
ZSTD_TABLE_LOG_MAX = 17
ZSTD_CAP_MAX_INPUT = 256 * 1024


def zstd_parameters(level: int, size: int) -> zstandard.ZstdCompressionParameters:
    """The compression parameters for `size` input bytes at `level`, tables capped if small."""
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=size, write_content_size=True)
    if size > ZSTD_CAP_MAX_INPUT:
        return params
    return zstandard.ZstdCompressionParameters.from_level(
        level, source_size=size, write_content_size=True,
        hash_log=min(params.hash_log, ZSTD_TABLE_LOG_MAX), chain_log=min(params.chain_log, ZSTD_TABLE_LOG_MAX))


def compress(raw: bytes, level: int) -> bytes:
    """One zstd frame, with its content size."""
    return zstandard.ZstdCompressor(compression_params=zstd_parameters(level, len(raw))).compress(raw)


def prepare_data(series: list[Series], zstd_level: int = 19, empty_window_ms: int = 0) -> Prepared:
    """Encode and compress series; the costly half of sealing, done outside any lock."""
    raw = encode_series(series)
    return Prepared(
        Kind.DATA,
        Codec.ZSTD,
        compress(raw, zstd_level),
        len(raw),
        min((s.timestamps_ms[0] for s in series), default=empty_window_ms),
        max((s.timestamps_ms[-1] for s in series), default=empty_window_ms),
        len(series),
        sum(len(s.timestamps_ms) for s in series),
    )


def seal(p: Prepared, ctx: BatchContext) -> bytes:
    """Place a prepared payload at ctx.seq in the chain and sign it."""
    return _seal(p, ctx.signing_key, ctx.site, ctx.node, ctx.seq, ctx.prev_hash, ctx.created_wall_ms,
                 ctx.created_mono_ns)


def reseal(frame: Frame, ctx: BatchContext) -> bytes:
    """The same payload and times at a new place in the chain (an agent resuming after its
    spool was lost renumbers what it had not sent yet above what the collector already holds)."""
    h = frame.header
    p = Prepared(h.kind, h.codec, frame.payload, h.raw_len, h.window_start_ms, h.window_end_ms,
                 h.series_count, h.sample_count)
    return _seal(p, ctx.signing_key, ctx.site, ctx.node, ctx.seq, ctx.prev_hash, h.created_wall_ms,
                 h.created_mono_ns)


@dataclass(frozen=True)
class BatchContext:
    """Who seals the next batch and where it sits in the chain."""

    signing_key: SigningKey
    site: str
    node: str
    seq: int
    prev_hash: bytes
    created_wall_ms: int
    created_mono_ns: int
    zstd_level: int = 19


def encode_data_batch(ctx: BatchContext, series: list[Series]) -> bytes:
    return seal(prepare_data(series, ctx.zstd_level, ctx.created_wall_ms), ctx)


def encode_drop_receipt(ctx: BatchContext, receipt: DropReceipt) -> bytes:
    raw = json.dumps(receipt.to_json(), sort_keys=True, separators=(",", ":")).encode()
    return _build(
        signing_key=ctx.signing_key,
        kind=Kind.DROP_RECEIPT,
        raw=raw,
        site=ctx.site,
        node=ctx.node,
        seq=ctx.seq,
        prev_hash=ctx.prev_hash,
        created_wall_ms=ctx.created_wall_ms,
        created_mono_ns=ctx.created_mono_ns,
        window_start_ms=receipt.t0_ms,
        window_end_ms=receipt.t1_ms,
        series_count=0,
        sample_count=0,
        codec=Codec.NONE,
        zstd_level=0,
    )


def encode_key_rotation(ctx: BatchContext, new_key: SigningKey) -> bytes:
    new_pub = bytes(new_key.verify_key)
    old_id = key_id(bytes(ctx.signing_key.verify_key))
    proof = new_key.sign(rotation_proof_message(ctx.site, ctx.node, old_id, new_pub)).signature
    raw = json.dumps({"new_public_key": new_pub.hex(), "proof": proof.hex()}, sort_keys=True).encode()
    return _build(
        signing_key=ctx.signing_key,
        kind=Kind.KEY_ROTATION,
        raw=raw,
        site=ctx.site,
        node=ctx.node,
        seq=ctx.seq,
        prev_hash=ctx.prev_hash,
        created_wall_ms=ctx.created_wall_ms,
        created_mono_ns=ctx.created_mono_ns,
        window_start_ms=ctx.created_wall_ms,
        window_end_ms=ctx.created_wall_ms,
        series_count=0,
        sample_count=0,
        codec=Codec.NONE,
        zstd_level=0,
    )


def parse_frame(raw: bytes) -> Frame:
    """Split a batch into header, payload and signature; checks structure only."""
    if len(raw) < FIXED_HEADER_LEN + 2 + SIGNATURE_LEN:
        raise WireError("malformed", f"batch of {len(raw)} bytes is shorter than any valid batch")
    fields = _FIXED.unpack_from(raw, 0)
    magic, version, kind, codec, flags, seq = fields[:6]
    if magic != MAGIC:
        raise WireError("malformed", "bad magic (not a Waystation batch)")
    if version != WIRE_VERSION:
        raise WireError("unsupported_version", f"wire version {version}, this side speaks {WIRE_VERSION}")
    pos = FIXED_HEADER_LEN
    site_len = raw[pos]
    site_b = raw[pos + 1 : pos + 1 + site_len]
    pos += 1 + site_len
    if pos >= len(raw):
        raise WireError("malformed", "header truncated in site name")
    node_len = raw[pos]
    node_b = raw[pos + 1 : pos + 1 + node_len]
    pos += 1 + node_len
    payload_len = fields[14]
    if pos + payload_len + SIGNATURE_LEN != len(raw):
        raise WireError(
            "malformed",
            f"length mismatch: header says {payload_len}-byte payload, batch has "
            f"{len(raw) - pos - SIGNATURE_LEN}",
        )
    try:
        site = site_b.decode("utf-8")
        node = node_b.decode("utf-8")
        kind_e = Kind(kind)
        codec_e = Codec(codec)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError("malformed", f"bad header field: {exc}") from exc
    if not site or not node:
        raise WireError("malformed", "empty site or node")
    if flags & ~KNOWN_FLAGS:
        raise WireError("malformed", f"unknown flags 0x{flags:02x}")
    if flags & FLAG_SEALED:
        raise WireError("unsupported", "sealed payloads are not supported by this collector")
    if seq < 1:
        raise WireError("malformed", "seq 0 is never used")
    header = Header(
        version,
        kind_e,
        codec_e,
        flags,
        seq,
        fields[6],
        fields[7],
        fields[8],
        fields[9],
        fields[10],
        fields[11],
        fields[12],
        fields[13],
        payload_len,
        fields[15],
        site,
        node,
        pos,
    )
    sig_at = len(raw) - SIGNATURE_LEN
    return Frame(header, raw[pos:sig_at], raw[sig_at:], raw[:sig_at], raw)


def verify_signature(frame: Frame, public_key: bytes) -> None:
    try:
        VerifyKey(public_key).verify(frame.signed_part, frame.signature)
    except BadSignatureError as exc:
        raise WireError("bad_signature", "signature does not verify with the node's key") from exc


def decompress_payload(frame: Frame, max_raw_bytes: int) -> bytes:
    """Return the raw payload, never producing more than max_raw_bytes (zstd bombs cost nothing)."""
    h = frame.header
    if h.raw_len > max_raw_bytes:
        raise WireError("too_large", f"declared payload of {h.raw_len} bytes exceeds {max_raw_bytes}")
    if h.codec == Codec.NONE:
        if h.raw_len != len(frame.payload):
            raise WireError("malformed", "uncompressed payload length differs from header")
        return frame.payload
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame.payload, read_across_frames=False)
        out = reader.read(h.raw_len + 1)
    except zstandard.ZstdError as exc:
        raise WireError("malformed", f"payload is not valid zstd: {exc}") from exc
    if len(out) != h.raw_len:
        raise WireError("malformed", f"payload decompresses to {len(out)}+ bytes, header says {h.raw_len}")
    # The frame is now known to yield exactly raw_len bytes, so a second pass is bounded; it
    # checks that the payload is one complete zstd frame with nothing after it.
    whole = zstandard.ZstdDecompressor().decompressobj()
    try:
        whole.decompress(frame.payload)
    except zstandard.ZstdError as exc:
        raise WireError("malformed", f"payload is not valid zstd: {exc}") from exc
    if not whole.eof or whole.unused_data:
        raise WireError("malformed", "payload is not exactly one complete zstd frame")
    return out


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting depth
        raise WireError("malformed", f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{what} is not a JSON object")
    return obj


def _json_int(value: object, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise TypeError(f"{value!r} is not an integer in [{lo}, {hi}]")
    return value


_U64_MAX = (1 << 64) - 1


def decode_drop_receipt(raw: bytes) -> DropReceipt:
    obj = _json_object(raw, "drop receipt")
    try:
        if not isinstance(obj["ranges"], list) or len(obj["ranges"]) > 100_000:
            raise TypeError("ranges must be a list of at most 100000 [a, b] pairs")
        ranges: list[tuple[int, int]] = []
        for pair in obj["ranges"]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise TypeError(f"range {pair!r} is not [a, b]")
            ranges.append((_json_int(pair[0], 1, _U64_MAX), _json_int(pair[1], 1, _U64_MAX)))
        if not isinstance(obj["reason"], str):
            raise TypeError("reason must be a string")
        receipt = DropReceipt(
            tuple(ranges),
            _json_int(obj["t0_ms"], I64_MIN, I64_MAX),
            _json_int(obj["t1_ms"], I64_MIN, I64_MAX),
            _json_int(obj["batches"], 0, I64_MAX),
            _json_int(obj["samples"], 0, I64_MAX),
            _json_int(obj["bytes"], 0, I64_MAX),
            obj["reason"],
        )
    except (KeyError, TypeError) as exc:
        raise WireError("malformed", f"drop receipt is not valid: {exc}") from exc
    if any(b < a for a, b in ranges):
        raise WireError("malformed", "drop receipt has an invalid seq range")
    return receipt


def decode_key_rotation(frame: Frame, raw: bytes) -> KeyRotation:
    obj = _json_object(raw, "key rotation")
    try:
        new_pub = bytes.fromhex(obj["new_public_key"])
        proof = bytes.fromhex(obj["proof"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError("malformed", f"key rotation is not valid: {exc}") from exc
    if len(new_pub) != 32 or len(proof) != SIGNATURE_LEN:
        raise WireError("malformed", "new public key must be 32 bytes and proof 64 bytes")
    h = frame.header
    try:
        VerifyKey(new_pub).verify(rotation_proof_message(h.site, h.node, h.key_id, new_pub), proof)
    except BadSignatureError as exc:
        raise WireError("bad_signature", "new key's proof of possession does not verify") from exc
    return KeyRotation(new_pub, proof)


def check_counts(frame: Frame, series: list[Series]) -> None:
    h = frame.header
    samples = sum(len(s.timestamps_ms) for s in series)
    if h.series_count != len(series) or h.sample_count != samples:
        raise WireError(
            "schema",
            f"header counts {h.series_count} series/{h.sample_count} samples, "
            f"payload has {len(series)}/{samples}",
        )
