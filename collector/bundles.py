"""`waystation-collector import`: air-gap bundles into the ledger, and the signed receipt.

Every frame goes through ingest's own path: `ingest.open_frame` (open_batch with the node
keys, the sealing keys and ingest's limits), `ingest.submission`, `Ledger.commit`
(idempotent on (node, seq), so a batch that came both ways counts once). Which process
commits depends on whether `serve` runs on this data_dir, because serve keeps the ledger's
accounting (Ledger's node cache) and the exposed latest state in memory, and a second
writer behind its back would leave both stale and then overwrite the nodes table:

- serve running (it holds `<data_dir>/serve.lock`): the frames go to it over POST
  /v1/import (collector.serve_link.ServeSink), and serve verifies and commits them exactly
  as posts (Ingest.import_frames): /metrics, the ingest counters and the remote-write
  forwarder (which reads the ledger) see them as they see any batch.
- otherwise the import holds the lock, so serve cannot start meanwhile (it waits), and
  commits through collector.ledger directly (DirectSink); serve's next start replays them
  into the latest state and its forwarder forwards them, like anything recorded after its
  last save.

Each file is read twice. The first pass notes its damage, its manifests and every frame's
seq and hash, and commits nothing: a bundle whose verified manifest says its spool was never
placed (MANIFEST_UNPLACED: a new spool, numbered from seq 1) has its frames of that node
committed only where they continue the chain the collector holds for it, else none of them
(`unplaced_spool`, `unplaced_gap`; docs/bundle.md §3). The second pass commits. What the
first pass read of the ledger still holds when the second commits because imports run one
at a time: each holds `<data_dir>/import.lock` throughout import_bundles, whichever way it
commits (collector.serve_link.acquire_for_import; a second import waits, naming the first).

Series tables (wire v2): a bundle carries each table its v2 frames name once, as a record of
its own (wire.bundle.TableRecord, outside the manifest). The first pass keeps the file's
tables by id (where they lie in the file: at most MAX_BUNDLE_TABLES, MAX_BUNDLE_TABLE_BYTES
in all; any beyond are named as problems and not kept); the second pass sends each v2 frame
whose table the file holds with that table before it (wire.with_table), exactly as a post
does, so the sink verifies the frame against it and the ledger stores it with the frame. A
frame whose table is neither in the file nor in the ledger is refused `unknown_table`.

The receipt is built afterwards, in this process, from the committed ledger (the held seq
ranges and the watermark) and signed with the collector's key (collector.receipts, docs/bundle.md §4).
"""

from __future__ import annotations

import array
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wire
from collector import keyring, trust
from collector import ledger as ledger_mod
from collector.config import CollectorConfig
from collector.ingest import MAX_GROUP, open_frame, open_limits, result_word, submission
from collector.serve_link import (
    Answer,
    DataDirLock,
    Endpoint,
    Frames,
    ImportError_,
    ServeSink,
    acquire_for_import,
    claim,
)
from collector.tables import LedgerTables, named_table_id
from wire import bundle

_LEN = struct.Struct("<I")

__all__ = ["ImportError_", "import_bundles", "describe", "ranges_text"]


# ---------------------------------------------------------------------------- results


# What one import keeps about a hostile bundle is bounded: past these, only counts grow.
# Per frame it keeps ~60 bytes (SeenLog) and ~40 per held batch (HeldBatches), a small
# share of any frame's own size; the manifests it keeps are their bytes (lazy entries).
MAX_REFUSALS_KEPT = 1000  # in all, named one per line; the rest are counted per node by reason
MAX_PROBLEMS_KEPT = 1000  # per file
MAX_MANIFESTS_KEPT = 4  # per file; one bundle has one
MAX_UNPROVEN_NODES = 100  # distinct site/node names on frames that did not verify
# Series tables kept per file (by id: where each lies in the file, not its bytes); tables
# beyond these are named as the file's problems, and the frames that name them go alone.
MAX_BUNDLE_TABLES = 4096
MAX_BUNDLE_TABLE_BYTES = 256 * 1024 * 1024

# Results of frames held back because their unplaced spool's bundle does not continue the
# collector's chain for the node (UNPLACED_SPOOL), or nothing tells whether it does (UNPLACED_GAP).
UNPLACED_SPOOL = "unplaced_spool"
UNPLACED_GAP = "unplaced_gap"


