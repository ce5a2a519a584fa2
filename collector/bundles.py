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

The receipt is built afterwards, in this process, from the committed ledger (the held seq
ranges and the watermark) and signed with the collector's key (collector.receipts, docs/bundle.md §4).
"""

from __future__ import annotations

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
from collector.serve_link import Answer, DataDirLock, Endpoint, Frames, ImportError_, ServeSink, claim
from wire import bundle

_LEN = struct.Struct("<I")

__all__ = ["ImportError_", "import_bundles", "describe", "ranges_text"]


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FrameResult:
    file: str
    offset: int
    result: str
    detail: str
    site: str | None = None
    node: str | None = None
    seq: int | None = None


@dataclass
class NodeReport:
    accepted: int = 0
    duplicates: int = 0
    pruned: int = 0  # seqs recorded once and since pruned: neither held nor refused
    refused: list[FrameResult] = field(default_factory=list)
    bundles: list[bytes] = field(default_factory=list)  # verified manifests' hashes
    held: dict[int, bytes] = field(default_factory=dict)  # seq -> hash: frames the collector holds as sent
    manifest_key: bytes = b""


@dataclass
class FileReport:
    path: Path
    frames: int = 0
    problems: list[str] = field(default_factory=list)
    manifests: list[bundle.Manifest] = field(default_factory=list)
    seen: list[bundle.Seen] = field(default_factory=list)
    sites: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class Report:
    files: list[FileReport] = field(default_factory=list)
    nodes: dict[tuple[str, str], NodeReport] = field(default_factory=dict)
    receipts: list[bundle.Receipt] = field(default_factory=list)
    via: str = ""

    def node(self, site: str, node: str) -> NodeReport:
        return self.nodes.setdefault((site, node), NodeReport())

    @property
    def failed(self) -> bool:
        return any(n.refused for n in self.nodes.values()) or any(f.problems for f in self.files)

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
            opened = open_frame(raw, self.ledger.conn, self.limits, self.tables, self.sealing_keys)
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


def _chunks(records: Iterator[bundle.Record], file: FileReport, max_bytes: int) -> Iterator[Frames]:
    """The file's frames in chunks of at most max_bytes (one larger frame goes alone); its
    damage and manifests land in `file`."""
    chunk: Frames = []
    size = 0
    for rec in records:
        if isinstance(rec, bundle.Damaged):
            file.problems.append(f"bytes {rec.offset}-{rec.end}: {rec.reason}: {rec.detail}")
            continue
        if isinstance(rec, bundle.ManifestRecord):
            if rec.manifest is None:
                file.problems.append(f"manifest at byte {rec.offset} does not parse: {rec.detail}")
            else:
                file.manifests.append(rec.manifest)
            continue
        file.frames += 1
        seq = struct.unpack_from("<Q", rec.raw, 8)[0]
        file.seen.append(bundle.Seen(rec.offset, seq, wire.batch_hash(rec.raw), len(rec.raw)))
        if chunk and size + len(rec.raw) + _LEN.size > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((rec.offset, rec.raw))
        size += len(rec.raw) + _LEN.size
    if chunk:
        yield chunk


def _check_manifests(file: FileReport, conn: Any, report: Report) -> None:
    if not file.manifests:
        file.problems.append("no manifest (the bundle is truncated or not whole); its frames were checked one by one")
        return
    if len(file.manifests) > 1:
        file.problems.append(f"{len(file.manifests)} manifests (parts of several bundles spliced together?)")
    for m in file.manifests:
        key = trust.lookup(conn, m.key_id)
        name = f"manifest {m.hash.hex()[:16]} of {m.site}/{m.node}"
        if key is None or (key.site, key.node) != (m.site, m.node):
            file.problems.append(f"{name}: signed by key {m.key_id.hex()}, not enrolled for that node")
            continue
        if key.state == "revoked":
            file.problems.append(f"{name}: signed by revoked key {m.key_id.hex()}")
            continue
        try:
            bundle.verify_manifest(m, key.public_key)
        except wire.WireError as exc:
            file.problems.append(f"{name}: {exc.detail}")
            continue
        node = report.node(m.site, m.node)
        node.bundles.append(m.hash)
        node.manifest_key = m.key_id
        file.problems += [f"{name}: {p}" for p in bundle.manifest_problems(m, file.seen)]
        others = sorted(f"{s}/{n}" for s, n in file.sites if (s, n) != (m.site, m.node))
        if others:
            file.problems.append(f"{name}: the bundle also holds frames of {', '.join(others)}")


def import_bundles(
    config: CollectorConfig, paths: Sequence[Path], say: Callable[[str], None] = print
) -> Report:
    """Verify and commit every frame of every bundle; returns what happened (no receipt yet)."""
    data_dir = Path(config.data_dir)
    sealing_keys = keyring.load_sealing_keys(keyring.sealing_key_files(data_dir))
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
                report.files.append(_import_file(path, sink, report, config))
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


def _import_file(path: Path, sink: DirectSink | ServeSink, report: Report, config: CollectorConfig) -> FileReport:
    file = FileReport(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, after the mmap)
    except OSError as exc:
        file.problems.append(f"cannot read: {exc.strerror}")
        return file
    try:
        if os.fstat(f.fileno()).st_size == 0:
            file.problems.append("empty file")
            return file
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            max_manifest = bundle.manifest_len(bundle.MAX_MANIFEST_ENTRIES, "x" * 255, "x" * 255)
            records = bundle.read_bundle(buf, sink.max_frame_bytes, max_manifest)
            for chunk in _chunks(records, file, sink.max_frame_bytes):
                for (offset, raw), (result, detail, h) in zip(chunk, sink.commit(chunk, path.name), strict=True):
                    _count(report, file, FrameResult(path.name, offset, result, detail,
                                                     h.site if h else None, h.node if h else None,
                                                     h.seq if h else None), raw)
    finally:
        f.close()
    return file


def _count(report: Report, file: FileReport, r: FrameResult, raw: bytes) -> None:
    if r.site is None or r.node is None or r.seq is None:
        file.problems.append(f"frame at byte {r.offset}: {r.result}: {r.detail}")
        return
    file.sites.add((r.site, r.node))
    node = report.node(r.site, r.node)
    if r.result in ("accepted", "duplicate"):
        # The ledger holds exactly these bytes at this seq (a duplicate is hash-identical).
        node.held[r.seq] = wire.batch_hash(raw)
        if r.result == "accepted":
            node.accepted += 1
        else:
            node.duplicates += 1
    elif r.result == "duplicate_pruned":
        # Recorded once, since pruned by retention: its hash is gone, so nothing says these
        # are the bytes recorded (a reinstalled node reuses seqs). Never in a receipt's held.
        node.pruned += 1
    else:
        node.refused.append(r)

# ---------------------------------------------------------------------------- printing


def ranges_text(ranges: Sequence[tuple[int, int]], limit: int = 6) -> str:
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    return (text or "none") + (f", ... ({len(ranges)} ranges)" if len(ranges) > limit else "")


def describe(report: Report) -> list[str]:
    lines = [f"imported through {report.via}"]
    for (site, node), n in sorted(report.nodes.items()):
        lines.append(f"{site}/{node}: {n.accepted} accepted, {n.duplicates} duplicates, {len(n.refused)} refused"
                     + (f", {n.pruned} recorded before and since pruned (not in the receipt)" if n.pruned else ""))
        for r in n.refused:
            lines.append(f"  refused seq {r.seq} ({r.file}, byte {r.offset}): {r.result}: {r.detail}")
    for f in report.files:
        state = "damaged" if f.problems else "intact"
        lines.append(f"{f.path.name}: {f.frames} frames, {state}")
        lines += [f"  {p}" for p in f.problems]
    return lines
