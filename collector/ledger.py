"""The ledger: every accepted batch, per-node seq/hash chain, watermark, gaps and drops (SQLite).

Thread contract: one `Ledger` is used by one thread at a time (the collector's
committer thread); `commit` runs a whole group of batches in one transaction,
so many concurrent posts cost one fsync. Other processes (the CLI) and the
serve process's request handlers read through their own connections (WAL).
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import time
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wire
from collector import trust
from collector.trust import KeyRecord, TrustError
from wire import bundle

MAX_GAP_RANGES = 100  # gap ranges kept per node for /v1/nodes and `nodes`

# Every air-gap receipt the collector signed (`import --receipt-out`, `receipt`), so what a
# node was told can be looked up afterwards. Also created by `issue_receipt` itself: the
# CLI opens an existing ledger without running SCHEMA.
RECEIPTS_ISSUED_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts_issued (
    receipt_no       INTEGER PRIMARY KEY,  -- per collector, only grows (meta 'receipt_no')
    issued_ms        INTEGER NOT NULL,
    site             TEXT NOT NULL,
    node             TEXT NOT NULL,
    collector_key_id BLOB NOT NULL,
    complete_through INTEGER NOT NULL,
    head_seq         INTEGER NOT NULL,     -- the node's chain head stated (0: nothing held)
    bundles          INTEGER NOT NULL,     -- bundles answered (0: `waystation-collector receipt`)
    batches          INTEGER NOT NULL,     -- (seq, hash) pairs named for the node to delete
    receipt          BLOB NOT NULL         -- the signed receipt, byte for byte
);
CREATE INDEX IF NOT EXISTS receipts_issued_by_node ON receipts_issued (site, node, receipt_no);
"""

SCHEMA = (
    trust.SCHEMA
    + """
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    site            TEXT NOT NULL,
    node            TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    kind            INTEGER NOT NULL,
    hash            BLOB NOT NULL,
    prev_hash       BLOB NOT NULL,
    key_id          BLOB NOT NULL,
    received_at     REAL NOT NULL,
    created_wall_ms INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms   INTEGER NOT NULL,
    series_count    INTEGER NOT NULL,
    sample_count    INTEGER NOT NULL,
    bytes           INTEGER NOT NULL,
    frame           BLOB NOT NULL,
    origin          TEXT NOT NULL DEFAULT 'http',  -- how it arrived: 'http' or 'bundle'
    origin_file     TEXT,                          -- the bundle's file name (bundles only)
    table_id        BLOB,                          -- a v2 data batch's series table (else NULL)
    PRIMARY KEY (site, node, seq)
);
-- Provenance finds the batches whose window reaches back to a time without reading the
-- node's other frames.
CREATE INDEX IF NOT EXISTS batches_by_window_end ON batches (site, node, window_end_ms);
-- The series tables (wire v2) that the node's v2 data batches name, exactly as sent: a batch
-- is committed only in the transaction that holds (or already held) the table it names,
-- and a table leaves only once no stored batch names it (pruning).
CREATE TABLE IF NOT EXISTS series_tables (
    site        TEXT NOT NULL,
    node        TEXT NOT NULL,
    table_id    BLOB NOT NULL,     -- SHA-256 of blob (wire.table_id)
    blob        BLOB NOT NULL,     -- the table's bytes as carried (head, compressed, maybe sealed)
    received_ms INTEGER NOT NULL,  -- when the collector first stored it
    PRIMARY KEY (site, node, table_id)
);
CREATE TABLE IF NOT EXISTS drops (
    site        TEXT NOT NULL,
    node        TEXT NOT NULL,
    receipt_seq INTEGER NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    samples     INTEGER NOT NULL,  -- the receipt's sample count, on its first range only
    PRIMARY KEY (site, node, receipt_seq, first_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (
    site             TEXT NOT NULL,
    node             TEXT NOT NULL,
    first_seen       REAL NOT NULL,
    last_seen        REAL NOT NULL,
    complete_through INTEGER NOT NULL,
    highest_seq      INTEGER NOT NULL,
    gap_seqs         INTEGER NOT NULL,
    gap_ranges       TEXT NOT NULL,  -- JSON [[first, last], ...], the lowest MAX_GAP_RANGES
    stored_batches   INTEGER NOT NULL,
    stored_samples   INTEGER NOT NULL,
    dropped_batches  INTEGER NOT NULL,
    dropped_samples  INTEGER NOT NULL,
    conflicts        INTEGER NOT NULL,
    chain_breaks     INTEGER NOT NULL,
    backlog_batches  REAL,
    backlog_bytes    REAL,
    backlog_seq      INTEGER NOT NULL,
    PRIMARY KEY (site, node)
) WITHOUT ROWID;
-- The exposed latest state: each series' newest point, upserted periodically and at a clean
-- stop; meta 'latest_through' is a batch rowid such that this table plus the data batches
-- recorded after it give the whole state, so a start replays only the batches after it.
CREATE TABLE IF NOT EXISTS latest_state (
    site   TEXT NOT NULL,
    node   TEXT NOT NULL,
    name   TEXT NOT NULL,
    labels TEXT NOT NULL,  -- JSON [[name, value], ...] as sent, without site and node
    mtype  INTEGER NOT NULL,
    ts_ms  INTEGER NOT NULL,
    value  REAL NOT NULL,
    PRIMARY KEY (site, node, name, labels)
) WITHOUT ROWID;
-- Per node, saved with the latest state: its newest sample time (its clock) and when the
-- batch carrying it arrived (the collector's), so exposed timestamps never step back.
CREATE TABLE IF NOT EXISTS latest_nodes (
    site       TEXT NOT NULL,
    node       TEXT NOT NULL,
    newest_ms  INTEGER NOT NULL,
    arrival_ms INTEGER NOT NULL,
    PRIMARY KEY (site, node)
) WITHOUT ROWID;
-- Per remote_write target: the batches (by rowid, in arrival order) it holds or needs not,
-- and its counters. Written by the forwarder, read by /metrics and by the pruning.
CREATE TABLE IF NOT EXISTS forward_targets (
    target            TEXT PRIMARY KEY,
    done              TEXT NOT NULL,  -- JSON [[first_rowid, last_rowid], ...]
    samples_sent      INTEGER NOT NULL,
    refused           TEXT NOT NULL,  -- JSON {reason: samples}
    retries           TEXT NOT NULL,  -- JSON {reason: requests}
    last_success      REAL,
    pending_batches   INTEGER NOT NULL,
    oldest_pending_ms INTEGER,
    updated_at        REAL NOT NULL
) WITHOUT ROWID;
-- Seqs whose batches left the archive (retention, size cap): still accounted for.
CREATE TABLE IF NOT EXISTS retired (
    site      TEXT NOT NULL,
    node      TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (site, node, first_seq)
) WITHOUT ROWID;
-- Batches that left the archive before a target had them.
CREATE TABLE IF NOT EXISTS expired (
    target  TEXT PRIMARY KEY,
    batches INTEGER NOT NULL,
    samples INTEGER NOT NULL
) WITHOUT ROWID;
"""
    + RECEIPTS_ISSUED_SCHEMA
)