@dataclass(frozen=True)
class FrameResult:
    file: str
    offset: int
    result: str
    detail: str
    site: str | None = None
    node: str | None = None
    seq: int | None = None


class HeldBatches:
    """(seq, hash) of the frames the collector holds exactly as sent: what a receipt lets
    the agent delete. Packed (8 + 32 bytes a batch), not a dict of objects."""

    def __init__(self) -> None:
        self.seqs = array.array("Q")
        self.hashes = bytearray()

    def add(self, seq: int, digest: bytes) -> None:
        self.seqs.append(seq)
        self.hashes += digest

    def __len__(self) -> int:
        return len(self.seqs)

    def items(self) -> list[tuple[int, bytes]]:
        """Ascending by seq, one per seq (a frame found twice is held once)."""
        out: dict[int, bytes] = {}
        for i, seq in enumerate(self.seqs):
            out[seq] = bytes(self.hashes[i * 32 : (i + 1) * 32])
        return sorted(out.items())


class SeenLog:
    """Every frame record found in one file, as the manifest check needs it; packed."""

    def __init__(self) -> None:
        self.offsets = array.array("Q")
        self.seqs = array.array("Q")
        self.lengths = array.array("I")
        self.hashes = bytearray()

    def add(self, offset: int, seq: int, digest: bytes, length: int) -> None:
        self.offsets.append(offset)
        self.seqs.append(seq)
        self.lengths.append(length)
        self.hashes += digest

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self) -> Iterator[bundle.Seen]:
        for i in range(len(self.seqs)):
            yield bundle.Seen(self.offsets[i], self.seqs[i], bytes(self.hashes[i * 32 : (i + 1) * 32]),
                              self.lengths[i])

    def find(self, seq: int, digest: bytes) -> bundle.Seen | None:
        """The first frame found at seq with this hash."""
        for i, s in enumerate(self.seqs):
            if s == seq and self.hashes[i * 32 : (i + 1) * 32] == digest:
                return bundle.Seen(self.offsets[i], s, digest, self.lengths[i])
        return None


@dataclass
class NodeReport:
    accepted: int = 0
    duplicates: int = 0
    pruned: int = 0  # seqs recorded once and since pruned: neither held nor refused
    refused: list[FrameResult] = field(default_factory=list)  # those named one by one
    refused_by_reason: dict[str, int] = field(default_factory=dict)  # all of them
    bundles: list[bytes] = field(default_factory=list)  # verified manifests' hashes
    held: HeldBatches = field(default_factory=HeldBatches)
    manifest_key: bytes = b""

    @property
    def refused_count(self) -> int:
        return sum(self.refused_by_reason.values())



@dataclass
class FileReport:
    path: Path
    frames: int = 0
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT
    problems_left_out: int = 0
    manifests: list[bundle.Manifest] = field(default_factory=list)
    manifests_left_out: int = 0
    seen: SeenLog = field(default_factory=SeenLog)
    sites: set[tuple[str, str]] = field(default_factory=set)
    # Series tables found in the file, by table id: (offset of the table's bytes, length).
    tables: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    table_bytes: int = 0
    tables_refused: int = 0  # table records not kept (over MAX_BUNDLE_TABLES / _BYTES)

    def problem(self, text: str, always: bool = False) -> None:
        """always: a whole-file finding (a few per manifest), kept past the cap on damage."""
        if always or len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(text)
        else:
            self.problems_left_out += 1

    @property
    def damaged(self) -> bool:
        return bool(self.problems) or self.problems_left_out > 0


@dataclass
class Report:
    files: list[FileReport] = field(default_factory=list)
    nodes: dict[tuple[str, str], NodeReport] = field(default_factory=dict)
    receipts: list[bundle.Receipt] = field(default_factory=list)
    via: str = ""
    names_from_refusals: int = 0  # nodes first named by a refused frame
    refusals_named: int = 0
    unproven_left_out: int = 0  # refused frames under yet more such names, counted only

    def node(self, site: str, node: str) -> NodeReport:
        return self.nodes.setdefault((site, node), NodeReport())

    def refuse(self, r: FrameResult, site: str, node: str) -> None:
        """Count a refused frame under its node, and name it while MAX_REFUSALS_KEPT allow;
        names that never proved themselves get MAX_UNPROVEN_NODES reports, and frames under
        any more are only counted (a hostile bundle can invent millions)."""
        n = self.nodes.get((site, node))
        if n is None:
            if self.names_from_refusals >= MAX_UNPROVEN_NODES:
                self.unproven_left_out += 1
                return
            self.names_from_refusals += 1
            n = self.node(site, node)
        n.refused_by_reason[r.result] = n.refused_by_reason.get(r.result, 0) + 1
        if self.refusals_named < MAX_REFUSALS_KEPT:
            self.refusals_named += 1
            n.refused.append(r)

    @property
    def failed(self) -> bool:
        return (any(n.refused_by_reason for n in self.nodes.values()) or any(f.damaged for f in self.files)
                or self.unproven_left_out > 0)


