"""The on-disk store-and-forward queue: signed batches wait here until the collector acks them.

One SQLite file in WAL mode. A batch's seq and chain position are allocated in the
same transaction that stores it, so a crash mid-write leaves neither a gap nor a
reused seq. Rows move pending -> inflight (claimed by one uplink lane) -> deleted on
ack; a lane that fails releases its claim, and claims left by a killed process are
recovered at open. When the byte quota is full the oldest unsent batches are evicted
and a signed drop receipt is appended in the same transaction.

Who calls what: the agent's main loop calls `append`; the uplink lanes call
`claim_*`, `ack`, `release`, `reject`, each from its own thread, each with its own
connection (a Spool is not shared between threads; open one per thread). The CLI, in its
own process beside a running agent: `export` reads `unacknowledged` in one read
transaction (claims and deletes nothing); `import-receipt` calls `resume_from_receipt`
(a new spool: renumber above the collector's chain head, like the uplink's `resume`) and
then `apply_receipt`, a series of short write transactions (RECEIPT_CHUNK rows each) so a
running agent's appends and acks never wait long behind it.

Series tables (wire v2): a v2 data batch names its series table by id (batches.table_id);
the table's bytes as carried are kept in `tables`, stored in the same transaction as the
first batch that names it (sealed when sealing is on: what is stored is exactly what is
sent, so the spool never holds a clear table the collector's key was meant to hide), and
deleted with the last batch that names it (ack, receipt, eviction, the trim of rejected
batches). The uplink sends a table with a batch while the collector is not known to hold
it; an export writes each table once, ahead of the first frame that names it.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import time
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

import wire
from wire.keys import CollectorKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'inflight', 'rejected')),
    created_ms INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    claimed_ms INTEGER,
    reject_reason TEXT,
    frame BLOB NOT NULL,
    table_id BLOB
);
CREATE INDEX IF NOT EXISTS batches_state ON batches (state, seq);
CREATE TABLE IF NOT EXISTS tables (
    id BLOB PRIMARY KEY,
    blob BLOB NOT NULL,
    created_ms INTEGER
);
CREATE TABLE IF NOT EXISTS applied_receipts (
    collector_key_id BLOB NOT NULL,
    receipt_no INTEGER NOT NULL,
    applied_ms INTEGER NOT NULL,
    PRIMARY KEY (collector_key_id, receipt_no)
) WITHOUT ROWID;
"""

_PENDING = "SELECT seq, kind, frame, window_end_ms, table_id FROM batches WHERE state = 'pending' "
_NEWEST_PENDING = _PENDING + "AND seq > ? ORDER BY seq DESC LIMIT 1"
_OLDEST_PENDING = _PENDING + "AND seq > ? ORDER BY seq ASC LIMIT 1"

MAX_REJECTED_KEPT = 100

# Receipt rows checked and deleted per write transaction: a chunk is a few milliseconds of
# SELECT + SHA-256, so a running agent's appends and acks wait that long, not the whole apply.
RECEIPT_CHUNK = 1000
# Applied receipt numbers remembered per collector key: within them, an exact replay is told
# apart from an older receipt not yet applied (receipts may be carried back in any order).
RECEIPTS_REMEMBERED = 64

_COUNTERS = (
    "produced_batches",
    "produced_samples",
    "acked_batches",
    "acked_bytes",
    "dropped_batches",
    "dropped_samples",
    "rejected_batches",
)


# What a receipt's chain head did to a spool (Resumption.outcome):
NOT_NEEDED = "not_needed"  # the spool already follows the collector's chain
NOTHING_HELD = "nothing_held"  # the collector holds nothing of the node: seq 1 on stands
OWN_CHAIN = "own_chain"  # the collector's head is this spool's own batch: nothing to move
RENUMBERED = "renumbered"  # the spool's batches now follow the collector's head
UNDECIDED = "undecided"  # nothing left in the spool tells whose the head is: the flag stays
STALE = "stale"  # the receipt predates this spool and answers none of its bundles: nothing moves


@dataclass(frozen=True)
class Resumption:
    outcome: str
    moved: int = 0  # batches renumbered (RENUMBERED)


class ReceiptReplayed(Exception):
    """A receipt already applied here (or older than every one remembered); nothing was deleted."""


def _receipt_key(collector_key_id: bytes) -> str:
    return f"receipt_no:{collector_key_id.hex()}"