def connect(path: Path, *, create: bool = True) -> sqlite3.Connection:
    """Open the ledger database (WAL, synchronous=FULL: we ack only after a durable commit)."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no ledger here (has the collector run with this data_dir?)")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    if create:
        conn.executescript(SCHEMA)
        _migrate(conn)
    return conn


# Columns added to `batches` after ledgers were first written, with their definitions;
# ALTER TABLE appends them, so old and new ledgers end with the same layout.
_ADDED_BATCH_COLUMNS = (
    ("origin", "TEXT NOT NULL DEFAULT 'http'"),  # every batch before this column came over HTTP
    ("origin_file", "TEXT"),
    ("table_id", "BLOB"),  # no batch before this column was a v2 data batch
)
# Created once the columns it covers exist (an older ledger gets them from _migrate first).
# Pruning asks it whether any stored batch still names a series table.
_BATCHES_BY_TABLE = (
    "CREATE INDEX IF NOT EXISTS batches_by_table ON batches (site, node, table_id) WHERE table_id IS NOT NULL"
)


def _batch_columns(conn: sqlite3.Connection) -> set[str]:
    return {str(row[1]) for row in conn.execute("PRAGMA table_info(batches)")}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an existing ledger's tables up to SCHEMA (one transaction; concurrent openers
    of the same ledger serialize on it and the second finds nothing to do)."""
    if not all(name in _batch_columns(conn) for name, _ in _ADDED_BATCH_COLUMNS):
        with immediate(conn):
            present = _batch_columns(conn)
            for name, definition in _ADDED_BATCH_COLUMNS:
                if name not in present:
                    # Names and definitions are the constants above, never input.
                    conn.execute(f"ALTER TABLE batches ADD COLUMN {name} {definition}")
    conn.execute(_BATCHES_BY_TABLE)


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open the ledger read-only (audit, provenance): never writes, never migrates, and reads
    beside a running `serve` through WAL. Raises FileNotFoundError if there is no ledger."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger here (has the collector run with this data_dir?)")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def has_batch_column(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the ledger's batches table has `name` (a ledger no newer collector opened yet
    lacks the added columns; readers then assume their defaults)."""
    return name in _batch_columns(conn)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (BEGIN IMMEDIATE): committed on success, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def merged_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Closed ranges, sorted, with overlapping and adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


class IntervalSet:
    """Disjoint, non-adjacent closed integer ranges: the seqs a node has accounted for."""

    __slots__ = ("starts", "ends", "count")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.count = 0

    def add(self, first: int, last: int) -> None:
        i = bisect_left(self.ends, first - 1)
        j = bisect_right(self.starts, last + 1)
        if i < j:
            removed = sum(e - s + 1 for s, e in zip(self.starts[i:j], self.ends[i:j], strict=True))
            first = min(first, self.starts[i])
            last = max(last, self.ends[j - 1])
            self.starts[i:j] = [first]
            self.ends[i:j] = [last]
            self.count += last - first + 1 - removed
        else:
            self.starts.insert(i, first)
            self.ends.insert(i, last)
            self.count += last - first + 1

    def to_json(self) -> str:
        return json.dumps([[s, e] for s, e in zip(self.starts, self.ends, strict=True)])

    @classmethod
    def from_json(cls, text: str) -> IntervalSet:
        out = cls()
        for first, last in json.loads(text):
            out.add(int(first), int(last))
        return out

    def copy(self) -> IntervalSet:
        other = IntervalSet()
        other.starts, other.ends, other.count = list(self.starts), list(self.ends), self.count
        return other

    def __contains__(self, seq: int) -> bool:
        i = bisect_right(self.starts, seq) - 1
        return i >= 0 and self.ends[i] >= seq

    def prefix_end(self) -> int:
        """The largest w with 1..w all present (0 if 1 is missing)."""
        return self.ends[0] if self.starts and self.starts[0] == 1 else 0

    def gaps(self, upto: int, limit: int) -> list[tuple[int, int]]:
        """The lowest `limit` missing ranges within 1..upto."""
        out: list[tuple[int, int]] = []
        prev = 0
        for s, e in zip(self.starts, self.ends, strict=True):
            if s > upto or len(out) >= limit:
                break
            if s > prev + 1:
                out.append((prev + 1, s - 1))
            prev = e
        if prev < upto and len(out) < limit:
            out.append((prev + 1, upto))
        return out


@dataclass(frozen=True)
class NodeState:
    """A snapshot of one node's accounting, as exposed and as written to the nodes table."""

    site: str
    node: str
    first_seen: float = 0.0
    last_seen: float = 0.0
    complete_through: int = 0
    highest_seq: int = 0
    gap_seqs: int = 0
    gap_ranges: tuple[tuple[int, int], ...] = ()
    stored_batches: int = 0
    stored_samples: int = 0
    dropped_batches: int = 0
    dropped_samples: int = 0
    conflicts: int = 0
    chain_breaks: int = 0
    backlog_batches: float | None = None
    backlog_bytes: float | None = None
    backlog_seq: int = 0

    @property
    def tamper_events(self) -> int:
        return self.conflicts + self.chain_breaks


