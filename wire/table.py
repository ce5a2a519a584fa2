"""Series tables (wire v2, docs/wire.md §10): a node's series identities, sent once, named by hash.

A v2 data batch carries no names or labels: it names a **table** by the SHA-256 of the
table's bytes as carried (its *table id*) and refers to series by their index in it. The
table travels beside the frames that name it (in the same request, or as a bundle record)
and is not signed itself: the signed frame names its hash, so exactly one table opens it.

The agent keeps one current table (TableBuilder): new series are appended, so the indices
of older series never change while the table grows; a table whose series mostly went quiet
is started afresh. Each new table costs one upload; the collector stores every table it
was given with the batch that brought it, durably, so later batches are columns only.

Pure: bytes in, dataclasses out. Tables are hostile input like frames: every length is
checked against the limits before anything is allocated for it.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate, pairwise

from nacl.bindings import crypto_hash_sha256

from wire import compression
from wire.keys import CollectorKey
from wire.model import Limits, MetricType, Series, WireError
from wire.schema import schema_problem
from wire.sealing import SealingKeys, seal, unseal

TABLE_MAGIC = b"WSTB"
TABLE_VERSION = 1
TABLE_ID_LEN = 32
TABLE_CODEC_NONE = 0
TABLE_CODEC_ZSTD = 1
TABLE_FLAG_SEALED = 0x01
# magic, version, codec, flags, reserved (0), series_count, raw_len, payload_len
_HEAD = struct.Struct("<4sBBBBIII")
TABLE_HEAD_LEN = _HEAD.size  # 20
_STRINGS = struct.Struct("<I")
_SERIES = struct.Struct("<IBH")  # name string index, metric type, label count
_LABEL = struct.Struct("<II")
_MTYPES = {int(m): m for m in MetricType}
_LITTLE = struct.pack("=H", 1) == struct.pack("<H", 1)

Identity = tuple[str, tuple[tuple[str, str], ...], MetricType]


def table_id(blob: bytes) -> bytes:
    """A table's id: SHA-256 over its bytes exactly as carried (head and payload)."""
    return crypto_hash_sha256(bytes(blob))


@dataclass(frozen=True)
class TableHead:
    version: int
    codec: int
    flags: int
    series_count: int
    raw_len: int
    payload_len: int

    @property
    def length(self) -> int:
        return TABLE_HEAD_LEN + self.payload_len


def parse_table_head(buf: bytes | memoryview, at: int = 0) -> TableHead:
    """The fixed head of a table at `at` (its length tells where it ends); WireError if it
    is not one."""
    if len(buf) - at < TABLE_HEAD_LEN:
        raise WireError("malformed", f"series table of {len(buf) - at} bytes is shorter than its "
                                     f"{TABLE_HEAD_LEN}-byte head")
    magic, version, codec, flags, reserved, count, raw_len, payload_len = _HEAD.unpack_from(buf, at)
    if magic != TABLE_MAGIC:
        raise WireError("malformed", "bad series table magic")
    if version != TABLE_VERSION:
        raise WireError("unsupported_version", f"series table version {version}, this side reads {TABLE_VERSION}")
    if codec not in (TABLE_CODEC_NONE, TABLE_CODEC_ZSTD):
        raise WireError("malformed", f"series table codec {codec}")
    if flags & ~TABLE_FLAG_SEALED or reserved:
        raise WireError("malformed", f"series table flags 0x{flags:02x}, reserved byte {reserved}")
    return TableHead(version, codec, flags, count, raw_len, payload_len)


@dataclass(eq=False)
class SeriesTable:
    """A decoded table: each series' name, labels and type by index, checked against the
    schema once. `durable` is the collector's bookkeeping: set once its ledger holds the blob."""

    id: bytes
    blob: bytes = field(repr=False)
    names: list[str]
    labels: list[tuple[tuple[str, str], ...]]
    mtypes: list[MetricType]
    durable: bool = False

    def __len__(self) -> int:
        return len(self.names)

    def identity(self, i: int) -> Identity:
        return self.names[i], self.labels[i], self.mtypes[i]


