"""open_batch(): the one path by which any reader turns a frame's bytes into a verified batch.

HTTP ingest, the collector's start-up rebuild and the remote-write forwarder call it (the
air-gap import and the audit will), so a batch is verified the same way whichever path it
took. It is pure and blocking: callers on an event loop run it in a worker thread.

Order matters, because collector input is hostile: nothing is decrypted, decompressed or
decoded before the key is known and the signature verifies, and decompression is bounded
before it starts (a zstd bomb costs nothing). A sealed payload is decrypted after the
signature check and the declared-size check, with the collector's sealing keys, which
every reader passes (`sealing_keys`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from wire import control
from wire.columns import columns_table_id
from wire.control import DropReceipt, KeyRotation, decode_drop_receipt, decode_key_rotation
from wire.frame import (
    FLAG_SEALED,
    WIRE_VERSION_2,
    Frame,
    Header,
    Kind,
    check_counts,
    check_raw_len,
    decompress_payload,
    parse_frame,
    verify_signature,
)
from wire.model import Limits, Series, WireError
from wire.payload import DEFAULT_LIMITS, SeriesTableCache, decode_series
from wire.schema import schema_problem
from wire.sealing import SealingKeys, unseal
from wire.table import SeriesTable, open_table, table_id

if TYPE_CHECKING:
    from wire.columns_np import Columns


class NodeKey(Protocol):
    """What the reader knows of the key a batch names (the collector's trust records)."""

    @property
    def public_key(self) -> bytes: ...

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        """Why this key may not sign (site, node, seq), as (result, detail); None if it may."""
        ...


KeyLookup = Callable[[bytes], NodeKey | None]
TableLookup = Callable[[str, str], SeriesTableCache | None]


class SeriesTables:
    """Each sender's SeriesTableCache, for open_batch's `tables`; bounded in senders."""

    def __init__(self, max_senders: int = 100_000) -> None:
        self.max_senders = max_senders
        self._by_sender: dict[tuple[str, str], SeriesTableCache] = {}

    def __call__(self, site: str, node: str) -> SeriesTableCache:
        table = self._by_sender.get((site, node))
        if table is None:
            if len(self._by_sender) >= self.max_senders:
                self._by_sender.clear()
            table = self._by_sender[(site, node)] = SeriesTableCache()
        return table


class TableStore(Protocol):
    """Where a reader finds the series tables (wire v2) a node has sent, by (site, node, id)."""

    def get(self, site: str, node: str, table_id: bytes) -> SeriesTable | None: ...

    def add(self, site: str, node: str, table: SeriesTable) -> None: ...


class MemoryTables:
    """Series tables held in memory, the least recently used going first once there are more
    than `max_tables`, or their series together pass `max_series` (a decoded table costs a
    few hundred bytes a series: one node key bringing new big tables must not fill memory),
    or one node has more than `per_node` (its replaced tables go before other nodes' current
    ones). A reader that keeps tables durably (the collector's ledger) looks there on a miss."""

    def __init__(self, max_tables: int = 4096, max_series: int = 2_000_000, per_node: int = 4) -> None:
        self.max_tables = max_tables
        self.max_series = max_series
        self.per_node = per_node
        self.series = 0  # series in the tables held
        self._tables: dict[tuple[str, str, bytes], SeriesTable] = {}
        self._per_node: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, site: str, node: str, table_id: bytes) -> SeriesTable | None:
        key = (site, node, table_id)
        table = self._tables.get(key)
        if table is None:
            table = self.load(site, node, table_id)
            if table is None:
                return None
        self.add(site, node, table)
        return table

    def load(self, site: str, node: str, table_id: bytes) -> SeriesTable | None:
        """A table this cache does not hold, from wherever the reader keeps them; None here."""
        return None

    def add(self, site: str, node: str, table: SeriesTable) -> None:
        key = (site, node, table.id)
        if self._tables.pop(key, None) is None:  # the most recently used goes last
            self.series += len(table)
            self._per_node[(site, node)] = self._per_node.get((site, node), 0) + 1
        self._tables[key] = table
        if self._per_node[(site, node)] > self.per_node:
            oldest = next(k for k in self._tables if k[:2] == (site, node))
            self._drop(oldest)
        # The table just added stays, whatever its size: its batch is being opened.
        while len(self._tables) > 1 and (len(self._tables) > self.max_tables or self.series > self.max_series):
            self._drop(next(iter(self._tables)))

    def _drop(self, key: tuple[str, str, bytes]) -> None:
        table = self._tables.pop(key)
        self.series -= len(table)
        left = self._per_node[key[:2]] - 1
        if left:
            self._per_node[key[:2]] = left
        else:
            del self._per_node[key[:2]]


@dataclass(frozen=True)
class OpenLimits:
    max_decompressed_bytes: int = 128 * 1024 * 1024
    payload: Limits = DEFAULT_LIMITS


DEFAULT_OPEN_LIMITS = OpenLimits()


@dataclass(frozen=True)
class VerifiedBatch:
    """A batch whose key, signature, size, encoding and schema all checked out."""

    frame: Frame
    key: NodeKey
    series: list[Series] = field(default_factory=list)  # data batches only
    drop: DropReceipt | None = None
    rotation: KeyRotation | None = None
    # v2 data batches: the series table they name (with the blob, for the ledger) and the
    # decoded columns.
    table: SeriesTable | None = None
    columns: Columns | None = None

    @property
    def header(self) -> Header:
        return self.frame.header


