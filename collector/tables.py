"""Series tables (wire v2) as the collector keeps them: in the ledger, with a bounded cache.

A v2 data batch names its series table by id (wire/table.py); the collector stores every
table in the ledger's `series_tables` in the transaction that commits the first batch
held with it (collector.ledger.Ledger.commit), so every reader of a stored frame finds the
table it names there. `LedgerTables` is the `wire.TableStore` each reader hands to
`wire.open_batch`: a least-recently-used cache of decoded tables (at most `max_tables`)
that loads a table from the ledger on a miss, through the reader's own connection.

Thread contract: a LedgerTables is used by one thread at a time, the one that owns its
connection (ingest's verify thread, the forwarder's work thread, audit, provenance, the
start-up rebuild, an import).
"""

from __future__ import annotations

import sqlite3

import zstandard

import wire
from wire.columns import COLUMNS_HEAD_LEN, columns_table_id

# Decoded tables a long-running reader keeps (one or a few current per node); a miss costs
# one read of the ledger and one decode.
MAX_TABLES = 4096


class LedgerTables(wire.MemoryTables):
    """The tables a reader has met, and on a miss the ledger's, opened with the reader's
    limits and sealing keys. Tables loaded from the ledger are durable (held there)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        limits: wire.OpenLimits,
        sealing_keys: wire.SealingKeys | None = None,
        max_tables: int = MAX_TABLES,
    ) -> None:
        super().__init__(max_tables)
        self.conn = conn
        self.limits = limits
        self.sealing_keys = sealing_keys
        self.loaded = 0  # tables read from the ledger (for tests and benches)

    def load(self, site: str, node: str, table_id: bytes) -> wire.SeriesTable | None:
        """The ledger's table for (site, node, id), or None: none stored, or the stored bytes
        are not the table with that id (audit names that `table_mismatch`). A stored table
        that does not open with this reader's limits or keys raises WireError, which
        open_batch answers as it would for the batch itself. sqlite3.Error propagates."""
        blob = stored_table(self.conn, site, node, table_id)
        if blob is None or wire.table_id(blob) != table_id:
            return None
        table = wire.open_table(blob, self.limits.payload, self.limits.max_decompressed_bytes, self.sealing_keys)
        table.durable = True
        self.loaded += 1
        return table


def stored_table(conn: sqlite3.Connection, site: str, node: str, table_id: bytes) -> bytes | None:
    """The bytes stored for a node's table id (None: none; also for a ledger that no
    collector with series tables has opened yet, read through a read-only connection)."""
    try:
        row = conn.execute(
            "SELECT blob FROM series_tables WHERE site = ? AND node = ? AND table_id = ?", (site, node, table_id)
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else bytes(row[0])


def has_series_tables(conn: sqlite3.Connection) -> bool:
    """Whether the ledger has the series_tables table (a read-only reader of a ledger no
    newer collector opened yet finds none; such a ledger holds no v2 batch either)."""
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'series_tables'").fetchone()
    return row is not None


def named_table_id(raw: bytes, sealing_keys: wire.SealingKeys | None) -> bytes | None:
    """The series table id a v2 data frame names (the first bytes of its payload), or None:
    not a v2 data frame, or its payload cannot be read here (damaged, sealed to a key this
    reader does not hold). Nothing is verified: the caller only uses the id to pick a table
    to send with the frame, and the frame is verified where it is opened. A sealed payload
    is decrypted (bounded by the frame's own size), a compressed one only as far as its
    first COLUMNS_HEAD_LEN bytes."""
    try:
        frame = wire.parse_frame(raw)
        h = frame.header
        if h.kind != wire.Kind.DATA or h.version != wire.WIRE_VERSION_2:
            return None
        payload = wire.unseal(frame.payload, sealing_keys) if h.flags & wire.FLAG_SEALED else frame.payload
        if h.codec == wire.Codec.NONE:
            head = payload[:COLUMNS_HEAD_LEN]
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False)
            head = reader.read(COLUMNS_HEAD_LEN)
        return columns_table_id(head)
    except (wire.WireError, zstandard.ZstdError):
        return None