@dataclass
class _Node:
    site: str
    node: str
    accounted: IntervalSet = field(default_factory=IntervalSet)
    first_seen: float = 0.0
    last_seen: float = 0.0
    highest_seq: int = 0
    stored_batches: int = 0
    stored_samples: int = 0
    dropped_batches: int = 0
    dropped_samples: int = 0
    conflicts: int = 0
    chain_breaks: int = 0
    backlog_batches: float | None = None
    backlog_bytes: float | None = None
    backlog_seq: int = 0

    def clone(self) -> _Node:
        copy = _Node(**{f: getattr(self, f) for f in self.__dataclass_fields__ if f != "accounted"})
        copy.accounted = self.accounted.copy()
        return copy

    def snapshot(self) -> NodeState:
        return NodeState(
            site=self.site,
            node=self.node,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            complete_through=self.accounted.prefix_end(),
            highest_seq=self.highest_seq,
            gap_seqs=self.highest_seq - self.accounted.count,
            gap_ranges=tuple(self.accounted.gaps(self.highest_seq, MAX_GAP_RANGES)),
            stored_batches=self.stored_batches,
            stored_samples=self.stored_samples,
            dropped_batches=self.dropped_batches,
            dropped_samples=self.dropped_samples,
            conflicts=self.conflicts,
            chain_breaks=self.chain_breaks,
            backlog_batches=self.backlog_batches,
            backlog_bytes=self.backlog_bytes,
            backlog_seq=self.backlog_seq,
        )


@dataclass(frozen=True)
class Submission:
    """A batch that passed every check before the ledger: verified, decoded, within limits."""

    frame: wire.Frame
    key: KeyRecord
    received_at: float
    drop: wire.DropReceipt | None = None
    rotation: wire.KeyRotation | None = None
    # The agent's own spool backlog (batches, bytes) as reported in this data batch.
    backlog: tuple[float | None, float | None] | None = None
    # How the batch arrived: "http" (POST /v1/batches) or "bundle" (an air-gap import of
    # origin_file); recorded with it for `provenance`.
    origin: str = "http"
    origin_file: str | None = None
    # A v2 data batch's series table (wire.VerifiedBatch.table), as the batch was verified
    # against it: committed with the batch unless the ledger is known to hold it already.
    table: wire.SeriesTable | None = None


@dataclass(frozen=True)
class Pruned:
    batches: int
    bytes: int
    expired: dict[str, tuple[int, int]]  # target -> (batches, samples) it never got
    more: bool
    tables: int = 0  # series tables deleted because no stored batch names them any more


_PRUNED = "duplicate_pruned"  # _apply's word for Outcome(result="duplicate", pruned=True)


@dataclass(frozen=True)
class Outcome:
    result: str  # accepted | duplicate | conflict | chain_mismatch | revoked | unknown_key | malformed
    detail: str
    state: NodeState
    # A "duplicate" whose seq left the archive (retention): its hash is gone, so nothing
    # says the collector held these bytes. A receipt must not name it as held.
    pruned: bool = False


_NODE_COLUMNS = (
    "site, node, first_seen, last_seen, complete_through, highest_seq, gap_seqs, gap_ranges, "
    "stored_batches, stored_samples, dropped_batches, dropped_samples, conflicts, chain_breaks, "
    "backlog_batches, backlog_bytes, backlog_seq"
)

_UPSERT_NODE = (
    f"INSERT OR REPLACE INTO nodes ({_NODE_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_BATCH = (
    "INSERT INTO batches (site, node, seq, kind, hash, prev_hash, key_id, received_at, "
    "created_wall_ms, window_start_ms, window_end_ms, series_count, sample_count, bytes, frame, "
    "origin, origin_file, table_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_TABLE = (
    "INSERT OR IGNORE INTO series_tables (site, node, table_id, blob, received_ms) VALUES (?, ?, ?, ?, ?)"
)

_ISLANDS = (
    "SELECT MIN(seq), MAX(seq) FROM ("
    "  SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp"
    "  FROM batches WHERE site = ? AND node = ?"
    ") GROUP BY grp"
)


def _state_from_row(row: Sequence[Any]) -> NodeState:
    values = list(row)
    values[7] = tuple((int(a), int(b)) for a, b in json.loads(values[7]))
    return NodeState(*values)