# ---------------------------------------------------------------------------- committing


class DirectSink:
    """serve is not running (this process holds the lock): ingest's checks, then the ledger."""

    def __init__(self, config: CollectorConfig, sealing_keys: wire.SealingKeys) -> None:
        if not config.ledger_path.exists():
            raise ImportError_(f"{config.ledger_path}: no ledger here (enroll the nodes first)")
        self.ledger = ledger_mod.Ledger(config.ledger_path)
        self.limits = open_limits(config.limits)
        self.max_frame_bytes = int(config.limits.max_body_bytes)
        self.tables = wire.SeriesTables()
        self.sealing_keys = sealing_keys
        # v2: the tables sent with frames, and those the ledger holds (read through its connection).
        self.series_tables = LedgerTables(self.ledger.conn, self.limits, sealing_keys)

    def commit(self, frames: Frames, origin_file: str) -> list[Answer]:
        answers: list[Answer] = []
        subs: list[ledger_mod.Submission] = []
        where: list[int] = []

        def flush() -> None:
            if not subs:
                return
            for i, outcome in zip(where, self.ledger.commit(subs), strict=True):
                result = "duplicate_pruned" if outcome.result == "duplicate" and outcome.pruned else outcome.result
                answers[i] = (result, "" if result in ("accepted", "duplicate") else outcome.detail, answers[i][2])
            subs.clear()
            where.clear()

        for _, raw in frames:
            if len(raw) > self.max_frame_bytes:  # as a post's body over max_body_bytes (table included)
                answers.append(("too_large", f"frame of {len(raw)} bytes exceeds max_body_bytes "
                                             f"{self.max_frame_bytes}", _header_of(raw)))
                continue
            opened = open_frame(raw, self.ledger.conn, self.limits, self.tables, self.sealing_keys,
                                self.series_tables)
            if isinstance(opened, wire.Refusal):
                answers.append((result_word(opened), opened.detail, opened.header))
                continue
            where.append(len(answers))
            answers.append(("", "", opened.header))
            subs.append(submission(opened, time.time(), "bundle", origin_file))
            # A key rotation is committed before the next frame is verified: frames signed
            # with the new key are refused unknown_key until the ledger knows it.
            if len(subs) >= MAX_GROUP or opened.rotation is not None:
                flush()
        flush()
        return answers

    def close(self) -> None:
        self.ledger.close()

# ---------------------------------------------------------------------------- reading


def _survey(records: Iterator[bundle.Record], file: FileReport) -> None:
    """The first pass over a file: its damage, its manifests (MAX_MANIFESTS_KEPT), every
    frame record found (offset, seq, hash, length) and where its series tables lie land in
    `file`; nothing is verified. Only frames are what the manifests list."""
    for rec in records:
        if isinstance(rec, bundle.Damaged):
            file.problem(f"bytes {rec.offset}-{rec.end}: {rec.reason}: {rec.detail}")
        elif isinstance(rec, bundle.ManifestRecord):
            if rec.manifest is None:
                file.problem(f"manifest at byte {rec.offset} does not parse: {rec.detail}")
            elif len(file.manifests) < MAX_MANIFESTS_KEPT:
                file.manifests.append(rec.manifest)
            else:
                file.manifests_left_out += 1
        elif isinstance(rec, bundle.TableRecord):
            _keep_table(rec, file)
        else:
            file.frames += 1
            seq = struct.unpack_from("<Q", rec.raw, 8)[0]
            file.seen.add(rec.offset, seq, wire.batch_hash(rec.raw), len(rec.raw))