def encode_table_raw(identities: Iterable[Identity]) -> bytes:
    """The uncompressed table: a string table, then each series' name, type and labels."""
    strings: dict[str, int] = {}

    def intern(s: str) -> int:
        idx = strings.get(s)
        if idx is None:
            idx = strings[s] = len(strings)
        return idx

    body = bytearray()
    count = 0
    for name, labels, mtype in identities:
        body += _SERIES.pack(intern(name), int(mtype), len(labels))
        for k, v in labels:
            body += _LABEL.pack(intern(k), intern(v))
        count += 1
    encoded = [s.encode("utf-8") for s in strings]
    head = struct.pack(f"<I{len(encoded)}I", len(encoded), *(len(e) for e in encoded))
    return b"".join((head, *encoded, struct.pack("<I", count), bytes(body)))


def encode_table(
    identities: list[Identity],
    zstd_level: int = 19,
    seal_to: CollectorKey | None = None,
    codec: int = TABLE_CODEC_ZSTD,
) -> bytes:
    """The table's bytes as carried (and hashed): head, then the raw table compressed with
    `codec` (ZSTD by default; NONE carries it as it is, as docs/wire.md §10.8's example
    does) and, with `seal_to`, encrypted to the collector's key (TABLE_FLAG_SEALED)."""
    raw = encode_table_raw(identities)
    if codec == TABLE_CODEC_ZSTD:
        payload = compression.compress(raw, zstd_level)
    elif codec == TABLE_CODEC_NONE:
        payload = raw
    else:
        raise ValueError(f"series table codec {codec} is not {TABLE_CODEC_NONE} or {TABLE_CODEC_ZSTD}")
    flags = 0
    if seal_to is not None:
        payload = seal(payload, seal_to)
        flags = TABLE_FLAG_SEALED
    return _HEAD.pack(TABLE_MAGIC, TABLE_VERSION, codec, flags, 0, len(identities), len(raw),
                      len(payload)) + payload


def open_table(
    blob: bytes, limits: Limits, max_raw_bytes: int, sealing_keys: SealingKeys | None = None
) -> SeriesTable:
    """Decode and check a table's bytes (exactly one table, nothing after it). Raises
    WireError: malformed, unsupported_version, limit, too_large, schema, and the sealing
    results for a sealed table."""
    blob = bytes(blob)
    head = parse_table_head(blob)
    if head.length != len(blob):
        raise WireError("malformed", f"series table says {head.length} bytes, carries {len(blob)}")
    if head.series_count > limits.max_series:
        raise WireError("limit", f"series table of {head.series_count} series exceeds {limits.max_series}")
    if head.raw_len > max_raw_bytes:
        raise WireError("too_large", f"series table of {head.raw_len} bytes exceeds {max_raw_bytes}")
    payload = blob[TABLE_HEAD_LEN:]
    if head.flags & TABLE_FLAG_SEALED:
        payload = unseal(payload, sealing_keys)
    if head.codec == TABLE_CODEC_ZSTD:
        raw = compression.decompress(payload, head.raw_len, max_raw_bytes)
    elif len(payload) != head.raw_len:
        raise WireError("malformed", "uncompressed series table length differs from its head")
    else:
        raw = payload
    names, labels, mtypes = _decode_raw(raw, head.series_count, limits)
    table = SeriesTable(table_id(blob), blob, names, labels, mtypes)
    problem = schema_problem([Series(n, lb, m, (), ()) for n, lb, m in zip(names, labels, mtypes, strict=True)])
    if problem:
        raise WireError("schema", f"series table: {problem}")
    return table