class Ledger:
    """The collector's durable record; see the module docstring for the thread contract."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)
        self._nodes: dict[tuple[str, str], _Node] = {}
        # Series tables: a table object marked durable is trusted to be in series_tables
        # without asking, unless this ledger has deleted tables since (pruning): each prune
        # that deleted any starts a new epoch, and a durable table is trusted only once a
        # commit of this epoch has put it (or found it) there again. The objects come from
        # the readers' table caches (collector.tables.LedgerTables), which may hold one
        # whose row pruning deleted.
        self._table_epoch = 0
        self._tables_confirmed: weakref.WeakKeyDictionary[wire.SeriesTable, int] = weakref.WeakKeyDictionary()
        for (site, node) in self.conn.execute("SELECT site, node FROM nodes").fetchall():
            self._nodes[(site, node)] = self._load_node(site, node)

    def close(self) -> None:
        self.conn.close()

    # ---------------------------------------------------------------- reading

    def _load_node(self, site: str, node: str) -> _Node:
        n = _Node(site, node)
        row = self.conn.execute(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE site = ? AND node = ?", (site, node)
        ).fetchone()
        if row is None:
            return n
        s = _state_from_row(row)
        n.first_seen, n.last_seen, n.highest_seq = s.first_seen, s.last_seen, s.highest_seq
        n.stored_batches, n.stored_samples = s.stored_batches, s.stored_samples
        n.dropped_batches, n.dropped_samples = s.dropped_batches, s.dropped_samples
        n.conflicts, n.chain_breaks = s.conflicts, s.chain_breaks
        n.backlog_batches, n.backlog_bytes, n.backlog_seq = (
            s.backlog_batches,
            s.backlog_bytes,
            s.backlog_seq,
        )
        for first, last in self.conn.execute(_ISLANDS, (site, node)):
            n.accounted.add(first, last)
        for table in ("drops", "retired"):
            for first, last in self.conn.execute(
                f"SELECT first_seq, last_seq FROM {table} WHERE site = ? AND node = ?", (site, node)
            ):
                n.accounted.add(first, last)
        return n

    def states(self) -> list[NodeState]:
        return [n.snapshot() for n in self._nodes.values()]

    @property
    def node_count(self) -> int:
        """Nodes the ledger has heard from (a len(): safe from any thread)."""
        return len(self._nodes)

    def state(self, site: str, node: str) -> NodeState | None:
        n = self._nodes.get((site, node))
        return n.snapshot() if n else None

    def save_latest(
        self,
        rows: Iterable[tuple[str, str, str, str, int, int, float]],
        removed: Iterable[tuple[str, str, str, str]] = (),
        through: int | None = None,
        nodes: Iterable[tuple[str, str, int, int]] = (),
    ) -> int:
        """Upsert saved series, delete expired ones (by site, node, name, labels), upsert the
        nodes' (site, node, newest_ms, arrival_ms) and, with `through`, record that the table
        and the data batches after that rowid hold the whole state (an older version's
        `latest` table is then no longer needed: dropped); one transaction. Returns how many
        series rows were written."""
        with immediate(self.conn):
            self.conn.executemany(
                "DELETE FROM latest_state WHERE site = ? AND node = ? AND name = ? AND labels = ?", removed
            )
            written = self.conn.executemany(
                "INSERT INTO latest_state (site, node, name, labels, mtype, ts_ms, value) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, node, name, labels) DO UPDATE SET "
                "mtype = excluded.mtype, ts_ms = excluded.ts_ms, value = excluded.value",
                rows,
            ).rowcount
            self.conn.executemany(
                "INSERT INTO latest_nodes (site, node, newest_ms, arrival_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (site, node) DO UPDATE SET newest_ms = max(newest_ms, excluded.newest_ms), "
                "arrival_ms = max(arrival_ms, excluded.arrival_ms)",
                nodes,
            )
            if through is not None:
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta (k, v) VALUES ('latest_through', ?)", (str(through),)
                )
                self.conn.execute("DROP TABLE IF EXISTS latest")
        return max(written, 0)

    def load_latest(self) -> tuple[list[tuple[str, str, str, str, int, int, float]], int | None]:
        """The saved latest state and the batch rowid it covers (None: never saved, or an older
        version's state still to be taken over).

        The rows of an older version's `latest` table (saved at its last clean stop, with
        no position) are returned too; the first save that records a position drops it.
        """
        rows = self.conn.execute(
            "SELECT site, node, name, labels, mtype, ts_ms, value FROM latest_state"
        ).fetchall()
        legacy = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'latest'"
        ).fetchone()
        if legacy:
            rows += self.conn.execute(
                "SELECT site, node, name, labels, mtype, ts_ms, value FROM latest"
            ).fetchall()
            return rows, None  # written again, with a position, by the next save
        row = self.conn.execute("SELECT v FROM meta WHERE k = 'latest_through'").fetchone()
        return rows, (int(row[0]) if row else None)

    def load_latest_nodes(self) -> list[tuple[str, str, int, int]]:
        """The nodes' saved (site, node, newest_ms, arrival_ms)."""
        return [
            (str(site), str(node), int(newest), int(arrival))
            for site, node, newest, arrival in self.conn.execute(
                "SELECT site, node, newest_ms, arrival_ms FROM latest_nodes"
            )
        ]

    def max_rowid(self) -> int:
        """The rowid of the newest recorded batch (0: none). Row ids only grow: pruning
        always keeps the newest batch of all."""
        return int(self.conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM batches").fetchone()[0])

    def replay_frames(self, rowid: int | None) -> Iterator[tuple[bytes, float]]:
        """(frame, received_at) of every data batch recorded after `rowid` in arrival order
        or, with None (no saved position), of each node's newest data batch."""
        if rowid is not None:
            for frame, received_at in self.conn.execute(
                "SELECT frame, received_at FROM batches WHERE rowid > ? AND kind = ? ORDER BY rowid",
                (rowid, int(wire.Kind.DATA)),
            ):
                yield bytes(frame), float(received_at)
            return
        for site, node in list(self._nodes):
            row = self.conn.execute(
                "SELECT frame, received_at FROM batches WHERE site = ? AND node = ? AND kind = ? "
                "ORDER BY seq DESC LIMIT 1",
                (site, node, int(wire.Kind.DATA)),
            ).fetchone()
            if row is not None:
                yield bytes(row[0]), float(row[1])

    def frame(self, site: str, node: str, seq: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT frame FROM batches WHERE site = ? AND node = ? AND seq = ?", (site, node, seq)
        ).fetchone()
        return bytes(row[0]) if row else None

    # ---------------------------------------------------------------- writing

    def check_writable(self) -> None:
        """A tiny durable write; raises sqlite3.Error when the ledger cannot commit."""
        with immediate(self.conn):
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES ('health_checked_at', ?)",
                (repr(time.time()),),
            )

    def commit(self, group: Sequence[Submission]) -> list[Outcome]:
        """Apply a group of batches in one transaction; returns one outcome per submission.

        Raises sqlite3.Error if the transaction fails; nothing of the group is then recorded.
        """
        touched: dict[tuple[str, str], _Node] = {}
        results: list[tuple[str, str, _Node]] = []
        kept: dict[tuple[str, str, bytes], list[wire.SeriesTable]] = {}  # series tables this group holds
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for sub in group:
                h = sub.frame.header
                key = (h.site, h.node)
                n = touched.get(key) or self._nodes.get(key) or _Node(h.site, h.node)
                touched[key] = n  # reloaded from the database if the transaction fails
                before = n.clone()
                self.conn.execute("SAVEPOINT batch")
                try:
                    result, detail = self._apply(n, sub)
                    if sub.table is not None and result in ("accepted", "duplicate"):
                        # The ledger now holds the frame (a duplicate: held it already), so
                        # it holds the table the frame names, in this same transaction.
                        self._keep_table(sub, sub.table, kept)
                except (OverflowError, ValueError, TypeError) as exc:
                    # This batch's own values cannot be stored (an integer beyond SQLite's
                    # signed 64 bits): it alone is refused, the rest of the group commits.
                    # A failure of the database itself (sqlite3.Error) fails the whole group.
                    self.conn.execute("ROLLBACK TO batch")
                    n = before
                    result, detail = "malformed", f"batch cannot be recorded: {exc}"
                self.conn.execute("RELEASE batch")
                touched[key] = n
                results.append((result, detail, n))
            for n in touched.values():
                s = n.snapshot()
                self.conn.execute(
                    _UPSERT_NODE,
                    (
                        s.site, s.node, s.first_seen, s.last_seen, s.complete_through,
                        s.highest_seq, s.gap_seqs, json.dumps(s.gap_ranges), s.stored_batches,
                        s.stored_samples, s.dropped_batches, s.dropped_samples, s.conflicts,
                        s.chain_breaks, s.backlog_batches, s.backlog_bytes, s.backlog_seq,
                    ),
                )
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            # The in-memory accounting may be ahead of the database now: reload what we touched.
            for key in touched:
                self._nodes[key] = self._load_node(*key)
            # The tables stay as they were (not durable): the next batch verified against
            # one of them, in whatever group, puts it in the ledger with itself.
            raise
        for tables in kept.values():
            for table in tables:
                table.durable = True
                self._tables_confirmed[table] = self._table_epoch
        self._nodes.update(touched)
        snapshots = {key: n.snapshot() for key, n in touched.items()}
        return [
            Outcome("duplicate" if result == _PRUNED else result, detail, snapshots[(n.site, n.node)],
                    pruned=result == _PRUNED)
            for result, detail, n in results
        ]

    def _table_held(self, table: wire.SeriesTable) -> bool:
        """Whether series_tables is known to hold `table` without asking (see __init__)."""
        return table.durable and (self._table_epoch == 0 or self._tables_confirmed.get(table) == self._table_epoch)

    def _keep_table(
        self, sub: Submission, table: wire.SeriesTable, kept: dict[tuple[str, str, bytes], list[wire.SeriesTable]]
    ) -> None:
        """Put a held batch's series table in series_tables (once per group; a row already
        there is left as it is: same id, same bytes)."""
        h = sub.frame.header
        key = (h.site, h.node, table.id)
        held = kept.get(key)
        if held is not None:
            if all(t is not table for t in held):
                held.append(table)
            return
        if self._table_held(table):
            return
        self.conn.execute(_INSERT_TABLE, (h.site, h.node, table.id, table.blob, int(sub.received_at * 1000)))
        kept[key] = [table]

    def prune(
        self, now: float, retention_s: float, max_size: int, targets: Sequence[str], limit: int = 500
    ) -> Pruned:
        """Remove at most `limit` batches that passed retention (or, over max_size, the oldest),
        in one short transaction; call again while `more` is true.

        Never removed: each node's newest batch (a new spool asks for the chain head) and the
        newest batch of all (row ids must keep growing: they are the forwarding positions).
        A data batch that a configured target does not have yet is counted as expired for it.
        A series table leaves with the last stored batch that names it (`tables`).
        """
        with immediate(self.conn):
            done = forward_done(self.conn, targets)
            over = used_bytes(self.conn) - max_size if max_size else 0
            cutoff = now - retention_s
            top = self.conn.execute("SELECT MAX(rowid) FROM batches").fetchone()[0] or 0
            rows = self.conn.execute(
                "SELECT rowid, site, node, seq, kind, sample_count, bytes, received_at FROM batches b "
                "WHERE rowid < ? AND EXISTS (SELECT 1 FROM batches n "
                "WHERE n.site = b.site AND n.node = b.node AND n.seq > b.seq) "
                "ORDER BY rowid LIMIT ?",
                (top, limit * (4 if over > 0 else 1)),
            ).fetchall()
            # Retention first: in arrival order, up to the first batch young enough to stay.
            victims: list[Any] = []
            for row in rows:
                if row[7] >= cutoff or len(victims) >= limit:
                    break
                victims.append(row)
            freed = sum(v[6] for v in victims)
            if over > freed:
                # Over the size cap: the oldest batches every target has go first, then the
                # oldest others (counted below as expired for the targets that lacked them).
                rest = rows[len(victims):]
                forwarded = [r for r in rest if all(r[0] in done[t] for t in targets)]
                unforwarded = [r for r in rest if not all(r[0] in done[t] for t in targets)]
                for row in forwarded + unforwarded:
                    if freed >= over or len(victims) >= limit:
                        break
                    victims.append(row)
                    freed += row[6]
            expired: dict[str, list[int]] = {t: [0, 0] for t in targets}
            by_node: dict[tuple[str, str], list[int]] = {}
            named: set[tuple[str, str, bytes]] = set()  # series tables the victims name
            for rowid, site, node, seq, kind, samples, _size, _at in victims:
                by_node.setdefault((site, node), []).append(seq)
                if kind != int(wire.Kind.DATA):
                    continue
                # Read for the victims only: the column lies after the frame in the row.
                (table,) = self.conn.execute("SELECT table_id FROM batches WHERE rowid = ?", (rowid,)).fetchone()
                if table is not None:
                    named.add((site, node, bytes(table)))
                for t in targets:
                    if rowid not in done[t]:
                        expired[t][0] += 1
                        expired[t][1] += samples
            self.conn.executemany("DELETE FROM batches WHERE rowid = ?", [(v[0],) for v in victims])
            # A table goes with the last stored batch that names it (batches_by_table): a
            # batch that names it later arrives with it again, or is answered unknown_table
            # and sent again with it.
            tables_deleted = 0
            for site, node, table in sorted(named):
                tables_deleted += self.conn.execute(
                    "DELETE FROM series_tables WHERE site = ?1 AND node = ?2 AND table_id = ?3 AND NOT EXISTS "
                    "(SELECT 1 FROM batches WHERE site = ?1 AND node = ?2 AND table_id = ?3)",
                    (site, node, table),
                ).rowcount
            for (site, node), seqs in by_node.items():
                held = self.conn.execute(
                    "SELECT first_seq, last_seq FROM retired WHERE site = ? AND node = ?", (site, node)
                ).fetchall()
                merged = merged_ranges([*held, *((q, q) for q in seqs)])
                self.conn.execute("DELETE FROM retired WHERE site = ? AND node = ?", (site, node))
                self.conn.executemany(
                    "INSERT INTO retired (site, node, first_seq, last_seq) VALUES (?, ?, ?, ?)",
                    [(site, node, a, b) for a, b in merged],
                )
            for t, (batches, samples) in expired.items():
                if batches:
                    self.conn.execute(
                        "INSERT INTO expired (target, batches, samples) VALUES (?, ?, ?) "
                        "ON CONFLICT (target) DO UPDATE SET batches = batches + excluded.batches, "
                        "samples = samples + excluded.samples",
                        (t, batches, samples),
                    )
            self.conn.execute(
                "INSERT INTO meta (k, v) VALUES ('pruned_batches', ?) "
                "ON CONFLICT (k) DO UPDATE SET v = CAST(v AS INTEGER) + excluded.v",
                (len(victims),),
            )
        if tables_deleted:
            # Durable table objects in the readers' caches may name a deleted row: from now
            # on each is put in the ledger again by the next commit that uses it.
            self._table_epoch += 1
        more = len(victims) == limit
        return Pruned(len(victims), freed, {t: (b, n) for t, (b, n) in expired.items() if b}, more,
                      tables_deleted)

    def _retired(self, site: str, node: str, first: int, last: int) -> int:
        """How many of seqs first..last were recorded and have left the archive."""
        total = 0
        for a, b in self.conn.execute(
            "SELECT first_seq, last_seq FROM retired WHERE site = ? AND node = ? AND first_seq <= ? "
            "AND last_seq >= ?", (site, node, last, first),
        ):
            total += min(b, last) - max(a, first) + 1
        return total

    def _apply(self, n: _Node, sub: Submission) -> tuple[str, str]:
        frame = sub.frame
        h = frame.header
        digest = wire.batch_hash(frame.raw)
        neighbours = {
            seq: (bytes(hsh), bytes(prev))
            for seq, hsh, prev in self.conn.execute(
                "SELECT seq, hash, prev_hash FROM batches "
                "WHERE site = ? AND node = ? AND seq BETWEEN ? AND ?",
                (h.site, h.node, h.seq - 1, h.seq + 1),
            )
        }
        stored = neighbours.get(h.seq)
        if stored is not None:
            if stored[0] == digest:
                return "duplicate", f"seq {h.seq} is already recorded"
            n.conflicts += 1
            detail = f"seq {h.seq} is already recorded with different content"
            if sub.origin == "bundle":
                # Over HTTP a new spool asks for the chain head before sending; a carried
                # bundle's node may never have, and only a receipt can tell it.
                site, node = shlex.quote(h.site), shlex.quote(h.node)
                detail += (f"; if {h.site}/{h.node} was reinstalled or lost its spool, it numbers from seq 1 again: "
                           f"run `waystation-collector receipt --site {site} --node {node} --out FILE` here and "
                           "`waystation-agent import-receipt FILE` on the node (it renumbers), then export again")
            return "conflict", detail
        if self._retired(h.site, h.node, h.seq, h.seq):
            # Its batch left the archive (retention): it was recorded; taking it again would
            # count and forward it twice. Its hash is gone, so a conflict cannot be told.
            return _PRUNED, f"seq {h.seq} was recorded and has since left the archive (hash not kept)"
        # The key as it stands now, in this transaction: a revocation committed while the
        # batch was being verified still stops it.
        current = trust.lookup(self.conn, h.key_id)
        refused = current.refusal(h.site, h.node, h.seq) if current else ("unknown_key", "key no longer enrolled")
        if refused is not None:
            return refused
        if h.seq == 1 and h.prev_hash != wire.ZERO_HASH:
            n.chain_breaks += 1
            return "chain_mismatch", "seq 1 must carry a zero prev_hash (it starts the chain)"
        before = neighbours.get(h.seq - 1)
        if before is not None and before[0] != h.prev_hash:
            n.chain_breaks += 1
            return "chain_mismatch", f"prev_hash does not match the recorded seq {h.seq - 1}"
        after = neighbours.get(h.seq + 1)
        if after is not None and after[1] != digest:
            n.chain_breaks += 1
            return "chain_mismatch", f"the recorded seq {h.seq + 1} names a different prev_hash"

        if sub.rotation is not None:
            try:
                trust.rotate(self.conn, sub.key, sub.rotation.new_public_key, h.seq, sub.received_at)
            except TrustError as exc:
                return "conflict", str(exc)

        if h.kind == wire.Kind.DATA and h.version == wire.WIRE_VERSION_2 and sub.table is None:
            # The invariant: no v2 data batch is held without the table it names.
            raise ValueError("a v2 data batch submitted without the series table it names")
        self.conn.execute(
            _INSERT_BATCH,
            (
                h.site, h.node, h.seq, int(h.kind), digest, h.prev_hash, h.key_id,
                sub.received_at, h.created_wall_ms, h.window_start_ms, h.window_end_ms,
                h.series_count, h.sample_count, len(frame.raw), frame.raw, sub.origin, sub.origin_file,
                sub.table.id if sub.table is not None else None,
            ),
        )
        if not n.first_seen:
            n.first_seen = sub.received_at
        n.last_seen = max(n.last_seen, sub.received_at)
        n.highest_seq = max(n.highest_seq, h.seq)
        n.stored_batches += 1
        n.stored_samples += h.sample_count
        n.accounted.add(h.seq, h.seq)
        if sub.drop is not None:
            samples = sub.drop.samples
            for first, last in sub.drop.ranges:
                self.conn.execute(
                    "INSERT OR IGNORE INTO drops (site, node, receipt_seq, first_seq, last_seq, "
                    "samples) VALUES (?, ?, ?, ?, ?, ?)",
                    (h.site, h.node, h.seq, first, last, samples),
                )
                samples = 0
                n.accounted.add(first, last)
            # The node cannot know which of its evicted batches the collector got before an
            # ack was lost: only those not recorded here are lost. (One still on the way
            # when the receipt arrives is counted as lost: the dropped counters never go
            # back down, or Prometheus would read a counter reset as fresh loss.)
            named = recorded_batches = recorded_samples = 0
            for first, last in merged_ranges(sub.drop.ranges):
                count, sampled = self.conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(sample_count), 0) FROM batches "
                    "WHERE site = ? AND node = ? AND seq BETWEEN ? AND ?", (h.site, h.node, first, last),
                ).fetchone()
                named += last - first + 1
                recorded_batches += count + self._retired(h.site, h.node, first, last)
                recorded_samples += sampled
            # Saturating: receipts may claim counts near 2**63, and SQLite stores signed 64 bits.
            lost_batches = max(0, min(sub.drop.batches, named) - recorded_batches)
            n.dropped_batches = min(wire.I64_MAX, n.dropped_batches + lost_batches)
            n.dropped_samples = min(wire.I64_MAX, n.dropped_samples + max(0, sub.drop.samples - recorded_samples))
        if sub.backlog is not None and h.seq >= n.backlog_seq:
            n.backlog_batches, n.backlog_bytes = sub.backlog
            n.backlog_seq = h.seq
        return "accepted", f"seq {h.seq} recorded"


