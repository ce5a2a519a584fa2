"""Re-verification of the ledger from its own bytes: signatures, the hash chain, every gap.

`audit()` reads the ledger through a read-only connection (WAL: beside a running `serve`,
or with none), one node at a time, each node in its own read transaction (one consistent
snapshot of that node's rows, keys, drops and retirements; the WAL can checkpoint between
nodes). It streams each node's rows in seq order and keeps, per node, only the previous
link and the seq ranges it has met (gaps, drop receipts, retirements), never the frames:
memory is bounded by the number of distinct gaps, not by the number of batches.

Per row it proves:
- the frame opens through `wire.open_batch` (the one verification path) with the key the
  ledger recorded for it (`trust.lookup_recorded`: a key revoked after the batch was
  recorded still verifies it; a key retired by a rotation only up to the rotation's seq;
  a key enrolled by a rotation only after it);
- the frame is the one the row says it is: the row's site, node and seq, and its other
  columns (hash, prev_hash, key id, kind, times, counts, size), equal the signed header;
- the chain: its `prev_hash` is the hash of the frame at seq - 1 (docs/wire.md §2; seq 1
  carries 32 zero bytes), and after a key rotation in the chain the next batches are
  signed with the key it announced;
- a drop receipt's ranges are the ones the ledger's drops table holds for it;
- a v2 data batch's series table is in `series_tables` (else `missing_table`: its samples
  cannot be read), and the row's table_id column is the table the signed payload names.
Per node it also proves that every stored series table's bytes hash to the id it is stored
under (else `table_mismatch`), reading one table at a time.
Then every seq from 1 to the node's highest that no row holds must be named by a verified
drop receipt or have left the archive by retention / the size cap (`retired`).

A frame that does not verify is reported once; the chain links to and from it are
counted as unchecked instead of being reported again. A sealed frame whose signature
verifies but whose payload this reader cannot decrypt (no collector keys passed to
`open_batch` yet) counts as proven for signature and chain, and is counted in
`sealed_unopened`; its drop receipt ranges, if it is one, are then taken from the drops
table. (Once the collector's keys are wired in, pass them to `open_batch` here.)

Thread contract: `audit()` is blocking and uses its own connection; call it from one thread.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import wire
from collector import ledger, trust
from collector.ledger import IntervalSet
from collector.tables import LedgerTables, has_series_tables

SQLITE_MAGIC = b"SQLite format 3\x00"

# Problem codes, besides the refusal results of wire.open_batch (bad_signature, unknown_key,
# revoked, malformed, schema, limit, too_large, ...), which are reported as they are.
DAMAGED = "damaged"  # the ledger file itself: truncated, not SQLite, unreadable pages
ROW_MISMATCH = "row_mismatch"  # a row's columns disagree with the frame it holds
CHAIN_BREAK = "chain_break"
KEY_MISMATCH = "key_mismatch"  # signed with another key than the chain's rotation announced
RECORDED_AFTER_REVOCATION = "recorded_after_revocation"
DROP_MISMATCH = "drop_mismatch"  # the drops table and the signed receipts disagree
MISSING = "missing"  # seqs no row holds, no drop receipt names, and retention did not retire
MISSING_TABLE = "missing_table"  # a v2 data batch whose series table the ledger does not hold
TABLE_MISMATCH = "table_mismatch"  # a stored series table whose bytes do not hash to its id
# Decoded series tables kept per node while its rows are read (a node names one table for
# many batches in a row); the rest are read again from the ledger.
AUDIT_TABLES = 8


@dataclass(frozen=True)
class Finding:
    """One problem: where (node, seq or seq range) and what is wrong."""

    site: str | None
    node: str | None
    seq: int | None
    problem: str
    detail: str
    through_seq: int | None = None  # the last seq of a range (missing seqs)

    def __str__(self) -> str:
        where = f"{self.site}/{self.node}" if self.site is not None else "ledger"
        if self.seq is not None:
            where += (
                f" seq {self.seq}"
                if self.through_seq in (None, self.seq)
                else (f" seqs {self.seq}..{self.through_seq}")
            )
        return f"{where}: {self.problem}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Progress:
    """Where a running audit stands (for a progress line on a large ledger)."""

    batches: int
    nodes_done: int
    nodes_total: int
    site: str
    node: str
    seq: int
    elapsed_s: float

    def __str__(self) -> str:
        return (
            f"audit: {self.batches:,} batches checked; node {self.nodes_done + 1}/{self.nodes_total} "
            f"{self.site}/{self.node} at seq {self.seq:,}; {self.elapsed_s:.0f} s"
        )


@dataclass
class AuditSummary:
    """What an audit covered and found (counts only: the findings go to `on_finding`)."""

    nodes: int = 0
    batches: int = 0
    data_batches: int = 0
    drop_receipts: int = 0
    key_rotations: int = 0
    tables: int = 0  # series tables stored for these nodes (wire v2), each checked against its id
    sealed_unopened: int = 0  # signature and chain proven, payload not decrypted
    links_checked: int = 0
    links_unchecked: int = 0  # seq - 1 not held (dropped, retired) or not verifiable
    seqs_dropped: int = 0  # missing seqs named by a drop receipt
    seqs_retired: int = 0  # missing seqs that left the archive by retention or size cap
    receipts_issued: int = 0  # air-gap receipts signed for these nodes (receipts_issued; not re-verified)
    findings: dict[str, int] = field(default_factory=dict)  # problem -> count
    elapsed_s: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean}


def file_problem(path: Path, recheck_s: float = 0.25) -> str | None:
    """Why the ledger file is damaged as a file (not SQLite, cut short), or None.

    A truncated copy is shorter than the page count its own header states. A checkpoint in
    progress may grow the file after writing the header: a short file is read again after
    `recheck_s` and only reported if it stays short."""
    problem = _file_problem_once(path)
    for _ in range(2):
        if problem is None or "truncated" not in problem:
            break
        time.sleep(recheck_s)
        problem = _file_problem_once(path)
    return problem


def _file_problem_once(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return f"{path} is not a SQLite database ({size} bytes, without SQLite's header)"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    header_size_valid = head[24:28] == head[92:96]  # SQLite's rule for the in-header size
    if header_size_valid and pages and size < pages * page_size:
        return (
            f"{path} is truncated: its header counts {pages} pages of {page_size} bytes "
            f"({pages * page_size} bytes), the file holds {size} bytes"
        )
    if page_size and size % page_size:
        return f"{path} is truncated: {size} bytes is not a whole number of {page_size}-byte pages"
    return None


class _Keys:
    """The recorded keys a node's frames name, read once each per node (a few per node)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._cache: dict[bytes, trust.RecordedKey | None] = {}

    def __call__(self, key_id: bytes) -> trust.RecordedKey | None:
        if key_id not in self._cache:
            self._cache[key_id] = trust.lookup_recorded(self.conn, key_id)
        return self._cache[key_id]