@dataclass(frozen=True)
class Refusal:
    """Why a batch was not opened. `result` is the collector's result word (docs/wire.md);
    `signed` is true once the signature verified (the sender proved its key)."""

    result: str
    detail: str
    header: Header | None = None
    signed: bool = False


def _refusal(exc: WireError, header: Header | None = None, signed: bool = False) -> Refusal:
    return Refusal(exc.reason, exc.detail, header, signed)


def open_batch(
    raw: bytes,
    keys: KeyLookup,
    limits: OpenLimits = DEFAULT_OPEN_LIMITS,
    tables: TableLookup | None = None,
    *,
    sealing_keys: SealingKeys | None = None,
    series_tables: TableStore | None = None,
    attached_table: bytes | None = None,
    as_series: bool = True,
) -> VerifiedBatch | Refusal:
    """parse -> key -> signature -> unseal -> bounded decompression -> decode -> schema and limits.

    `keys` maps a key id to the key record; `tables` (optional) gives the sender's series
    table cache, so a node's names and labels are decoded and checked once, not per batch.
    A cache is touched by one call at a time: callers serialize per sender.
    `sealing_keys` maps a collector key id to its private sealing key (current and retired);
    without it a sealed batch is refused as `sealed_to_unknown_key`.
    A v2 data batch names its series table: `attached_table` is one sent with it (checked
    against the id the signed payload names, opened unless `series_tables` holds it, and
    added there once the batch opened), otherwise the table must be in `series_tables`, or
    the batch is refused `unknown_table` (the sender sends it again with the table). A table
    sent with any other batch is `malformed`. Nothing but a Refusal or a VerifiedBatch comes
    back, whatever the bytes. With `as_series` False a v2 data batch comes back as its
    `columns` only (`series` empty): a reader that works on columns skips a Python object
    per series.
    """
    try:
        frame = parse_frame(raw)
    except WireError as exc:
        return _refusal(exc)
    h = frame.header
    key = keys(h.key_id)
    if key is None:
        return Refusal("unknown_key", f"key {h.key_id.hex()} is not enrolled", h)
    refused = key.refusal(h.site, h.node, h.seq)
    if refused is not None:
        return Refusal(refused[0], refused[1], h)
    try:
        verify_signature(frame, key.public_key)
    except WireError as exc:
        return _refusal(exc, h)
    try:
        columnar = h.kind == Kind.DATA and h.version == WIRE_VERSION_2
        if attached_table is not None and not columnar:
            raise WireError("malformed", "a series table sent with a batch that names none (not v2 data)")
        unsealed = None
        if h.flags & FLAG_SEALED:
            check_raw_len(h, limits.max_decompressed_bytes)  # refused before any decryption work
            unsealed = unseal(frame.payload, sealing_keys)
        payload = decompress_payload(frame, limits.max_decompressed_bytes, unsealed)
        if columnar:
            return _open_columns(frame, key, payload, limits, sealing_keys, series_tables, attached_table,
                                 as_series)
        if h.kind == Kind.DATA:
            cache = tables(h.site, h.node) if tables is not None else None
            series = decode_series(payload, limits.payload, cache)
            check_counts(frame, series)
            if cache is None or not cache.hit:
                problem = schema_problem(series)
                if problem:
                    return Refusal("schema", problem, h, True)
                if cache is not None:
                    cache.confirm()
            return VerifiedBatch(frame, key, series=series)
        if h.kind == Kind.DROP_RECEIPT:
            receipt = decode_drop_receipt(payload)
            control.check_drop_receipt(receipt, h)
            return VerifiedBatch(frame, key, drop=receipt)
        return VerifiedBatch(frame, key, rotation=decode_key_rotation(frame, payload))
    except WireError as exc:
        return _refusal(exc, h, True)


def _open_columns(
    frame: Frame,
    key: NodeKey,
    payload: bytes,
    limits: OpenLimits,
    sealing_keys: SealingKeys | None,
    series_tables: TableStore | None,
    attached: bytes | None,
    as_series: bool = True,
) -> VerifiedBatch:
    """A v2 data batch: its table (sent with it, or held for its node), then its columns."""
    from wire.columns_np import decode_columns  # numpy: loaded by readers only

    h = frame.header
    named = columns_table_id(payload)
    table = series_tables.get(h.site, h.node, named) if series_tables is not None else None
    opened = False
    if attached is not None:
        if table_id(attached) != named:
            raise WireError("malformed", f"the series table sent with batch {h.seq} is not the one it names "
                                         f"({named.hex()[:16]})")
        if table is None:
            table = open_table(attached, limits.payload, limits.max_decompressed_bytes, sealing_keys)
            opened = True
    if table is None:
        raise WireError("unknown_table", f"series table {named.hex()[:16]} of {h.site}/{h.node} is not held "
                                         "here; send it with the batch")
    columns = decode_columns(payload, table, limits.payload)
    if h.series_count != columns.series_count or h.sample_count != columns.sample_count:
        raise WireError("schema", f"header counts {h.series_count} series/{h.sample_count} samples, "
                                  f"payload has {columns.series_count}/{columns.sample_count}")
    if opened and series_tables is not None:  # kept only with a batch that opened with it
        series_tables.add(h.site, h.node, table)
    series = columns.to_series() if as_series else []
    return VerifiedBatch(frame, key, series=series, table=table, columns=columns)