def read_chain_head(conn: sqlite3.Connection, site: str, node: str) -> tuple[int, bytes] | None:
    """(highest seq + 1, hash of the highest batch) held for a node, or None if it never sent.

    An agent whose spool is new asks for this before sending, so it never reuses a seq."""
    row = conn.execute(
        "SELECT seq, hash FROM batches WHERE site = ? AND node = ? ORDER BY seq DESC LIMIT 1",
        (site, node),
    ).fetchone()
    return None if row is None else (int(row[0]) + 1, bytes(row[1]))


def read_link(conn: sqlite3.Connection, site: str, node: str, seq: int) -> tuple[bytes, bytes] | None:
    """(hash, prev_hash) of the batch stored for a node at seq; None if none is (never
    recorded, or retired by retention: its hash is gone)."""
    row = conn.execute(
        "SELECT hash, prev_hash FROM batches WHERE site = ? AND node = ? AND seq = ?", (site, node, seq)
    ).fetchone()
    return None if row is None else (bytes(row[0]), bytes(row[1]))


def read_nodes(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every node the ledger knows (seen or only enrolled), for /v1/nodes and `nodes`."""
    states = {
        (s.site, s.node): s
        for s in map(_state_from_row, conn.execute(f"SELECT {_NODE_COLUMNS} FROM nodes"))
    }
    keys: dict[tuple[str, str], list[KeyRecord]] = {}
    for k in trust.all_keys(conn):
        keys.setdefault((k.site, k.node), []).append(k)
    out: list[dict[str, Any]] = []
    for site, node in sorted(set(states) | set(keys)):
        s = states.get((site, node)) or NodeState(site, node)
        out.append(
            {
                "site": site,
                "node": node,
                "first_seen": s.first_seen or None,
                "last_seen": s.last_seen or None,
                "complete_through": s.complete_through,
                "highest_seq": s.highest_seq,
                "gaps": {"seqs": s.gap_seqs, "ranges": [list(r) for r in s.gap_ranges]},
                "stored_batches": s.stored_batches,
                "stored_samples": s.stored_samples,
                "dropped_batches": s.dropped_batches,
                "dropped_samples": s.dropped_samples,
                "tamper_events": {"conflicts": s.conflicts, "chain_breaks": s.chain_breaks},
                "reported_backlog": {"batches": s.backlog_batches, "bytes": s.backlog_bytes},
                "keys": [k.to_json() for k in keys.get((site, node), [])],
            }
        )
    return out


def used_bytes(conn: sqlite3.Connection) -> int:
    """The database's size without its free pages (deleted rows' pages are reused)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * conn.execute("PRAGMA page_size").fetchone()[0])