def _keep_table(rec: bundle.TableRecord, file: FileReport) -> None:
    """Note where a series table lies, by its id, within the per-file bounds."""
    tid = wire.table_id(rec.raw)
    if tid in file.tables:
        return  # the same table twice: one will do
    if len(file.tables) >= MAX_BUNDLE_TABLES or file.table_bytes + len(rec.raw) > MAX_BUNDLE_TABLE_BYTES:
        file.tables_refused += 1
        file.problem(f"series table {tid.hex()[:16]} at byte {rec.offset}: not kept, the file holds more than "
                     f"{MAX_BUNDLE_TABLES} series tables or {MAX_BUNDLE_TABLE_BYTES // (1024 * 1024)} MiB of them "
                     "(the frames that name it are imported only if the collector holds it already)")
        return
    file.tables[tid] = (rec.offset + bundle.RECORD_OVERHEAD, len(rec.raw))
    file.table_bytes += len(rec.raw)


def _with_tables(
    frames: Iterator[bundle.FrameRecord], file: FileReport, buf: bundle.Buffer, max_bytes: int,
    sealing_keys: wire.SealingKeys | None,
) -> Iterator[tuple[int, bytes]]:
    """(offset, item) per frame: a v2 frame whose series table the file holds goes with the
    table before it (wire.with_table), as long as the two fit max_bytes; any other alone."""
    for rec in frames:
        item = rec.raw
        tid = named_table_id(rec.raw, sealing_keys) if file.tables else None
        where = file.tables.get(tid) if tid is not None else None
        if where is not None and where[1] + len(rec.raw) <= max_bytes:
            start, length = where
            item = wire.with_table(bytes(buf[start : start + length]), rec.raw)
        yield rec.offset, item


def _chunks(items: Iterator[tuple[int, bytes]], max_bytes: int) -> Iterator[Frames]:
    """(offset, item) in chunks of at most max_bytes (one larger item goes alone)."""
    chunk: Frames = []
    size = 0
    for offset, item in items:
        if chunk and size + len(item) + _LEN.size > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((offset, item))
        size += len(item) + _LEN.size
    if chunk:
        yield chunk


def _header_of(item: bytes) -> wire.Header | None:
    try:
        return wire.parse_frame(wire.split_body(item)[1]).header
    except wire.WireError:
        return None


def _check_manifests(file: FileReport, conn: Any, report: Report) -> None:
    if not file.manifests:
        file.problem("no manifest (the bundle is truncated or not whole); its frames were checked one by one",
                     always=True)
        return
    if len(file.manifests) + file.manifests_left_out > 1:
        file.problem(f"{len(file.manifests) + file.manifests_left_out} manifests (parts of several bundles "
                     f"spliced together?)" + (f"; only the first {len(file.manifests)} checked"
                                             if file.manifests_left_out else ""), always=True)
    for m in file.manifests:
        name = f"manifest {m.hash.hex()[:16]} of {m.site}/{m.node}"
        trouble = _manifest_trouble(conn, m)
        if trouble is not None:
            file.problem(f"{name}: {trouble}", always=True)
            continue
        node = report.node(m.site, m.node)
        node.bundles.append(m.hash)
        node.manifest_key = m.key_id
        for p in bundle.manifest_problems(m, file.seen):
            file.problem(f"{name}: {p}", always=True)
        others = sorted(f"{s}/{n}" for s, n in file.sites if (s, n) != (m.site, m.node))
        if others:
            file.problem(f"{name}: the bundle also holds frames of {', '.join(others)}", always=True)


def _manifest_trouble(conn: Any, m: bundle.Manifest) -> str | None:
    """Why a manifest does not verify with its node's enrolled key (None: it does)."""
    key = trust.lookup(conn, m.key_id)
    if key is None or (key.site, key.node) != (m.site, m.node):
        return f"signed by key {m.key_id.hex()}, not enrolled for that node"
    if key.state == "revoked":
        return f"signed by revoked key {m.key_id.hex()}"
    try:
        bundle.verify_manifest(m, key.public_key)
    except wire.WireError as exc:
        return exc.detail
    return None


# ---------------------------------------------------------------------------- unplaced spools


Verdict = tuple[str, str]  # result, detail: for every frame of the node in the file