@dataclass(frozen=True)
class Claimed:
    seq: int
    kind: int
    frame: bytes
    window_end_ms: int
    # A v2 data batch's series table: its id and its bytes as carried (sealed when the batch
    # is); None for v1 batches, drop receipts and key rotations.
    table_id: bytes | None = None
    table: bytes | None = None


@dataclass(frozen=True)
class SpoolStats:
    pending_batches: int
    pending_bytes: int
    inflight_batches: int
    rejected_batches: int
    oldest_unsent_ms: int | None
    newest_unsent_ms: int | None
    next_seq: int
    last_ack_ms: int | None
    collector_complete_through: int | None
    last_error: str | None
    last_error_ms: int | None
    counters: dict[str, int]


class Spool:
    """A connection to the spool file; one per thread."""

    def __init__(self, path: Path, *, timeout_s: float = 30.0, readonly: bool = False) -> None:
        self.path = path
        if readonly:  # `status`: works for any user who can read the file, never takes the lock
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s,
                                      isolation_level=None)
            # Read as it is: a spool made before series tables has no table_id (nothing names one).
            self._tabled = "table_id" in self._columns()
            return
        self.db = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None)
        # Three connections (main loop, two lanes) each keep a page cache: 2 MB apiece by
        # default. The agent appends and reads a row at a time; 256 KiB is plenty.
        self.db.execute("PRAGMA cache_size=-256")
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed seq must survive power loss, or it could be reused after it was sent.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        with self._write() as db:
            if "table_id" not in self._columns():  # a spool made before series tables (wire v2)
                db.execute("ALTER TABLE batches ADD COLUMN table_id BLOB")
            db.execute("CREATE INDEX IF NOT EXISTS batches_table ON batches (table_id) WHERE table_id IS NOT NULL")
            # Tables no batch names (one whose last batch went while an older version ran).
            db.execute("DELETE FROM tables WHERE id NOT IN "
                       "(SELECT table_id FROM batches WHERE table_id IS NOT NULL)")
            if self._meta("next_seq") is None and self._meta("resume_needed") is None:
                # A new spool on a node that may have sent before (reinstalled, state lost):
                # its seqs must be placed above what the collector already holds.
                self._set_meta("resume_needed", 1)
                # A receipt issued before this spool existed cannot say where the
                # collector's chain stands now (see resume_from_receipt).
                self._set_meta("created_ms", int(time.time() * 1000))
        self._tabled = True

    def close(self) -> None:
        self.db.close()

    def _columns(self) -> set[str]:
        return {str(row[1]) for row in self.db.execute("PRAGMA table_info(batches)")}

    def _forget_tables(self, ids: Iterable[bytes | None]) -> None:
        """Delete those of these tables that no batch names any more (an index lookup each)."""
        for tid in {i for i in ids if i is not None}:
            self.db.execute("DELETE FROM tables WHERE id = ? AND NOT EXISTS "
                            "(SELECT 1 FROM batches WHERE table_id = ?)", (tid, tid))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (full disk, I/O error) may leave the transaction open.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _meta(self, key: str, default: object = None) -> object:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _meta_int(self, key: str, default: int) -> int:
        value = self._meta(key)
        return default if value is None else int(value)  # type: ignore[call-overload]

    def _set_meta(self, key: str, value: object) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _bump(self, key: str, by: int) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (key, by),
        )

    def resume_needed(self) -> bool:
        return bool(self._meta("resume_needed", 0))

    def resume(self, key: SigningKey, site: str, node: str, next_seq: int, prev_hash: bytes) -> int:
        """Renumber every stored batch so the chain continues the collector's at next_seq.

        Called once for a new spool, before anything is sent, with what the collector says
        it holds for this node. Every seq moves by the same amount, so gaps left by evicted
        batches stay gaps and the drop receipts that cover them still name them. Rows are
        re-signed one at a time (a full spool is hundreds of MB); returns how many moved."""
        moved = self._resume(key, site, node, next_seq, prev_hash)
        return 0 if moved is None else moved

    def _resume(self, key: SigningKey, site: str, node: str, next_seq: int, prev_hash: bytes) -> int | None:
        """`resume`; None if the spool no longer needed it (another process resumed it first)."""
        with self._write() as db:
            if not self._meta("resume_needed", 0):
                return None
            own_next, _ = self._chain_head()
            shift = next_seq - 1  # a new spool numbered everything it made, evicted or not, from 1
            moved = 0
            if shift > 0:
                # Two steps through negative seqs so no row ever lands on one not yet moved.
                db.execute("UPDATE batches SET seq = -seq")
                db.execute("UPDATE batches SET seq = ? - seq", (shift,))
                prev = prev_hash
                seqs = [r[0] for r in db.execute("SELECT seq FROM batches ORDER BY seq")]
                for seq in seqs:
                    (frame,) = db.execute("SELECT frame FROM batches WHERE seq = ?", (seq,)).fetchone()
                    old = wire.parse_frame(frame)
                    ctx = wire.BatchContext(key, site, node, seq, prev, old.header.created_wall_ms,
                                            old.header.created_mono_ns)
                    if old.header.kind == wire.Kind.DROP_RECEIPT:
                        r = wire.decode_drop_receipt(old.payload)
                        shifted = tuple((a + shift, b + shift) for a, b in r.ranges)
                        raw = wire.encode_drop_receipt(ctx, dataclasses.replace(r, ranges=shifted))
                    else:
                        raw = wire.resign_batch(old, ctx)
                    db.execute("UPDATE batches SET frame = ?, bytes = ?, state = 'pending' WHERE seq = ?",
                               (raw, len(raw), seq))
                    prev = wire.batch_hash(raw)
                    moved += 1
                self._set_meta("next_seq", own_next + shift)
                self._set_meta("last_hash", prev)
            self._set_meta("resume_needed", 0)
            return moved

    def resume_from_receipt(
        self, key: SigningKey, site: str, node: str, head: tuple[int, bytes], batches: Iterable[tuple[int, bytes]],
        issued_ms: int | None = None, bundles: Iterable[bytes] = (), force: bool = False,
    ) -> Resumption:
        """Where HTTP asks the collector for its chain head (`resume`), an air-gapped node has
        only the head a verified receipt states (highest seq held, its hash; (0, zeros): none):
        place this spool's batches above it, unless that head is this spool's own chain.

        A new spool cannot tell by its flag alone whether the node sent before: a brand-new
        node's first receipt names the spool's own batches, and renumbering those would
        record them twice. So the head is compared with the spool first (`_head_is_own`);
        when the spool holds nothing left to compare, the flag stays and nothing moves."""
        if not self.resume_needed():
            return Resumption(NOT_NEEDED)
        head_seq, head_hash = head
        # A receipt from before this spool (the node's previous install, an old stick) states
        # a head the collector has since passed: placing the spool there would reuse seqs.
        # One that answers a bundle this spool exported is fresh whatever the clocks say.
        created = self._meta("created_ms")
        if (issued_ms is not None and created is not None and issued_ms < int(created)  # type: ignore[call-overload]
                and not force and not set(bundles) & self.exported_bundles()):
            return Resumption(STALE)
        if head_seq == 0:  # the collector holds nothing of this node: numbering from 1 stands
            return Resumption(NOTHING_HELD if self._resume(key, site, node, 1, wire.ZERO_HASH) is not None
                              else NOT_NEEDED)
        own = self._head_is_own(head_seq, head_hash, batches)
        if own is None and self._lowest_seq() > head_seq + 1 and self._meta_int("exported_through", 0) <= head_seq:
            # Everything at and next to the head was evicted: nothing tells whose the head is,
            # and a bundle starting above head+1 would be refused (unplaced_gap) for ever.
            # This spool never exported past the head, so the collector holds none of its
            # batches above it: follow the head, as the uplink does over HTTP. No seq the
            # collector holds is reused and nothing is recorded twice; if the head was this
            # spool's own, the evicted seqs between it and the kept ones are named dropped
            # once more than they were (a count, not data).
            own = False
        if own is None:
            return Resumption(UNDECIDED)
        if own:
            with self._write():
                was_needed = bool(self._meta("resume_needed", 0))
                self._set_meta("resume_needed", 0)
            return Resumption(OWN_CHAIN if was_needed else NOT_NEEDED)
        moved = self._resume(key, site, node, head_seq + 1, head_hash)
        return Resumption(NOT_NEEDED) if moved is None else Resumption(RENUMBERED, moved)

    def note_exported(self, through_seq: int, manifest_hash: bytes) -> None:
        """`export` wrote a bundle up to through_seq: a receipt answering it is fresh, and
        the collector may hold this spool's batches up to there."""
        with self._write():
            self._set_meta("exported_through", max(self._meta_int("exported_through", 0), through_seq))
            recent = [h for h in str(self._meta("exported_bundles", "") or "").split(",") if h]
            recent = ([manifest_hash.hex()] + [h for h in recent if h != manifest_hash.hex()])[:64]
            self._set_meta("exported_bundles", ",".join(recent))

    def exported_bundles(self) -> set[bytes]:
        """Manifest hashes of the newest 64 bundles exported from this spool."""
        return {bytes.fromhex(h) for h in str(self._meta("exported_bundles", "") or "").split(",") if h}

    def _lowest_seq(self) -> int:
        """The lowest seq the spool still holds (rejected rows too); a huge number when empty."""
        row = self.db.execute("SELECT MIN(seq) FROM batches").fetchone()
        return int(row[0]) if row and row[0] is not None else 2**63

    def _head_is_own(self, head_seq: int, head_hash: bytes, batches: Iterable[tuple[int, bytes]]) -> bool | None:
        """Whether the collector's chain head (and the batches a receipt names as held) are this
        spool's own chain; None when the spool no longer holds anything that tells. One read
        transaction: a running agent's appends and evictions wait for nothing."""
        self.db.execute("BEGIN")
        try:
            for seq, digest in batches:
                row = self.db.execute("SELECT frame FROM batches WHERE seq = ?", (seq,)).fetchone()
                if row is not None and wire.batch_hash(bytes(row[0])) == digest:
                    return True  # the collector holds one of this spool's batches
            next_seq, last_hash = self._chain_head()
            if head_seq >= next_seq:
                return False  # a seq this spool never signed
            if head_seq == next_seq - 1:
                return last_hash == head_hash
            row = self.db.execute("SELECT frame FROM batches WHERE seq = ?", (head_seq,)).fetchone()
            if row is not None:
                return wire.batch_hash(bytes(row[0])) == head_hash
            # The batch after it names it: every frame carries its predecessor's hash.
            row = self.db.execute("SELECT frame FROM batches WHERE seq = ?", (head_seq + 1,)).fetchone()
            if row is not None:
                return bool(wire.parse_frame(bytes(row[0])).header.prev_hash == head_hash)
            return None
        finally:
            if self.db.in_transaction:
                self.db.execute("COMMIT")

    def recover_claims(self) -> int:
        """Return batches claimed by a process that died to the pending state; call once at start."""
        with self._write() as db:
            return db.execute("UPDATE batches SET state = 'pending', claimed_ms = NULL "
                              "WHERE state = 'inflight'").rowcount

    # ------------------------------------------------------------------ producer side

    def append_data(
        self,
        key: SigningKey,
        site: str,
        node: str,
        series: list[wire.Series],
        max_bytes: int,
        now_ms: int | None = None,
        seal_to: CollectorKey | None = None,
        tables: wire.TableBuilder | None = None,
    ) -> int:
        """Sign series into the next batch of the chain and store it; returns its seq.

        With seal_to (the pinned collector key) the compressed payload is sealed to it first,
        so no metric name, label or value reaches the spool file (or its WAL) in clear.

        With `tables` (the producer's TableBuilder, which lives as long as the producer) the
        batch is wire v2: the series are placed in the builder's current table (sealed to
        seal_to too) and the batch names it; a table the spool does not hold yet is stored
        in the same transaction. Without it, a v1 batch that carries its own names. An empty
        batch is v1 either way: it names no series, so it needs no table."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        # Encode, compress and seal outside the lock.
        table: wire.CurrentTable | None = None
        if tables is not None and series:
            table, placed = tables.place(series, seal_to=seal_to)
            prepared = wire.prepare_columns(table, placed, empty_window_ms=now_ms)
        else:
            prepared = wire.prepare_data(series, empty_window_ms=now_ms)
        if seal_to is not None:
            prepared = wire.seal_prepared(prepared, seal_to)
        with self._write() as db:
            seq, prev = self._chain_head()
            frame = wire.sign_batch(
                prepared, wire.BatchContext(key, site, node, seq, prev, now_ms, time.monotonic_ns())
            )
            parsed = wire.parse_frame(frame)
            if table is not None:
                # Written only when missing: a table is stored once, however many batches name it.
                db.execute("INSERT OR IGNORE INTO tables (id, blob, created_ms) VALUES (?, ?, ?)",
                           (table.id, table.blob, now_ms))
            self._insert(parsed, frame, now_ms, None if table is None else table.id)
            self._bump("produced_samples", parsed.header.sample_count)
            self._evict_over_quota(key, site, node, max_bytes, now_ms)
        return seq

    def append_key_rotation(self, old: SigningKey, new: SigningKey, site: str, node: str) -> int:
        """Announce `new` in the chain, signed by `old`; later batches must be signed by `new`.

        Idempotent per new key: the spool remembers which key it announced, so an agent that
        died between announcing and switching key files does not announce it twice."""
        now_ms = int(time.time() * 1000)
        new_id = wire.key_id(bytes(new.verify_key))
        with self._write():
            if self._meta("announced_key") == new_id:
                return 0
            seq, prev = self._chain_head()
            frame = wire.encode_key_rotation(
                wire.BatchContext(old, site, node, seq, prev, now_ms, time.monotonic_ns()), new
            )
            self._insert(wire.parse_frame(frame), frame, now_ms)
            self._set_meta("announced_key", new_id)
        return seq

    def _chain_head(self) -> tuple[int, bytes]:
        next_seq = self._meta_int("next_seq", 1)
        prev = self._meta("last_hash", wire.ZERO_HASH)
        assert isinstance(prev, bytes)
        return next_seq, prev

    def _insert(self, frame: wire.Frame, raw: bytes, now_ms: int, table_id: bytes | None = None) -> None:
        h = frame.header
        self.db.execute(
            "INSERT INTO batches (seq, kind, state, created_ms, window_start_ms, window_end_ms, "
            "samples, bytes, frame, table_id) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
            (h.seq, int(h.kind), now_ms, h.window_start_ms, h.window_end_ms, h.sample_count,
             len(raw), raw, table_id),
        )
        self._set_meta("next_seq", h.seq + 1)
        self._set_meta("last_hash", wire.batch_hash(raw))
        self._bump("produced_batches", 1)

    def _evict_over_quota(
        self, key: SigningKey, site: str, node: str, max_bytes: int, now_ms: int
    ) -> None:
        (total,) = self.db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM batches WHERE state != 'rejected'"
        ).fetchone()
        # Series tables count too: while series churn during an outage, each new table is a
        # full copy of the node's identities, kept as long as a batch names it.
        table_bytes = {bytes(tid): int(n) for tid, n in self.db.execute("SELECT id, length(blob) FROM tables")}
        total += sum(table_bytes.values())
        if total <= max_bytes:
            return
        # Newest batch stays: it is what the dashboards need first. Receipts are never evicted.
        (newest,) = self.db.execute("SELECT MAX(seq) FROM batches").fetchone()
        # How many batches name each table: a table's bytes are freed with the last of them.
        naming = {bytes(tid): int(n) for tid, n in self.db.execute(
            "SELECT table_id, COUNT(*) FROM batches WHERE table_id IS NOT NULL GROUP BY table_id")}
        victims: list[tuple[int, int, int, int, int]] = []
        excess = total - max_bytes
        rows = self.db.execute(
            "SELECT seq, window_start_ms, window_end_ms, samples, bytes, table_id FROM batches "
            "WHERE state = 'pending' AND kind = ? AND seq != ? ORDER BY seq",
            (int(wire.Kind.DATA), newest),
        )
        freed: list[bytes] = []
        for *row, tid in rows:
            if excess <= 0:
                break
            victims.append((row[0], row[1], row[2], row[3], row[4]))
            excess -= row[4]
            if tid is not None:
                tid = bytes(tid)
                freed.append(tid)
                naming[tid] -= 1
                if naming[tid] == 0:
                    excess -= table_bytes.get(tid, 0)
        if not victims:
            return
        self.db.executemany("DELETE FROM batches WHERE seq = ?", [(v[0],) for v in victims])
        self._forget_tables(freed)
        self._append_receipt(key, site, node, victims, "spool_quota", now_ms)

    def _append_receipt(
        self,
        key: SigningKey,
        site: str,
        node: str,
        victims: list[tuple[int, int, int, int, int]],
        reason: str,
        now_ms: int,
    ) -> None:
        """Sign a drop receipt for (seq, window_start, window_end, samples, bytes) rows."""
        receipt = wire.DropReceipt(
            ranges=tuple(_ranges([v[0] for v in victims])),
            t0_ms=min(v[1] for v in victims),
            t1_ms=max(v[2] for v in victims),
            batches=len(victims),
            samples=sum(v[3] for v in victims),
            bytes=sum(v[4] for v in victims),
            reason=reason,
        )
        seq, prev = self._chain_head()
        frame = wire.encode_drop_receipt(
            wire.BatchContext(key, site, node, seq, prev, now_ms, time.monotonic_ns()), receipt
        )
        self._insert(wire.parse_frame(frame), frame, now_ms)
        self._bump("dropped_batches", receipt.batches)
        self._bump("dropped_samples", receipt.samples)

    # ------------------------------------------------------------------ uplink side

    def _claim(self, query: str, after_seq: int) -> Claimed | None:
        with self._write() as db:
            row = db.execute(query, (after_seq,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE batches SET state = 'inflight', claimed_ms = ? WHERE seq = ?",
                (int(time.time() * 1000), row[0]),
            )
            tid = None if row[4] is None else bytes(row[4])
            table = None if tid is None else self.table_blob(tid)
        return Claimed(row[0], row[1], row[2], row[3], tid, table)

    def table_blob(self, table_id: bytes) -> bytes | None:
        """A stored series table's bytes as carried; None if the spool does not hold it."""
        if not self._tabled:
            return None
        row = self.db.execute("SELECT blob FROM tables WHERE id = ?", (table_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def claim_newest_after(self, after_seq: int) -> Claimed | None:
        """Live lane: the freshest unsent batch newer than after_seq, so dashboards are current."""
        return self._claim(_NEWEST_PENDING, after_seq)

    def claim_oldest(self) -> Claimed | None:
        """Backfill lane: the oldest unsent batch."""
        return self._claim(_OLDEST_PENDING, 0)

    def ack(self, seq: int, complete_through: int | None) -> None:
        """The collector holds seq durably: forget it."""
        now_ms = int(time.time() * 1000)
        with self._write() as db:
            row = db.execute("SELECT bytes, table_id FROM batches WHERE seq = ?", (seq,)).fetchone()
            db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            if row is not None:
                self._bump("acked_batches", 1)
                self._bump("acked_bytes", row[0])
                self._forget_tables([row[1]])
            self._set_meta("last_ack_ms", now_ms)
            if complete_through is not None:
                # Two lanes ack out of order; the watermark only ever moves forward.
                known = self._meta_int("collector_complete_through", 0)
                self._set_meta("collector_complete_through", max(known, complete_through))
            self._set_meta("last_error", None)

    def release(self, seq: int, error: str | None = None) -> None:
        """Delivery failed; the batch goes back to pending for a later try."""
        with self._write() as db:
            db.execute("UPDATE batches SET state = 'pending', claimed_ms = NULL WHERE seq = ? "
                       "AND state = 'inflight'", (seq,))
            if error is not None:
                self._record_error(error)

    def reject(
        self, seq: int, reason: str, receipt_by: tuple[SigningKey, str, str] | None = None
    ) -> None:
        """The collector refuses this batch for good; keep it for audit, never resend it.

        With receipt_by (key, site, node) a data batch the collector does not hold is also
        named in a drop receipt, so the collector's watermark can pass it and the loss is
        accounted; a batch refused as a conflict is not (the collector holds that seq)."""
        now_ms = int(time.time() * 1000)
        with self._write() as db:
            row = db.execute(
                "SELECT seq, window_start_ms, window_end_ms, samples, bytes, kind FROM batches "
                "WHERE seq = ? AND state != 'rejected'", (seq,)
            ).fetchone()
            if row is None:
                return
            db.execute("UPDATE batches SET state = 'rejected', reject_reason = ? WHERE seq = ?",
                       (reason, seq))
            self._bump("rejected_batches", 1)
            self._record_error(f"batch {seq} rejected by collector: {reason}")
            if receipt_by is not None and row[5] == wire.Kind.DATA:
                self._append_receipt(*receipt_by, [row[:5]], "rejected", now_ms)
            # Keep a bounded audit trail: the newest rejected batches only.
            trimmed = db.execute(
                "SELECT seq, table_id FROM batches WHERE state = 'rejected' ORDER BY seq DESC LIMIT -1 OFFSET ?",
                (MAX_REJECTED_KEPT,),
            ).fetchall()
            db.executemany("DELETE FROM batches WHERE seq = ?", [(t[0],) for t in trimmed])
            self._forget_tables(t[1] for t in trimmed)

    def note_error(self, error: str) -> None:
        """A delivery problem no batch was claimed for (the first contact failed): `status`
        shows it until the next ack."""
        with self._write():
            self._record_error(error)

    def _record_error(self, error: str) -> None:
        self._set_meta("last_error", error)
        self._set_meta("last_error_ms", int(time.time() * 1000))

    # ------------------------------------------------------------------ air gap

    def unacknowledged(self) -> Generator[tuple[int, bytes], None, None]:
        """(seq, frame) of every batch not yet acknowledged (pending or claimed by a lane),
        oldest first, read in one read transaction: a consistent snapshot beside a running
        agent (WAL), never claiming or deleting anything. Close the generator when done."""
        rows = self.unacknowledged_named()
        try:
            for seq, frame, _ in rows:
                yield seq, frame
        finally:
            rows.close()

    def unacknowledged_named(self) -> Generator[tuple[int, bytes, bytes | None], None, None]:
        """`unacknowledged`, with the id of the series table each batch names (None: none).
        While the generator is open, `table_blob` reads the same snapshot (one connection,
        one read transaction), so every table a yielded batch names is there."""
        self.db.execute("BEGIN")
        named = "table_id" if self._tabled else "NULL"
        try:
            for seq, frame, tid in self.db.execute(
                f"SELECT seq, frame, {named} FROM batches WHERE state IN ('pending', 'inflight') ORDER BY seq"
            ):
                yield int(seq), bytes(frame), None if tid is None else bytes(tid)
        finally:
            if self.db.in_transaction:
                self.db.execute("COMMIT")

    def last_receipt(self, collector_key_id: bytes) -> int:
        """The number of the newest receipt of this collector key applied here (0: none)."""
        row = self.db.execute("SELECT MAX(receipt_no) FROM applied_receipts WHERE collector_key_id = ?",
                              (collector_key_id,)).fetchone()
        newest = 0 if row is None or row[0] is None else int(row[0])
        # Spools written before applied_receipts kept only the newest number, in meta.
        return max(newest, self._meta_int(_receipt_key(collector_key_id), 0))

    def _applied(self, collector_key_id: bytes) -> list[int]:
        """The receipt numbers of this collector key remembered as applied, newest first."""
        nos = [int(n) for (n,) in self.db.execute(
            "SELECT receipt_no FROM applied_receipts WHERE collector_key_id = ? ORDER BY receipt_no DESC",
            (collector_key_id,))]
        legacy = self._meta_int(_receipt_key(collector_key_id), 0)
        if legacy and legacy not in nos:
            nos = sorted([*nos, legacy], reverse=True)
        return nos

    def check_not_applied(self, collector_key_id: bytes, receipt_no: int) -> None:
        """ReceiptReplayed if a receipt with this number from this collector key may have been
        applied here already."""
        applied = self._applied(collector_key_id)
        if receipt_no in applied:
            raise ReceiptReplayed(
                f"receipt {receipt_no} of collector key {collector_key_id.hex()}: already applied here "
                "(replayed)"
            )
        if len(applied) >= RECEIPTS_REMEMBERED and receipt_no < applied[-1]:
            raise ReceiptReplayed(
                f"receipt {receipt_no} of collector key {collector_key_id.hex()} is older than the "
                f"{len(applied)} receipts remembered as applied here (oldest {applied[-1]}): it may "
                "have been applied already; ask the collector for a newer receipt"
            )

    def apply_receipt(
        self, collector_key_id: bytes, receipt_no: int, batches: Iterable[tuple[int, bytes]], complete_through: int
    ) -> tuple[int, int]:
        """Forget the batches a verified receipt names as held by the collector: a row goes
        only if its seq and its frame's hash both match, so a receipt can never delete a
        batch the collector does not hold (a different batch at the same seq stays).
        Returns (batches, bytes) deleted. Raises ReceiptReplayed, deleting nothing, for a
        receipt already applied from that collector key; receipts may come in any order.

        RECEIPT_CHUNK rows per write transaction, each like an ack, so a running agent is
        never held up for long: a lane that has one of these batches in flight finds it
        gone when its own ack or release comes (both are no-ops then). The receipt is
        recorded as applied only with the last chunk; an apply cut short deleted only rows
        the collector holds, and applying the receipt again finishes it. Rejected batches
        stay (kept for audit)."""
        self.check_not_applied(collector_key_id, receipt_no)
        deleted = size = 0
        rows = iter(batches)
        while chunk := list(itertools.islice(rows, RECEIPT_CHUNK)):
            with self._write() as db:
                chunk_deleted = chunk_size = 0
                named: list[bytes | None] = []
                for seq, digest in chunk:
                    row = db.execute("SELECT frame, table_id FROM batches WHERE seq = ? AND state != 'rejected'",
                                     (seq,)).fetchone()
                    if row is None or wire.batch_hash(bytes(row[0])) != digest:
                        continue
                    db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
                    chunk_deleted += 1
                    chunk_size += len(row[0])
                    named.append(row[1])
                self._forget_tables(named)
                if chunk_deleted:
                    # The collector holds this spool's own chain: nothing to renumber above it.
                    self._set_meta("resume_needed", 0)
                    self._bump("acked_batches", chunk_deleted)
                    self._bump("acked_bytes", chunk_size)
                deleted += chunk_deleted
                size += chunk_size
        with self._write() as db:
            known = self._meta_int("collector_complete_through", 0)
            self._set_meta("collector_complete_through", max(known, complete_through))
            # OR IGNORE: another import of this receipt may have finished meanwhile.
            db.execute("INSERT OR IGNORE INTO applied_receipts VALUES (?, ?, ?)",
                       (collector_key_id, receipt_no, int(time.time() * 1000)))
            legacy = self._meta_int(_receipt_key(collector_key_id), 0)
            if legacy:  # fold the old single number into the table
                db.execute("INSERT OR IGNORE INTO applied_receipts VALUES (?, ?, ?)",
                           (collector_key_id, legacy, int(time.time() * 1000)))
                db.execute("DELETE FROM meta WHERE key = ?", (_receipt_key(collector_key_id),))
            db.execute(
                "DELETE FROM applied_receipts WHERE collector_key_id = ? AND receipt_no NOT IN "
                "(SELECT receipt_no FROM applied_receipts WHERE collector_key_id = ? "
                "ORDER BY receipt_no DESC LIMIT ?)",
                (collector_key_id, collector_key_id, RECEIPTS_REMEMBERED),
            )
        return deleted, size

    # ------------------------------------------------------------------ reading

    def stats(self) -> SpoolStats:
        by_state = dict(
            (state, (n, b))
            for state, n, b in self.db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(bytes), 0) FROM batches GROUP BY state"
            )
        )
        oldest, newest = self.db.execute(
            "SELECT MIN(window_start_ms), MAX(window_end_ms) FROM batches "
            "WHERE state != 'rejected' AND kind = ?", (int(wire.Kind.DATA),)
        ).fetchone()
        pending = by_state.get("pending", (0, 0))
        inflight = by_state.get("inflight", (0, 0))

        def opt_int(key: str) -> int | None:
            return None if self._meta(key) is None else self._meta_int(key, 0)

        err = self._meta("last_error")
        return SpoolStats(
            pending_batches=pending[0] + inflight[0],
            pending_bytes=pending[1] + inflight[1],
            inflight_batches=inflight[0],
            rejected_batches=by_state.get("rejected", (0, 0))[0],
            oldest_unsent_ms=oldest,
            newest_unsent_ms=newest,
            next_seq=self._meta_int("next_seq", 1),
            last_ack_ms=opt_int("last_ack_ms"),
            collector_complete_through=opt_int("collector_complete_through"),
            last_error=None if err is None else str(err),
            last_error_ms=opt_int("last_error_ms"),
            counters={k: self._meta_int(k, 0) for k in _COUNTERS},
        )


def _ranges(seqs: list[int]) -> Iterator[tuple[int, int]]:
    """Collapse sorted seqs into inclusive contiguous ranges."""
    start = prev = seqs[0]
    for s in seqs[1:]:
        if s != prev + 1:
            yield start, prev
            start = s
        prev = s
    yield start, prev