def forward_done(conn: sqlite3.Connection, targets: Iterable[str]) -> dict[str, IntervalSet]:
    """Each target's forwarded batch row ids, as last saved by the forwarder (empty if none)."""
    out: dict[str, IntervalSet] = {}
    for t in targets:
        row = conn.execute("SELECT done FROM forward_targets WHERE target = ?", (t,)).fetchone()
        out[t] = IntervalSet.from_json(row[0]) if row is not None else IntervalSet()
    return out


def held_ranges(conn: sqlite3.Connection, site: str, node: str) -> list[tuple[int, int]]:
    """The seq ranges recorded for a node, still stored or since retired (retention): what
    a receipt may tell the node to forget. Seqs named only by a drop receipt are not held."""
    ranges = [(int(a), int(b)) for a, b in conn.execute(_ISLANDS, (site, node))]
    ranges += [(int(a), int(b)) for a, b in conn.execute(
        "SELECT first_seq, last_seq FROM retired WHERE site = ? AND node = ?", (site, node))]
    return merged_ranges(ranges)


def complete_through(conn: sqlite3.Connection, site: str, node: str) -> int:
    """A node's complete-through watermark as last committed (0: never seen)."""
    row = conn.execute("SELECT complete_through FROM nodes WHERE site = ? AND node = ?", (site, node)).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Standing:
    """What the collector holds for one node, as a receipt states it."""

    held: list[tuple[int, int]]
    complete_through: int
    head: tuple[int, bytes]  # (highest seq held, its chain hash); (0, zeros) if none