def _rows_query(conn: sqlite3.Connection) -> str:
    # A ledger no collector with series tables opened yet has no table_id column (and no v2 batch).
    table_id = "table_id" if ledger.has_batch_column(conn, "table_id") else "NULL"
    return (
        "SELECT seq, kind, hash, prev_hash, key_id, received_at, created_wall_ms, window_start_ms, "
        f"window_end_ms, series_count, sample_count, bytes, {table_id}, frame FROM batches "
        "WHERE site = ? AND node = ? ORDER BY seq"
    )


def _nodes(run: _Run, conn: sqlite3.Connection, site: str | None, node: str | None) -> list[tuple[str, str]]:
    """Every node with rows or accounting in the ledger, sorted (one index seek per node in
    `batches`). A table that cannot be read is a finding; the others still name nodes."""
    found: set[tuple[str, str]] = set()
    for table in ("nodes", "drops", "retired"):
        try:
            # The table names are the constants of this loop, never input.
            found.update((str(s), str(n)) for s, n in conn.execute(f"SELECT DISTINCT site, node FROM {table}"))
        except sqlite3.Error as exc:
            run.emit(Finding(None, None, None, DAMAGED, f"cannot read the ledger's {table} table: {exc}"))
    try:
        row = conn.execute("SELECT site, node FROM batches ORDER BY site, node LIMIT 1").fetchone()
        while row is not None:
            found.add((str(row[0]), str(row[1])))
            row = conn.execute(
                "SELECT site, node FROM batches WHERE (site, node) > (?, ?) ORDER BY site, node LIMIT 1",
                (row[0], row[1]),
            ).fetchone()
    except sqlite3.Error as exc:
        run.emit(Finding(None, None, None, DAMAGED, f"cannot list the nodes in the batches table: {exc}"))
    return sorted((s, n) for s, n in found if (site is None or s == site) and (node is None or n == node))