def _unplaced_verdicts(
    file: FileReport, buf: bundle.Buffer, config: CollectorConfig, report: Report
) -> dict[tuple[str, str], Verdict]:
    """Before any frame of the file is committed: the nodes whose frames are held back
    because the file's verified manifest says their spool was never placed (a new spool,
    numbered from seq 1) and they do not continue the chain the collector holds (`_placement`).

    Without this, a reinstalled node's seqs 1..K would be refused as conflicts with the old
    chain, K + 1 as a chain mismatch, and K + 2 on accepted: nothing is recorded next to
    them to check against, and the ledger would hold another spool's batches under them.

    A manifest whose key is not known yet (a key rotation inside the bundle is committed with
    its frames) is not verified here: that node's frames go as they always did, and the
    manifest is checked after them (`_check_manifests`). Races: another import cannot commit
    meanwhile (import.lock, held throughout import_bundles: through serve, nothing else keeps
    a second import from reading the same head before either commits); and beside a running
    serve the node cannot deliver over HTTP meanwhile: an unplaced spool sends nothing before
    its uplink has asked the chain head and placed it, so the head read here holds for this
    node's frames."""
    unplaced = [m for m in file.manifests if m.unplaced]
    if not unplaced:
        return {}
    verdicts: dict[tuple[str, str], Verdict] = {}
    conn = ledger_mod.connect_readonly(config.ledger_path)
    try:
        conn.execute("BEGIN")  # one snapshot: keys, chain head and neighbours agree
        by_node: dict[tuple[str, str], list[bundle.Manifest]] = {}
        for m in unplaced:
            if _manifest_trouble(conn, m) is None:
                by_node.setdefault((m.site, m.node), []).append(m)
        for (site, node), manifests in sorted(by_node.items()):
            verdict = _placement(conn, site, node, manifests, file, buf)
            if verdict is not None:
                report.node(site, node)  # proved itself by its manifest: it gets a receipt
                verdicts[(site, node)] = verdict
    finally:
        conn.close()
    return verdicts


def _placement(
    conn: Any, site: str, node: str, manifests: list[bundle.Manifest], file: FileReport, buf: bundle.Buffer
) -> Verdict | None:
    """None when an unplaced spool's bundle continues the chain the collector holds for the
    node (its frames then go to the ledger as any, each checked there), else why none go.

    It continues when the collector holds nothing of the node, or when the bundle's lowest
    batch is one the collector holds (same seq, same hash) or links to it (the collector's
    batch at seq - 1 is the one its prev_hash names, as at head + 1; or the collector's batch
    at seq + 1 names it). Anything the collector holds there that says otherwise is another
    spool's chain: `unplaced_spool`. A lowest batch above head + 1 has nothing to compare
    with (an earlier bundle not imported yet): `unplaced_gap`. One inside a gap of what the
    collector holds, or where retention pruned it, is settled by the bundle's other batches
    at or next to held seqs (any that differ: `unplaced_spool`), else `unplaced_gap`.

    The manifests' entries are the node's signed word on exactly which batches (seq, hash)
    it exported, so they are compared even where a frame is missing from the file."""
    head = ledger_mod.read_chain_head(conn, site, node)
    if head is None:
        return None  # nothing held: nothing for them to be spliced onto (a brand-new node)
    head_seq = head[0] - 1
    entries = [e for m in manifests for e in m.entries if 1 <= e.seq <= wire.MAX_SEQ]
    if not entries:
        return None
    low = min(entries, key=lambda e: e.seq)
    own = _continues(conn, site, node, low.seq, low.hash, _prev_hash(file, buf, low))
    if own is None and low.seq > head_seq + 1:
        return UNPLACED_GAP, (
            f"{site}/{node}'s spool never learned the collector's chain, and this bundle starts at seq {low.seq}, "
            f"past the collector's head seq {head_seq} with nothing recorded next to it: whether it continues "
            "that chain cannot be told, so none of it is taken (it stays in the node's spool). Import the "
            "node's earlier bundle first, or carry the receipt this import writes (--receipt-out) back and run "
            "`waystation-agent import-receipt` on the node (it renumbers if needed), then export again")
    if own is None:
        for e in entries:
            if e.seq <= head_seq:
                found = _continues(conn, site, node, e.seq, e.hash, None)
                if found is False:
                    own = False
                    break
                own = own or found
    held = ranges_text(ledger_mod.held_ranges(conn, site, node))
    if own is None:
        return UNPLACED_GAP, (
            f"{site}/{node}'s spool never learned the collector's chain, and no batch of this bundle (from seq "
            f"{low.seq}) has one the collector holds at or next to its seq (it holds seq {held}): whether it "
            "continues that chain cannot be told, so none of it is taken (it stays in the node's spool). Carry "
            "the receipt this import writes (--receipt-out) back and run `waystation-agent import-receipt` on the "
            "node (it renumbers if needed), then export again")
    if own:
        return None
    return UNPLACED_SPOOL, (
        f"{site}/{node}'s new spool numbers from seq 1 while the collector holds seq {held} of an earlier one "
        "(reinstalled, or its spool lost): this bundle does not continue that chain, so none of it is taken (it "
        "stays in the node's spool). The receipt this import writes (--receipt-out) carries the chain head: run "
        "`waystation-agent import-receipt` with it on the node (it renumbers), then export again")


