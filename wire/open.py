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
from typing import Protocol

from wire import control
from wire.control import DropReceipt, KeyRotation, decode_drop_receipt, decode_key_rotation
from wire.frame import (
    FLAG_SEALED,
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
) -> VerifiedBatch | Refusal:
    """parse -> key -> signature -> unseal -> bounded decompression -> decode -> schema and limits.

    `keys` maps a key id to the key record; `tables` (optional) gives the sender's series
    table cache, so a node's names and labels are decoded and checked once, not per batch.
    A cache is touched by one call at a time: callers serialize per sender.
    `sealing_keys` maps a collector key id to its private sealing key (current and retired);
    without it a sealed batch is refused as `sealed_to_unknown_key`.
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
        unsealed = None
        if h.flags & FLAG_SEALED:
            check_raw_len(h, limits.max_decompressed_bytes)  # refused before any decryption work
            unsealed = unseal(frame.payload, sealing_keys)
        payload = decompress_payload(frame, limits.max_decompressed_bytes, unsealed)
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