def _subtract(first: int, last: int, covered: IntervalSet) -> Iterator[tuple[int, int]]:
    """The parts of first..last that `covered` does not hold."""
    at = first
    for s, e in zip(covered.starts, covered.ends, strict=True):
        if e < at:
            continue
        if s > last:
            break
        if s > at:
            yield at, s - 1
        at = e + 1
        if at > last:
            return
    if at <= last:
        yield at, last


def _overlap(first: int, last: int, covered: IntervalSet) -> int:
    return last - first + 1 - sum(b - a + 1 for a, b in _subtract(first, last, covered))


def _refusal_detail(refusal: wire.Refusal) -> str:
    return f"the stored frame does not verify: {refusal.detail}"


class _Run:
    """One audit's state across nodes: summary, finding sink, progress ticker, limits."""

    def __init__(
        self,
        on_finding: Callable[[Finding], None],
        progress: Callable[[Progress], None] | None,
        progress_every_s: float,
        limits: wire.OpenLimits,
        clock: Callable[[], float],
        sealing_keys: wire.SealingKeys | None = None,
    ) -> None:
        self.summary = AuditSummary()
        self.sealing_keys = sealing_keys
        self.on_finding = on_finding
        self.progress = progress
        self.progress_every_s = progress_every_s
        self.limits = limits
        self.clock = clock
        self.started = clock()
        self.last_progress = self.started
        self.nodes_total = 0
        self.seq = 0  # the seq of the row being checked (to say where a damaged ledger stopped)

    def emit(self, finding: Finding) -> None:
        self.summary.findings[finding.problem] = self.summary.findings.get(finding.problem, 0) + 1
        self.on_finding(finding)

    def tick(self, site: str, node: str, seq: int) -> None:
        self.seq = seq
        self.summary.batches += 1
        if self.progress is None or self.summary.batches % 256:
            return
        now = self.clock()
        if now - self.last_progress >= self.progress_every_s:
            self.last_progress = now
            self.progress(
                Progress(
                    self.summary.batches, self.summary.nodes, self.nodes_total, site, node, seq, now - self.started
                )
            )


