"""Provenance: which recorded batch carried a sample, and how that batch arrived.

`find_sample()` reads the ledger read-only (beside a running `serve`, or with none). It asks
the `batches_by_window_end` index for the node's data batches whose window reaches back
to within `lookback` of the asked time (and ends no later than `lookback` after it: a
batch's window is one flush interval, minutes), newest window end first, and opens each through
`wire.open_batch` (the one verification path, with the key recorded for it, and for a v2
batch the series table the ledger holds for it), so a sample
is only ever attributed to a batch whose signature verifies. It stops as soon as no
batch still to be read can hold a later point than the ones found: it reads the few
batches around the time, never the node's whole history.

A sealed batch (payload encrypted to the collector's key) cannot be searched until the
collector's decryption keys are passed to `open_batch` here; it is skipped and counted.

Thread contract: blocking, one connection of its own; call from one thread.
"""

from __future__ import annotations

import sqlite3
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import wire
from collector import ledger, trust
from collector.tables import LedgerTables


@dataclass(frozen=True)
class SampleOrigin:
    """A sample and the batch that carried it."""

    site: str
    node: str
    metric: str
    labels: tuple[tuple[str, str], ...]
    timestamp_ms: int
    value: float
    seq: int
    key_id: str  # hex
    batch_hash: str  # hex, the chain hash (SHA-256 of the frame)
    received_at: float  # the collector's clock when it recorded the batch
    origin: str  # "http" or "bundle"
    origin_file: str | None  # the bundle's file, for origin "bundle"
    window_start_ms: int
    window_end_ms: int

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["labels"] = dict(self.labels)
        return out


@dataclass(frozen=True)
class Search:
    """What a provenance search found: each matching series' nearest point, and what it read."""

    found: list[SampleOrigin]
    batches_read: int
    sealed_skipped: int
    unverified_skipped: list[str]  # "seq N: reason" of candidate batches that did not verify


def parse_labels(text: str | None) -> tuple[tuple[str, str], ...]:
    """'k=v,k2=v2' -> (('k', 'v'), ('k2', 'v2')); raises ValueError naming a bad pair."""
    if not text:
        return ()
    out: list[tuple[str, str]] = []
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"label {part!r} is not name=value")
        out.append((name.strip(), value.strip().strip('"')))
    return tuple(out)


def find_sample(
    conn: sqlite3.Connection,
    site: str,
    node: str,
    metric: str,
    labels: tuple[tuple[str, str], ...],
    at_ms: int,
    lookback_ms: int,
    limits: wire.OpenLimits = wire.DEFAULT_OPEN_LIMITS,
    sealing_keys: wire.SealingKeys | None = None,
) -> Search:
    """For each series of `metric` on site/node whose labels include `labels`, its point at or
    nearest before `at_ms` (no older than `lookback_ms` before it), with the batch that
    carried it. Several series match when `labels` leaves some out."""
    has_origin = ledger.has_batch_column(conn, "origin")
    origin_columns = "origin, origin_file" if has_origin else "'http', NULL"
    wanted = set(labels)
    keys = _key_lookup(conn)
    series_tables = LedgerTables(conn, limits, sealing_keys, max_tables=16)  # v2 batches' tables
    best: dict[tuple[tuple[str, str], ...], SampleOrigin] = {}
    read = sealed = 0
    unverified: list[str] = []
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            f"SELECT seq, received_at, {origin_columns}, window_start_ms, window_end_ms, frame "
            "FROM batches WHERE site = ? AND node = ? AND window_end_ms BETWEEN ? AND ? "
            "AND window_start_ms <= ? AND kind = ? ORDER BY window_end_ms DESC, seq DESC",
            (site, node, at_ms - lookback_ms, at_ms + lookback_ms, at_ms, int(wire.Kind.DATA)),
        )
        for seq, received_at, origin, origin_file, w_start, w_end, frame in rows:
            # Nothing in this batch or any after it (window ends no later) can be newer than
            # min(at, w_end): once every found series has a point at least that new, stop.
            if best and min(at_ms, w_end) < min(o.timestamp_ms for o in best.values()):
                break
            read += 1
            raw = bytes(frame)
            opened = wire.open_batch(raw, keys, limits, sealing_keys=sealing_keys, series_tables=series_tables)
            if isinstance(opened, wire.Refusal):
                if opened.signed and opened.result == "sealed_to_unknown_key":
                    sealed += 1
                else:
                    unverified.append(f"seq {seq}: {opened.result}: {opened.detail}")
                continue
            h = opened.header
            for series in opened.series:
                if series.name != metric or not wanted <= set(series.labels):
                    continue
                i = bisect_right(series.timestamps_ms, at_ms) - 1
                if i < 0 or series.timestamps_ms[i] < at_ms - lookback_ms:
                    continue
                ts = series.timestamps_ms[i]
                known = best.get(series.labels)
                if known is not None and known.timestamp_ms >= ts:
                    continue
                best[series.labels] = SampleOrigin(
                    site,
                    node,
                    metric,
                    series.labels,
                    ts,
                    series.values[i],
                    int(seq),
                    h.key_id.hex(),
                    wire.batch_hash(raw).hex(),
                    float(received_at),
                    str(origin),
                    origin_file,
                    int(w_start),
                    int(w_end),
                )
    finally:
        conn.execute("COMMIT")
    found = sorted(best.values(), key=lambda o: (-o.timestamp_ms, o.labels))
    return Search(found, read, sealed, unverified)