def _continues(conn: Any, site: str, node: str, seq: int, digest: bytes, prev_hash: bytes | None) -> bool | None:
    """Whether the batch (seq, digest) is in the collector's chain for the node: True when
    the collector holds it at seq or links to it (its batch at seq + 1 names it, or, with the
    batch's prev_hash given, its batch at seq - 1 is the one named), False when what it holds
    there says otherwise, None when it holds nothing at or next to seq."""
    at = ledger_mod.read_link(conn, site, node, seq)
    if at is not None:
        return at[0] == digest
    after = ledger_mod.read_link(conn, site, node, seq + 1) if seq < wire.MAX_SEQ else None
    if after is not None:
        return after[1] == digest
    before = ledger_mod.read_link(conn, site, node, seq - 1) if prev_hash is not None and seq > 1 else None
    if before is not None:
        return before[0] == prev_hash
    return None


def _prev_hash(file: FileReport, buf: bundle.Buffer, entry: bundle.ManifestEntry) -> bytes | None:
    """The prev_hash of the file's frame that a manifest entry lists (None: not in the file)."""
    seen = file.seen.find(entry.seq, entry.hash)
    if seen is None:
        return None
    body = seen.offset + bundle.RECORD_OVERHEAD
    try:
        return wire.parse_frame(buf[body : body + seen.length]).header.prev_hash
    except wire.WireError:
        return None


def _held_back(
    frames: Iterator[bundle.FrameRecord], verdicts: dict[tuple[str, str], Verdict], report: Report, file: FileReport
) -> Iterator[bundle.FrameRecord]:
    """The frames that go to the sink; those of a node with a verdict are refused with it,
    uncommitted (they stay in the node's spool)."""
    for rec in frames:
        try:
            h = wire.parse_frame(rec.raw).header
        except wire.WireError:
            yield rec  # the sink refuses it, saying why
            continue
        verdict = verdicts.get((h.site, h.node))
        if verdict is None:
            yield rec
        else:
            _count(report, file, FrameResult(file.path.name, rec.offset, *verdict, h.site, h.node, h.seq), rec.raw)


def import_bundles(
    config: CollectorConfig, paths: Sequence[Path], say: Callable[[str], None] = print
) -> Report:
    """Verify and commit every frame of every bundle; returns what happened (no receipt yet).
    Holds import.lock throughout (see the module docstring), waiting for another import."""
    data_dir = Path(config.data_dir)
    sealing_keys = keyring.load_sealing_keys(keyring.sealing_key_files(data_dir))
    one_at_a_time = acquire_for_import(data_dir, say)
    try:
        return _import_all(config, paths, say, sealing_keys)
    finally:
        one_at_a_time.close()


def _import_all(
    config: CollectorConfig, paths: Sequence[Path], say: Callable[[str], None], sealing_keys: wire.SealingKeys
) -> Report:
    data_dir = Path(config.data_dir)
    claimed = claim(data_dir, say)
    report = Report()
    sink: DirectSink | ServeSink
    try:
        if isinstance(claimed, Endpoint):
            sink = ServeSink(claimed)
            report.via = f"serve at {claimed.url}"
        else:
            sink = DirectSink(config, sealing_keys)
            report.via = f"ledger {config.ledger_path}"
        try:
            for path in paths:
                report.files.append(_import_file(path, sink, report, config, sealing_keys))
        finally:
            sink.close()
        conn = ledger_mod.connect_readonly(config.ledger_path)
        try:
            for file in report.files:
                if file.frames or file.manifests:
                    _check_manifests(file, conn, report)
        finally:
            conn.close()
    finally:
        if isinstance(claimed, DataDirLock):
            claimed.close()
    return report