def audit(
    path: Path,
    *,
    on_finding: Callable[[Finding], None],
    site: str | None = None,
    node: str | None = None,
    limits: wire.OpenLimits = wire.DEFAULT_OPEN_LIMITS,
    progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sealing_keys: wire.SealingKeys | None = None,
) -> AuditSummary:
    """Re-verify the ledger at `path` (optionally one site and/or node); each problem goes to
    `on_finding` as it is found. Never raises for a damaged ledger: that is a finding too.
    Raises FileNotFoundError if there is no ledger file at all."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger here (has the collector run with this data_dir?)")
    run = _Run(on_finding, progress, progress_every_s, limits, clock, sealing_keys)
    problem = file_problem(path)
    if problem is not None:
        run.emit(Finding(None, None, None, DAMAGED, problem))
    try:
        conn = ledger.connect_readonly(path)
    except sqlite3.Error as exc:
        run.emit(Finding(None, None, None, DAMAGED, f"cannot open {path}: {exc}"))
        return _finish(run)
    try:
        nodes = _nodes(run, conn, site, node)
        run.nodes_total = len(nodes)
        for s, n in nodes:
            _audit_node(conn, run, s, n)
            run.summary.nodes += 1
        try:
            run.summary.receipts_issued = ledger.count_receipts_issued(conn, site, node)
        except sqlite3.Error as exc:
            run.emit(Finding(None, None, None, DAMAGED, f"cannot read the ledger's receipts_issued table: {exc}"))
    finally:
        conn.close()
    return _finish(run)


def _finish(run: _Run) -> AuditSummary:
    run.summary.elapsed_s = run.clock() - run.started
    return run.summary


def _audit_node(conn: sqlite3.Connection, run: _Run, site: str, node: str) -> None:
    run.seq = 0
    try:
        conn.execute("BEGIN")  # one snapshot for this node's rows, keys, drops and retirements
        _audit_node_rows(conn, run, site, node)
    except sqlite3.Error as exc:
        where = f"at or after seq {run.seq}" if run.seq else "before its first row"
        run.emit(Finding(site, node, None, DAMAGED, f"the ledger cannot be read for this node ({where}): {exc}"))
    finally:
        _end_read(conn)


def _end_read(conn: sqlite3.Connection) -> None:
    """End a read transaction, also on a damaged file (where COMMIT itself can fail)."""
    for statement in ("COMMIT", "ROLLBACK"):
        if not conn.in_transaction:
            return
        try:
            conn.execute(statement)
        except sqlite3.Error:
            continue


def _audit_node_rows(conn: sqlite3.Connection, run: _Run, site: str, node: str) -> None:
    """Audit one node inside the caller's read transaction."""
    summary = run.summary
    keys = _Keys(conn)
    tables = wire.SeriesTables(max_senders=1)
    series_tables = LedgerTables(conn, run.limits, run.sealing_keys, max_tables=AUDIT_TABLES)
    holes = IntervalSet()  # seqs below the highest that no row holds
    named = IntervalSet()  # seqs named by verified drop receipts
    verified_receipts: set[int] = set()
    unproven: set[int] = set()  # seqs whose frames did not verify (each reported already)
    sealed_receipts: set[int] = set()  # signed receipts this reader cannot decrypt
    last_seq = 0
    link: tuple[int, bytes] | None = None  # (seq, hash) of the last row proven in place
    announced: tuple[int, bytes] | None = None  # (rotation seq, key id) while the chain is unbroken

    for (
        seq,
        kind,
        stored_hash,
        stored_prev,
        stored_key,
        received_at,
        created,
        w_start,
        w_end,
        series_count,
        sample_count,
        size,
        stored_table,
        frame,
    ) in conn.execute(_rows_query(conn), (site, node)):
        if seq > last_seq + 1:
            holes.add(last_seq + 1, seq - 1)
            announced = None  # a rotation may sit in the gap
        last_seq = seq
        run.tick(site, node, seq)
        raw = bytes(frame)
        opened = wire.open_batch(raw, keys, run.limits, tables, sealing_keys=run.sealing_keys,
                                 series_tables=series_tables)
        if isinstance(opened, wire.VerifiedBatch):
            header: wire.Header | None = opened.header
        else:
            header = opened.header if opened.signed else None
            if opened.signed and opened.result == "sealed_to_unknown_key":
                summary.sealed_unopened += 1
                if header is not None and header.kind == wire.Kind.DROP_RECEIPT:
                    sealed_receipts.add(seq)
            elif opened.signed and opened.result == "unknown_table":
                # Signature and chain are still proven; the samples cannot be read.
                which = f" {bytes(stored_table).hex()}" if stored_table is not None else ""
                run.emit(Finding(site, node, seq, MISSING_TABLE,
                                 f"the series table{which} this batch names is not in the ledger's series_tables "
                                 f"(or its bytes are not that table): its samples cannot be read ({opened.detail})"))
            else:
                run.emit(Finding(site, node, seq, opened.result, _refusal_detail(opened)))
        if header is None:  # not proven: the links to and from it cannot be checked
            unproven.add(seq)
            link = None
            continue
        if (header.site, header.node, header.seq) != (site, node, seq):
            run.emit(
                Finding(
                    site,
                    node,
                    seq,
                    ROW_MISMATCH,
                    f"the row for {site}/{node} seq {seq} holds the frame signed as "
                    f"{header.site}/{header.node} seq {header.seq} (rows swapped, moved or replaced)",
                )
            )
            link = None
            continue
        digest = wire.batch_hash(raw)
        columns: list[tuple[str, object, object]] = [
            ("hash", bytes(stored_hash), digest),
            ("prev_hash", bytes(stored_prev), header.prev_hash),
            ("key_id", bytes(stored_key), header.key_id),
            ("kind", kind, int(header.kind)),
            ("created_wall_ms", created, header.created_wall_ms),
            ("window_start_ms", w_start, header.window_start_ms),
            ("window_end_ms", w_end, header.window_end_ms),
            ("series_count", series_count, header.series_count),
            ("sample_count", sample_count, header.sample_count),
            ("bytes", size, len(raw)),
        ]
        if isinstance(opened, wire.VerifiedBatch):
            # The table the signed payload names (v2 data), else none.
            signed_table = opened.table.id if opened.table is not None else None
            columns.append(("table_id", None if stored_table is None else bytes(stored_table), signed_table))
        wrong = [
            f"{name} {_show(stored)} (signed: {_show(signed)})" for name, stored, signed in columns if stored != signed
        ]
        if wrong:
            run.emit(
                Finding(
                    site,
                    node,
                    seq,
                    ROW_MISMATCH,
                    "the row's columns disagree with the signed frame it holds: " + "; ".join(wrong),
                )
            )

        if seq == 1:
            summary.links_checked += 1
            if header.prev_hash != wire.ZERO_HASH:
                run.emit(
                    Finding(
                        site,
                        node,
                        seq,
                        CHAIN_BREAK,
                        f"seq 1 starts the chain and must carry a zero prev_hash, carries {header.prev_hash.hex()}",
                    )
                )
        elif link is not None and link[0] == seq - 1:
            summary.links_checked += 1
            if header.prev_hash != link[1]:
                run.emit(
                    Finding(
                        site,
                        node,
                        seq,
                        CHAIN_BREAK,
                        f"prev_hash {header.prev_hash.hex()} is not the hash of the stored seq {seq - 1} "
                        f"({link[1].hex()})",
                    )
                )
        else:
            summary.links_unchecked += 1
        link = (seq, digest)

        if announced is not None and header.key_id != announced[1]:
            run.emit(
                Finding(
                    site,
                    node,
                    seq,
                    KEY_MISMATCH,
                    f"signed with key {header.key_id.hex()}, but the key rotation at seq {announced[0]} "
                    f"announced key {announced[1].hex()}",
                )
            )
        recorded_key = keys(header.key_id)
        if recorded_key is not None:
            record = recorded_key.record
            if record.state == "revoked" and received_at > record.changed_at:
                run.emit(
                    Finding(
                        site,
                        node,
                        seq,
                        RECORDED_AFTER_REVOCATION,
                        f"recorded at {_when(received_at)}, after its key {record.key_id.hex()} was revoked "
                        f"at {_when(record.changed_at)}",
                    )
                )

        if header.kind == wire.Kind.DATA:
            summary.data_batches += 1
        elif header.kind == wire.Kind.DROP_RECEIPT:
            summary.drop_receipts += 1
            if isinstance(opened, wire.VerifiedBatch) and opened.drop is not None:
                verified_receipts.add(seq)
                _check_receipt(conn, run, site, node, seq, opened.drop, named)
        else:
            summary.key_rotations += 1
            if isinstance(opened, wire.VerifiedBatch) and opened.rotation is not None:
                announced = (seq, wire.key_id(opened.rotation.new_public_key))

    _account_gaps(conn, run, site, node, last_seq, holes, named, verified_receipts, unproven, sealed_receipts)
    _check_tables(conn, run, site, node)