def _decode_raw(
    raw: bytes, declared: int, limits: Limits
) -> tuple[list[str], list[tuple[tuple[str, str], ...]], list[MetricType]]:
    """The raw table (docs/wire.md §10.2) of `declared` series (its head's count, already
    within limits.max_series). Every count is bounded before anything is built for it."""
    size = len(raw)
    if size < 4:
        raise WireError("malformed", "series table truncated in its string count")
    (n_strings,) = _STRINGS.unpack_from(raw, 0)
    # Each series names at most 1 + 2 * max_labels distinct strings.
    if n_strings > declared * (2 * limits.max_labels + 1):
        raise WireError("limit", f"{n_strings} strings in a series table of {declared} series")
    pos = 4 + 4 * n_strings
    if pos > size:
        raise WireError("malformed", "series table truncated in its string lengths")
    lengths = array("I")
    if lengths.itemsize != 4:
        raise WireError("platform", "unsupported integer width")
    lengths.frombytes(raw[4:pos])
    if not _LITTLE:
        lengths.byteswap()
    if n_strings and max(lengths) > limits.max_string_len:
        raise WireError("limit", f"string of {max(lengths)} bytes exceeds {limits.max_string_len}")
    end = pos + sum(lengths)
    if end + 4 > size:
        raise WireError("malformed", "series table truncated in its strings")
    try:
        strings = [raw[a:b].decode("utf-8") for a, b in pairwise(accumulate(lengths, initial=pos))]
    except UnicodeDecodeError as exc:
        raise WireError("malformed", "a string in the series table is not UTF-8") from exc
    pos = end
    (count,) = _STRINGS.unpack_from(raw, pos)
    pos += 4
    if count != declared:
        raise WireError("malformed", f"series table head says {declared} series, its body {count}")
    names: list[str] = []
    all_labels: list[tuple[tuple[str, str], ...]] = []
    mtypes: list[MetricType] = []
    max_labels = limits.max_labels
    # A label pair repeats across a table's series (job, device, gpu): each distinct pair is
    # one tuple, shared, which the collector keeps as long as the table's series live.
    pairs: dict[tuple[int, int], tuple[str, str]] = {}
    try:
        for _ in range(count):
            name_i, mtype, n_labels = _SERIES.unpack_from(raw, pos)
            pos += _SERIES.size
            if n_labels > max_labels:
                raise WireError("limit", f"series with {n_labels} labels exceeds {max_labels}")
            stop = pos + _LABEL.size * n_labels
            if stop > size:
                raise WireError("malformed", f"series table truncated at byte {pos}")
            labels = []
            for kv in _LABEL.iter_unpack(raw[pos:stop]):
                pair = pairs.get(kv)
                if pair is None:
                    pair = pairs[kv] = (strings[kv[0]], strings[kv[1]])
                labels.append(pair)
            all_labels.append(tuple(labels))
            pos = stop
            names.append(strings[name_i])
            mt = _MTYPES.get(mtype)
            if mt is None:
                raise WireError("malformed", f"unknown metric type {mtype}")
            mtypes.append(mt)
    except struct.error as exc:
        raise WireError("malformed", f"series table truncated at byte {pos}") from exc
    except IndexError as exc:
        raise WireError("malformed", "series table refers to a missing string") from exc
    if pos != size:
        raise WireError("malformed", f"{size - pos} trailing bytes after the series table")
    return names, all_labels, mtypes


DEFAULT_TABLE_LIMITS = Limits()


def series_problem(s: Series, limits: Limits = DEFAULT_TABLE_LIMITS) -> str | None:
    """Why a receiver with `limits` (the collector's defaults) would refuse a table holding
    this series' identity: the schema rules, its label count, a name or label too long."""
    if len(s.labels) > limits.max_labels:
        return f"series {s.name[:100]!r} has {len(s.labels)} labels (at most {limits.max_labels})"
    longest = max((len(t.encode("utf-8", "surrogatepass")) for kv in s.labels for t in kv), default=0)
    if max(longest, len(s.name.encode("utf-8", "surrogatepass"))) > limits.max_string_len:
        return f"series {s.name[:100]!r} has a name or label over {limits.max_string_len} bytes"
    return schema_problem([s])