def standing(conn: sqlite3.Connection, site: str, node: str) -> Standing:
    """A node's held ranges, watermark and chain head, read in one read transaction (one
    consistent snapshot beside a running serve)."""
    conn.execute("BEGIN")
    try:
        head = read_chain_head(conn, site, node)
        return Standing(held_ranges(conn, site, node), complete_through(conn, site, node),
                        (0, wire.ZERO_HASH) if head is None else (head[0] - 1, head[1]))
    finally:
        conn.execute("COMMIT")


def issue_receipt(conn: sqlite3.Connection, site: str, node: str,
                  sign: Callable[[int, Standing], bytes]) -> bytes:
    """Sign one receipt for a node and record it in receipts_issued; returns its bytes.

    The node's standing is read first, outside the write lock (the held ranges of a large
    node take a while and serve's commits must not wait for them). Then one short write
    transaction allocates the next receipt number, has `sign` build the receipt with it and
    records it: a number is never used twice (beside a running serve, another import or
    another `receipt`, SQLite's write lock serializes them) and no receipt leaves unrecorded."""
    facts = standing(conn, site, node)
    with immediate(conn):
        # One statement at a time: executescript would COMMIT the transaction first.
        for statement in RECEIPTS_ISSUED_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        row = conn.execute("SELECT v FROM meta WHERE k = 'receipt_no'").fetchone()
        number = (int(row[0]) if row else 0) + 1
        conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('receipt_no', ?)", (str(number),))
        raw = sign(number, facts)
        r = bundle.parse_receipt(raw)
        if (r.receipt_no, r.site, r.node) != (number, site, node):
            raise ValueError(f"receipt built for {r.site}/{r.node} number {r.receipt_no}, not {site}/{node} {number}")
        conn.execute(
            "INSERT INTO receipts_issued (receipt_no, issued_ms, site, node, collector_key_id, complete_through, "
            "head_seq, bundles, batches, receipt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (number, r.issued_ms, site, node, r.collector_key_id, r.complete_through, r.head_seq,
             len(r.bundles), r.n_batches, raw),
        )
    return raw


def count_receipts_issued(conn: sqlite3.Connection, site: str | None = None, node: str | None = None) -> int:
    """How many receipts the collector recorded issuing (for one site and/or node); 0 for a
    ledger no collector with receipts_issued has opened yet."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'receipts_issued'").fetchone() is None:
        return 0
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM receipts_issued WHERE (?1 IS NULL OR site = ?1) AND (?2 IS NULL OR node = ?2)",
        (site, node),
    ).fetchone()
    return int(count)