def _check_tables(conn: sqlite3.Connection, run: _Run, site: str, node: str) -> None:
    """Each series table stored for the node must be the one its id names (one row at a time)."""
    if not has_series_tables(conn):
        return
    for stored_id, blob in conn.execute(
        "SELECT table_id, blob FROM series_tables WHERE site = ? AND node = ? ORDER BY table_id", (site, node)
    ):
        run.summary.tables += 1
        stored_id, actual = bytes(stored_id), wire.table_id(bytes(blob))
        if actual != stored_id:
            run.emit(
                Finding(
                    site,
                    node,
                    None,
                    TABLE_MISMATCH,
                    f"the series table stored as {stored_id.hex()} holds other bytes ({len(blob)} bytes, "
                    f"SHA-256 {actual.hex()}): the batches that name it cannot be read",
                )
            )


def _check_receipt(
    conn: sqlite3.Connection,
    run: _Run,
    site: str,
    node: str,
    seq: int,
    receipt: wire.DropReceipt,
    named: IntervalSet,
) -> None:
    """The drops table must hold exactly this receipt's ranges (as the ledger inserts them:
    one row per range, the first of any ranges sharing a first seq)."""
    expected: dict[int, int] = {}
    for first, last in receipt.ranges:
        expected.setdefault(first, last)
        named.add(first, last)
    stored = {
        int(a): int(b)
        for a, b in conn.execute(
            "SELECT first_seq, last_seq FROM drops WHERE site = ? AND node = ? AND receipt_seq = ?",
            (site, node, seq),
        )
    }
    if stored != expected:
        run.emit(
            Finding(
                site,
                node,
                seq,
                DROP_MISMATCH,
                f"the drops table records {_ranges(stored.items())} for this receipt, the signed receipt "
                f"names {_ranges(expected.items())}",
            )
        )