@dataclass(frozen=True)
class CurrentTable:
    """The agent's table as carried: its id, bytes and series count."""

    id: bytes
    blob: bytes
    series_count: int


class TableBuilder:
    """The agent's current series table. `place` maps a batch's series to table indices,
    appending series the table lacks (so earlier indices stay valid and earlier batches keep
    their table). When series must be appended and the table would then hold more than
    `max_series`, or more than 64 series and more than twice the series the batch uses (its
    series mostly went quiet), it is started afresh from the batch's own series instead. A
    batch whose series are all in the table keeps it, however few it uses. A new collector
    key (`seal_to`) makes a new table of the same series (a new id). Not thread-safe: one
    producer (the flush) uses it."""

    def __init__(self, zstd_level: int = 19, max_series: int = 200_000) -> None:
        self.zstd_level = zstd_level
        self.max_series = max_series
        self._identities: list[Identity] = []
        self._index: dict[tuple[Identity, int], int] = {}
        self._current: CurrentTable | None = None
        self._sealed_to: bytes | None = None

    def place(
        self, series: list[Series], seal_to: CollectorKey | None = None
    ) -> tuple[CurrentTable, list[tuple[int, Series]]]:
        """(the table, [(index, series)] in index order) for one batch. A series a receiver
        would refuse (series_problem) raises WireError before it can enter the table: once
        in, it would get every later batch naming the table refused, with or without it."""
        keys = self._keys(series)
        missing = [k for k in keys if k not in self._index]
        for (name, labels, mtype), _n in missing:
            problem = series_problem(Series(name, labels, mtype, (), ()))
            if problem:
                raise WireError("schema", problem)
        sealed_key = seal_to.key_id if seal_to is not None else None
        used = len(keys)
        grown = len(self._identities) + len(missing)
        identities, index = self._identities, self._index
        # Only a table that must change anyway is started afresh: a batch that uses a few
        # series of a big table (a fast source's flush between full ones) keeps it.
        if missing and (grown > self.max_series or (grown > 64 and grown > 2 * used)):
            identities, index, missing = [], {}, keys
        if missing or self._current is None or sealed_key != self._sealed_to:
            before = len(identities)
            try:
                for key in missing:
                    index[key] = len(identities)
                    identities.append(key[0])
                blob = encode_table(identities, self.zstd_level, seal_to)
            except BaseException:  # a series that cannot be encoded leaves the table as it was
                del identities[before:]
                for key in missing:
                    index.pop(key, None)
                raise
            self._identities, self._index = identities, index
            self._current = CurrentTable(table_id(blob), blob, len(identities))
            self._sealed_to = sealed_key
        index = self._index
        placed = sorted(((index[k], s) for k, s in zip(keys, series, strict=True)), key=lambda p: p[0])
        return self._current, placed

    @staticmethod
    def _keys(series: list[Series]) -> list[tuple[Identity, int]]:
        """Each series' identity with its occurrence number: the format lets a batch carry
        one identity twice, and each occurrence needs an index of its own."""
        seen: dict[Identity, int] = {}
        keys: list[tuple[Identity, int]] = []
        for s in series:
            ident = (s.name, s.labels, MetricType(s.mtype))
            n = seen.get(ident, 0)
            seen[ident] = n + 1
            keys.append((ident, n))
        return keys


def with_table(table: bytes | None, frame: bytes) -> bytes:
    """A request body (docs/wire.md §10.6): the frame, preceded by the series table it names
    when the receiver may not hold it."""
    return frame if table is None else table + frame


def split_body(body: bytes) -> tuple[bytes | None, bytes]:
    """(table sent with the frame or None, frame) from a request body or bundle item; a body
    that starts with a table's magic must hold a whole table, then the frame."""
    if body[:4] != TABLE_MAGIC:
        return None, body
    head = parse_table_head(body)
    if head.length >= len(body):
        raise WireError("malformed", f"a series table of {head.length} bytes and no frame after it "
                                     f"(body of {len(body)} bytes)")
    return body[: head.length], body[head.length :]