def _import_file(
    path: Path, sink: DirectSink | ServeSink, report: Report, config: CollectorConfig,
    sealing_keys: wire.SealingKeys | None = None,
) -> FileReport:
    file = FileReport(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, after the mmap)
    except OSError as exc:
        file.problem(f"cannot read: {exc.strerror}")
        return file
    try:
        if os.fstat(f.fileno()).st_size == 0:
            file.problem("empty file")
            return file
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            max_manifest = bundle.manifest_len(bundle.MAX_MANIFEST_ENTRIES, "x" * 255, "x" * 255)
            _survey(bundle.read_bundle(buf, sink.max_frame_bytes, max_manifest), file)
            verdicts = _unplaced_verdicts(file, buf, config, report)
            # The second pass commits; its damage and manifests were noted by the first.
            frames: Iterator[bundle.FrameRecord] = (
                rec for rec in bundle.read_bundle(buf, sink.max_frame_bytes, max_manifest)
                if isinstance(rec, bundle.FrameRecord))
            if verdicts:
                frames = _held_back(frames, verdicts, report, file)
            items = _with_tables(frames, file, buf, sink.max_frame_bytes, sealing_keys)
            for chunk in _chunks(items, sink.max_frame_bytes):
                for (offset, item), (result, detail, h) in zip(chunk, sink.commit(chunk, path.name), strict=True):
                    _count(report, file, FrameResult(path.name, offset, result, detail,
                                                     h.site if h else None, h.node if h else None,
                                                     h.seq if h else None), wire.split_body(item)[1])
    finally:
        f.close()
    return file


def _count(report: Report, file: FileReport, r: FrameResult, raw: bytes) -> None:
    if r.site is None or r.node is None or r.seq is None:
        file.problem(f"frame at byte {r.offset}: {r.result}: {r.detail}")
        return
    if r.result not in ("accepted", "duplicate", "duplicate_pruned"):
        report.refuse(r, r.site, r.node)
        return
    file.sites.add((r.site, r.node))
    node = report.node(r.site, r.node)
    if r.result in ("accepted", "duplicate"):
        # The ledger holds exactly these bytes at this seq (a duplicate is hash-identical).
        node.held.add(r.seq, wire.batch_hash(raw))
        if r.result == "accepted":
            node.accepted += 1
        else:
            node.duplicates += 1
    else:
        # duplicate_pruned: recorded once, since pruned by retention: its hash is gone, so
        # nothing says these are the bytes recorded (a reinstalled node reuses seqs). Never
        # in a receipt's held.
        node.pruned += 1


# ---------------------------------------------------------------------------- printing


def ranges_text(ranges: Sequence[tuple[int, int]], limit: int = 6) -> str:
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    return (text or "none") + (f", ... ({len(ranges)} ranges)" if len(ranges) > limit else "")


def printable(text: str) -> str:
    """text with control and other unprintable characters escaped: names and details come
    from bundles no one has verified yet, and must not drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def describe(report: Report) -> list[str]:
    lines = [f"imported through {report.via}"]
    for (site, node), n in sorted(report.nodes.items()):
        lines.append(f"{site}/{node}: {n.accepted} accepted, {n.duplicates} duplicates, {n.refused_count} refused"
                     + (f", {n.pruned} recorded before and since pruned (not in the receipt)" if n.pruned else ""))
        for r in n.refused:
            lines.append(f"  refused seq {r.seq} ({r.file}, byte {r.offset}): {r.result}: {r.detail}")
        if n.refused_count > len(n.refused):
            by_reason = ", ".join(f"{count} {reason}" for reason, count in sorted(n.refused_by_reason.items()))
            lines.append(f"  ... {n.refused_count - len(n.refused)} more refused, not named one by one "
                         f"(all refusals by reason: {by_reason})")
    if report.unproven_left_out:
        lines.append(f"{report.unproven_left_out} more frames refused under names of {MAX_UNPROVEN_NODES}+ nodes "
                     "that no frame or manifest proved (not named one by one)")
    for f in report.files:
        tables = f" ({len(f.tables)} series tables)" if f.tables else ""
        lines.append(f"{f.path.name}: {f.frames} frames, {'damaged' if f.damaged else 'intact'}{tables}")
        lines += [f"  {p}" for p in f.problems]
        if f.problems_left_out:
            lines.append(f"  ... and {f.problems_left_out} more problems, not named one by one")
    return [printable(line) for line in lines]