def _account_gaps(
    conn: sqlite3.Connection,
    run: _Run,
    site: str,
    node: str,
    last_seq: int,
    holes: IntervalSet,
    named: IntervalSet,
    verified_receipts: set[int],
    unproven: set[int],
    sealed_receipts: set[int],
) -> None:
    """Every seq up to the node's highest that no row holds must be named by a drop receipt
    or retired by retention; report the rest as missing."""
    row = conn.execute("SELECT highest_seq FROM nodes WHERE site = ? AND node = ?", (site, node)).fetchone()
    highest = int(row[0]) if row is not None else 0
    if highest > last_seq:  # the node's record counts seqs after the last row held
        holes.add(last_seq + 1, highest)
    retired = IntervalSet()
    for a, b in conn.execute("SELECT first_seq, last_seq FROM retired WHERE site = ? AND node = ?", (site, node)):
        retired.add(int(a), int(b))
    # Receipts that left the archive themselves: the drops table is what remains of them.
    for receipt_seq, a, b in conn.execute(
        "SELECT receipt_seq, first_seq, last_seq FROM drops WHERE site = ? AND node = ? "
        "ORDER BY receipt_seq, first_seq",
        (site, node),
    ):
        if receipt_seq in verified_receipts or receipt_seq in unproven:
            continue  # compared with its receipt already, or reported: its ranges prove nothing
        if receipt_seq in retired or receipt_seq in sealed_receipts:
            named.add(int(a), int(b))  # the receipt is gone or unreadable here: the table remains
            continue
        run.emit(
            Finding(
                site,
                node,
                int(receipt_seq),
                DROP_MISMATCH,
                f"the drops table names seqs {a}..{b} as dropped by a receipt at seq {receipt_seq}, "
                "but the ledger holds no drop receipt there and did not retire one",
            )
        )
    for first, last in zip(holes.starts, holes.ends, strict=True):
        run.summary.seqs_dropped += _overlap(first, last, named)
        not_dropped = list(_subtract(first, last, named))
        for a, b in not_dropped:
            run.summary.seqs_retired += _overlap(a, b, retired)
            for x, y in _subtract(a, b, retired):
                run.emit(
                    Finding(
                        site,
                        node,
                        x,
                        MISSING,
                        "no row holds "
                        + (f"seq {x}" if x == y else f"seqs {x}..{y}")
                        + ", no verified drop receipt names it, and retention did not retire it",
                        through_seq=y,
                    )
                )


def _show(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else repr(value)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _ranges(ranges: Any) -> str:
    items = sorted(ranges)
    return ", ".join(f"{a}..{b}" for a, b in items) if items else "nothing"


def describe(summary: AuditSummary) -> str:
    """The closing line(s) of a text audit."""
    s = summary
    covered = (
        f"{s.nodes} node(s), {s.batches:,} batches ({s.data_batches:,} data, {s.drop_receipts:,} drop "
        f"receipts, {s.key_rotations:,} key rotations); {s.links_checked:,} chain links checked, "
        f"{s.links_unchecked:,} not checkable (seq - 1 dropped, retired or unverified); "
        f"{s.seqs_dropped:,} seqs named by drop receipts, {s.seqs_retired:,} retired by retention"
    )
    if s.tables:
        covered += f"; {s.tables:,} series tables"
    if s.sealed_unopened:
        covered += f"; {s.sealed_unopened:,} sealed payloads not opened (signature and chain checked)"
    if s.receipts_issued:
        covered += f"; {s.receipts_issued:,} air-gap receipts issued"
    if s.clean:
        return f"audit clean: {covered} ({s.elapsed_s:.1f} s)"
    problems = ", ".join(f"{name} {count}" for name, count in sorted(s.findings.items()))
    total = sum(s.findings.values())
    return f"audit FAILED: {total} problem(s) ({problems}) in {covered} ({s.elapsed_s:.1f} s)"