def _key_lookup(conn: sqlite3.Connection) -> wire.KeyLookup:
    cache: dict[bytes, trust.RecordedKey | None] = {}

    def lookup(key_id: bytes) -> trust.RecordedKey | None:
        if key_id not in cache:
            cache[key_id] = trust.lookup_recorded(conn, key_id)
        return cache[key_id]

    return lookup


def parse_time_ms(text: str) -> int:
    """RFC 3339 / ISO 8601 (no zone: UTC) or Unix seconds -> Unix milliseconds."""
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"time {text!r} is neither RFC 3339 (2024-05-01T12:00:00Z) nor Unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


def format_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _series_text(metric: str, labels: tuple[tuple[str, str], ...]) -> str:
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def search_json(search: Search) -> dict[str, Any]:
    return {
        "found": [o.to_json() for o in search.found],
        "batches_read": search.batches_read,
        "sealed_skipped": search.sealed_skipped,
        "unverified_skipped": search.unverified_skipped,
    }


def describe(
    search: Search,
    site: str,
    node: str,
    metric: str,
    labels: tuple[tuple[str, str], ...],
    at_ms: int,
    lookback_ms: int,
) -> str:
    lines: list[str] = []
    for o in search.found:
        how = "over HTTP" if o.origin == "http" else f"in {o.origin} {o.origin_file or '(file not recorded)'}"
        lines += [
            f"{_series_text(o.metric, o.labels)} = {o.value!r} at {format_ms(o.timestamp_ms)} "
            f"({o.timestamp_ms} ms) on {o.site}/{o.node}",
            f"  batch:    seq {o.seq}, window {format_ms(o.window_start_ms)} .. {format_ms(o.window_end_ms)}",
            f"  key:      {o.key_id} (signature verified)",
            f"  hash:     {o.batch_hash}",
            f"  received: {format_ms(round(o.received_at * 1000))} {how}",
        ]
    if not search.found:
        lines.append(
            f"no sample of {_series_text(metric, labels)} from {site}/{node} at {format_ms(at_ms)} "
            f"or up to {lookback_ms / 1000:g} s before it ({search.batches_read} batches read)"
        )
    if search.sealed_skipped:
        lines.append(
            f"note: {search.sealed_skipped} sealed batch(es) in range could not be searched "
            "(provenance has no collector decryption key yet)"
        )
    for text in search.unverified_skipped:
        lines.append(f"note: skipped a batch that does not verify ({text}); run `waystation-collector audit`")
    return "\n".join(lines)
