"""`waystation-collector import`: air-gap bundles into the ledger, and the signed receipt.

Every frame goes through ingest's own path: `ingest.open_frame` (open_batch with the node
keys, the sealing keys and ingest's limits), `ingest.submission`, `Ledger.commit`
(idempotent on (node, seq), so a batch that came both ways counts once). Which process
commits depends on whether `serve` runs on this data_dir, because serve keeps the ledger's
accounting (Ledger's node cache) and the exposed latest state in memory, and a second
writer behind its back would leave both stale and then overwrite the nodes table:

- serve holds an exclusive flock on `<data_dir>/serve.lock` for its whole life and, once
  listening, writes `<data_dir>/serve.json` (mode 0600: its loopback URL, a random token,
  its max_body_bytes). An import that finds the lock held hands the frames to serve over
  POST /v1/import (same host only, with the token), which verifies and commits them
  exactly as posts (Ingest.import_frames): /metrics, the ingest counters and the
  remote-write forwarder (which reads the ledger) see them as they see any batch.
- otherwise the import takes the lock itself, so serve cannot start meanwhile (it waits),
  and commits through collector.ledger directly; serve's next start replays them into
  the latest state and its forwarder forwards them, like anything recorded after its
  last save.

The receipt is built afterwards, in this process, from the committed ledger (the held seq
ranges and the watermark) and signed with the collector's key (docs/bundle.md §4).
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import secrets
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wire
from collector import keyring, trust
from collector import ledger as ledger_mod
from collector.config import CollectorConfig
from collector.ingest import MAX_GROUP, open_frame, open_limits, result_word, submission
from wire import bundle

LOCK_FILE = "serve.lock"
ENDPOINT_FILE = "serve.json"
TOKEN_HEADER = "X-Waystation-Import-Token"
ORIGIN_HEADER = "X-Waystation-Origin-File"
IMPORT_CONTENT_TYPE = "application/x-waystation-frames"
_LEN = struct.Struct("<I")
# How long an import waits for a starting serve to publish its endpoint (its start-up
# replay of the ledger comes first), and for serve to answer a chunk.
ENDPOINT_WAIT_S = 300.0
CHUNK_TIMEOUT_S = 600.0
RETRIES = 20  # per chunk, for frames serve answers overloaded/unavailable


class ImportError_(Exception):
    """An import that cannot go on (no ledger, serve unreachable); the message says why."""


# ---------------------------------------------------------------------------- the lock


class DataDirLock:
    """The flock on <data_dir>/serve.lock that serve holds while it runs (and an import
    while it commits directly); its content says who holds it: `serve <pid>` / `import <pid>`."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.held = False

    def try_acquire(self, role: str) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._mark(role)
        return True

    def acquire(self, role: str) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self._mark(role)

    def _mark(self, role: str) -> None:
        self.held = True
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{role} {os.getpid()}\n".encode(), 0)

    def holder(self) -> tuple[str, int]:
        """(role, pid) as the holder wrote it; ("", 0) if not (yet) written."""
        try:
            role, pid = os.pread(self.fd, 64, 0).decode().split()
            return role, int(pid)
        except ValueError:
            return "", 0

    def close(self) -> None:
        if self.held:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # releases the flock
        self.held = False


def acquire_for_serve(data_dir: Path, say: Callable[[str], None]) -> DataDirLock:
    """serve's lock: waits for an import to finish; refuses if another serve holds it."""
    lock = DataDirLock(data_dir)
    while not lock.try_acquire("serve"):
        role, pid = lock.holder()
        if role == "serve":
            lock.close()
            raise ImportError_(f"another `waystation-collector serve` (pid {pid}) uses {data_dir}")
        say(f"waiting for `waystation-collector import` (pid {pid}) to finish with {data_dir}")
        lock.acquire("serve")
        break
    return lock


def write_endpoint(data_dir: Path, url: str, token: str, max_body_bytes: int) -> Path:
    """Where an import finds this serve (mode 0600: the token lets it import)."""
    path = data_dir / ENDPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode otherwise
        os.write(fd, json.dumps({"pid": os.getpid(), "url": url, "token": token,
                                 "max_body_bytes": max_body_bytes}).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def new_token() -> str:
    return secrets.token_hex(32)


def loopback_url(scheme: str, host: str, port: int) -> str:
    """The URL this host reaches a listener on: a wildcard address means loopback."""
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    url: str
    token: str
    max_body_bytes: int


def _read_endpoint(data_dir: Path, pid: int) -> Endpoint | None:
    try:
        doc = json.loads((data_dir / ENDPOINT_FILE).read_text())
        if int(doc["pid"]) != pid:
            return None  # left by an earlier serve; this one has not published yet
        return Endpoint(str(doc["url"]), str(doc["token"]), int(doc["max_body_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _claim(data_dir: Path, say: Callable[[str], None]) -> DataDirLock | Endpoint:
    """The lock (serve is not running: commit directly) or the running serve's endpoint."""
    lock = DataDirLock(data_dir)
    deadline = time.monotonic() + ENDPOINT_WAIT_S
    said = False
    while True:
        if lock.try_acquire("import"):
            return lock
        role, pid = lock.holder()
        if role == "import":
            say(f"waiting for another import (pid {pid}) to finish")
            lock.acquire("import")
            return lock
        if role == "serve":
            endpoint = _read_endpoint(data_dir, pid)
            if endpoint is not None:
                lock.close()
                return endpoint
            if not said:
                say(f"serve (pid {pid}) is starting; waiting for it to listen")
                said = True
        if time.monotonic() > deadline:
            lock.close()
            raise ImportError_(f"serve (pid {pid}) holds {data_dir / LOCK_FILE} but has not published "
                               f"{ENDPOINT_FILE} within {ENDPOINT_WAIT_S:.0f}s")
        time.sleep(0.2)


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


Frames = list[tuple[int, bytes]]  # (offset in the file, frame)
Answer = tuple[str, str, wire.Header | None]  # result, detail, header


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


class ServeSink:
    """serve is running: POST /v1/import; serve verifies and commits as it does posts."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.max_frame_bytes = endpoint.max_body_bytes
        self.context: ssl.SSLContext | None = None
        if endpoint.url.startswith("https:"):
            # Same host: the token authenticates us; serve's certificate names its public name.
            self.context = ssl.create_default_context()
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE

    def _post(self, frames: Frames, origin_file: str) -> list[dict[str, Any]]:
        body = b"".join(_LEN.pack(len(raw)) + raw for _, raw in frames)
        req = urllib.request.Request(
            f"{self.endpoint.url}/v1/import", data=body, method="POST",
            headers={"Content-Type": IMPORT_CONTENT_TYPE, TOKEN_HEADER: self.endpoint.token,
                     ORIGIN_HEADER: urllib.parse.quote(origin_file)},
        )
        try:
            with urllib.request.urlopen(req, timeout=CHUNK_TIMEOUT_S, context=self.context) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ImportError_(f"serve at {self.endpoint.url} refused the import: {exc.code} "
                               f"{exc.read()[:500].decode(errors='replace')}") from None
        except (OSError, ValueError) as exc:
            raise ImportError_(f"cannot reach serve at {self.endpoint.url}: {exc}") from None
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list) or len(results) != len(frames):
            raise ImportError_(f"serve at {self.endpoint.url} answered the import with something else")
        return results

    def commit(self, frames: Frames, origin_file: str) -> list[Answer]:
        answers: list[Answer] = [("", "", None)] * len(frames)
        todo = list(range(len(frames)))
        for attempt in range(RETRIES):
            results = self._post([frames[i] for i in todo], origin_file)
            retry = []
            for i, r in zip(todo, results, strict=True):
                header = _header_of(frames[i][1])
                answers[i] = (str(r.get("result")), str(r.get("detail", "")), header)
                if r.get("result") in ("overloaded", "unavailable"):
                    retry.append(i)
            if not retry:
                break
            todo = retry
            time.sleep(min(5.0, 0.2 * 2**attempt))
        return answers

    def close(self) -> None:
        pass


def _header_of(raw: bytes) -> wire.Header | None:
    try:
        return wire.parse_frame(raw).header
    except wire.WireError:
        return None


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
    claimed = _claim(data_dir, say)
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


# ---------------------------------------------------------------------------- receipts


def issue_receipts(config: CollectorConfig, report: Report) -> list[bytes]:
    """One signed receipt per node that proved itself (a verified frame or manifest):
    everything the collector holds for it now, its watermark, a new receipt number."""
    pair = keyring.current(Path(config.data_dir))
    if pair is None:
        raise ImportError_(f"{keyring.current_path(Path(config.data_dir))}: no collector key to sign receipts "
                           "with; run `waystation-collector keygen`")
    conn = ledger_mod.connect(config.ledger_path, create=False)
    out: list[bytes] = []
    try:
        for (site, node), n in sorted(report.nodes.items()):
            if not (n.accepted or n.duplicates or n.pruned or n.bundles):
                continue
            node_key = n.manifest_key or _enrolled_key(conn, site, node)
            raw = bundle.encode_receipt(
                pair.signing, pair.key_id, ledger_mod.next_receipt_no(conn), int(time.time() * 1000),
                site, node, node_key, ledger_mod.complete_through(conn, site, node),
                ledger_mod.held_ranges(conn, site, node), sorted(n.held.items()), n.bundles,
            )
            out.append(raw)
            report.receipts.append(bundle.parse_receipt(raw))
    finally:
        conn.close()
    return out


def _enrolled_key(conn: Any, site: str, node: str) -> bytes:
    keys = [k for k in trust.all_keys(conn) if (k.site, k.node) == (site, node) and k.state == "enrolled"]
    return max(keys, key=lambda k: k.valid_from_seq).key_id if keys else b""


def write_receipts(path: Path, receipts: Sequence[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(bundle.encode_receipt_file(receipts))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    bundle.fsync_dir(path.parent)


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
