"""Air-gap bundles and the collector's receipts (docs/bundle.md is the normative description).

A **bundle** carries a node's unacknowledged batches by hand (USB stick, data diode): the
frames exactly as signed, oldest first, then a **manifest** signed by the node key that
lists every frame's seq, hash and length. Each frame still verifies on its own signature,
so a damaged bundle loses only its damaged frames; the manifest makes reordering,
splicing, truncation and substitution visible, and says whether the exporting spool ever
learned where the collector's chain for its node stands (UNPLACED: a new spool).

A **receipt** is the collector's answer, signed by the collector's own key: the seq
ranges it holds for one node, that node's complete-through watermark, the node's chain
head there (highest seq held and that batch's hash, so a node whose spool was lost can
renumber without an uplink) and a receipt number that only grows, so an agent deletes only
what the collector holds and never acts on the same receipt twice.

Everything here is pure (bytes or a read-only buffer in, dataclasses out) and bounded:
bundles and receipts are hostile input. The reader takes any buffer that slices to bytes
and has `find` (bytes, or an mmap of the file, so a large bundle is never read whole).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Protocol

from nacl.bindings import crypto_hash_sha256
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from wire.frame import FIXED_HEADER_LEN, HASH_LEN, KEY_ID_LEN, MAGIC, MAX_NAME_LEN, SIGNATURE_LEN, key_id
from wire.model import I64_MAX, WireError
from wire.table import TABLE_HEAD_LEN, TABLE_MAGIC, parse_table_head

BUNDLE_MAGIC = b"WSBN"
BUNDLE_VERSION = 1
BUNDLE_HEADER = BUNDLE_MAGIC + bytes((BUNDLE_VERSION,))

RECORD_SYNC = b"WR"
TAG_FRAME = 0x46  # "F"
TAG_MANIFEST = 0x4D  # "M"
# A series table (wire/table.py) that v2 frames after it name: carried once per bundle, ahead
# of the first frame that needs it, outside the manifest (each frame's signature covers the
# id of its table, so a table is proven by the frames that name it).
TAG_TABLE = 0x54  # "T"
_TAGS = (TAG_FRAME, TAG_MANIFEST, TAG_TABLE)
_RECORD = struct.Struct("<2sBI")  # sync, tag, body length
RECORD_OVERHEAD = _RECORD.size  # 7

MANIFEST_MAGIC = b"WSM1"
MANIFEST_VERSION = 1
_MANIFEST_FIXED = struct.Struct("<4sBB8sqI")  # magic, version, flags, key_id, created_ms, count
# The exporting spool had never learned where the collector's chain for its node stands (a new
# spool, numbered from seq 1: docs/bundle.md §4.2), so the import checks that the bundle
# continues what the collector holds before it takes any of it.
MANIFEST_UNPLACED = 0x01
MANIFEST_KNOWN_FLAGS = MANIFEST_UNPLACED
_ENTRY = struct.Struct("<Q32sI")  # seq, hash, length
MANIFEST_ENTRY_LEN = _ENTRY.size  # 44
# Bounds what a reader allocates for a manifest whatever its length field says; an exporter
# stops a bundle at this many frames.
MAX_MANIFEST_ENTRIES = 1 << 20

RECEIPT_MAGIC = b"WSR1"
RECEIPT_VERSION = 1
_RECEIPT_FIXED = struct.Struct("<4sB8sQq8sQQ32sHII")
# magic, version, collector key id, receipt_no, issued_ms, node key id, complete_through,
# head seq, head hash, bundle count, range count, batch count
_HELD = struct.Struct("<Q32s")  # seq, chain hash of the batch the collector holds there
RECEIPT_FILE_MAGIC = b"WSRF"
RECEIPT_FILE_VERSION = 1
MAX_RECEIPTS_PER_FILE = 65_536
MAX_RECEIPT_RANGES = 1 << 20
MAX_RECEIPT_BUNDLES = 1024
MAX_RECEIPT_BATCHES = 4 << 20
MAX_RECEIPT_FILE_BYTES = 256 * 1024 * 1024


class Buffer(Protocol):
    """What the bundle reader needs of its input: bytes or an mmap."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice, /) -> bytes: ...

    def find(self, sub: bytes, start: int = ..., /) -> int: ...


def _digest(data: bytes) -> bytes:
    return crypto_hash_sha256(data)


def _name(raw: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos >= len(raw):
        raise WireError("malformed", f"{what} truncated before its {what.split()[-1]} name")
    n = raw[pos]
    text = raw[pos + 1 : pos + 1 + n]
    if n == 0 or len(text) != n:
        raise WireError("malformed", f"{what}: empty or truncated name")
    try:
        return text.decode("utf-8"), pos + 1 + n
    except UnicodeDecodeError:
        raise WireError("malformed", f"{what}: name is not UTF-8") from None


def _name_bytes(text: str) -> bytes:
    raw = text.encode("utf-8")
    if not 0 < len(raw) <= MAX_NAME_LEN:
        raise ValueError("site and node must be 1..255 bytes of UTF-8")
    return bytes((len(raw),)) + raw


# ---------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestEntry:
    seq: int
    hash: bytes  # the frame's chain hash: SHA-256 of the whole frame
    length: int  # the frame's length in bytes


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest. Its `entries` are read from `signed_part` on first use, so a
    manifest that does not verify costs its bytes and no more, whatever count it claims."""

    site: str
    node: str
    key_id: bytes  # the node key that signed the manifest
    created_ms: int
    signed_part: bytes
    signature: bytes
    entries_at: int = 0  # where the entries start in signed_part
    count: int = 0
    flags: int = 0

    @property
    def unplaced(self) -> bool:
        """The exporting spool never learned the collector's chain for this node (MANIFEST_UNPLACED)."""
        return bool(self.flags & MANIFEST_UNPLACED)

    @cached_property
    def entries(self) -> tuple[ManifestEntry, ...]:
        return tuple(ManifestEntry(*_ENTRY.unpack_from(self.signed_part, self.entries_at + i * MANIFEST_ENTRY_LEN))
                     for i in range(self.count))

    @property
    def hash(self) -> bytes:
        """The bundle's identity: SHA-256 of the whole manifest, signature included."""
        return _digest(self.signed_part + self.signature)


def manifest_len(count: int, site: str, node: str) -> int:
    return (_MANIFEST_FIXED.size + 2 + len(site.encode()) + len(node.encode()) + count * MANIFEST_ENTRY_LEN
            + SIGNATURE_LEN)


def encode_manifest(
    signing_key: SigningKey, site: str, node: str, created_ms: int, entries: Sequence[ManifestEntry],
    unplaced: bool = False,
) -> bytes:
    """unplaced: the spool exported from had `resume_needed` set (MANIFEST_UNPLACED)."""
    if len(entries) > MAX_MANIFEST_ENTRIES:
        raise ValueError(f"a manifest lists at most {MAX_MANIFEST_ENTRIES} frames")
    flags = MANIFEST_UNPLACED if unplaced else 0
    parts = [
        _MANIFEST_FIXED.pack(MANIFEST_MAGIC, MANIFEST_VERSION, flags, key_id(bytes(signing_key.verify_key)),
                             created_ms, len(entries)),
        _name_bytes(site),
        _name_bytes(node),
    ]
    parts += [_ENTRY.pack(e.seq, e.hash, e.length) for e in entries]
    signed = b"".join(parts)
    return signed + signing_key.sign(signed).signature


def parse_manifest(raw: bytes) -> Manifest:
    """Structure only (WireError `malformed`); `verify_manifest` checks the signature."""
    if len(raw) < _MANIFEST_FIXED.size + 2 + SIGNATURE_LEN:
        raise WireError("malformed", f"manifest of {len(raw)} bytes is shorter than any manifest")
    magic, version, flags, kid, created_ms, count = _MANIFEST_FIXED.unpack_from(raw, 0)
    if magic != MANIFEST_MAGIC:
        raise WireError("malformed", "bad manifest magic")
    if version != MANIFEST_VERSION:
        raise WireError("unsupported_version", f"manifest version {version}, this side reads {MANIFEST_VERSION}")
    if flags & ~MANIFEST_KNOWN_FLAGS:
        raise WireError("malformed", f"unknown manifest flags 0x{flags:02x}")
    if count > MAX_MANIFEST_ENTRIES:
        raise WireError("limit", f"manifest lists {count} frames, more than {MAX_MANIFEST_ENTRIES}")
    site, pos = _name(raw, _MANIFEST_FIXED.size, "manifest site")
    node, pos = _name(raw, pos, "manifest node")
    if pos + count * MANIFEST_ENTRY_LEN + SIGNATURE_LEN != len(raw):
        raise WireError("malformed", f"manifest lists {count} frames but is {len(raw)} bytes long")
    sig_at = len(raw) - SIGNATURE_LEN
    return Manifest(site, node, kid, created_ms, raw[:sig_at], raw[sig_at:], pos, count, flags)


def verify_manifest(manifest: Manifest, public_key: bytes) -> None:
    if key_id(public_key) != manifest.key_id:
        raise WireError("bad_signature", f"manifest names key {manifest.key_id.hex()}, not the key given")
    try:
        VerifyKey(public_key).verify(manifest.signed_part, manifest.signature)
    except BadSignatureError:
        raise WireError("bad_signature", "manifest signature does not verify with the node's key") from None


# ---------------------------------------------------------------------------- writing


class BundleWriter:
    """Writes a bundle to a binary stream: `add` each frame oldest first, then `finish`."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.entries: list[ManifestEntry] = []
        self.bytes = len(BUNDLE_HEADER)
        out.write(BUNDLE_HEADER)

    def add(self, frame: bytes) -> None:
        if len(self.entries) >= MAX_MANIFEST_ENTRIES:
            raise ValueError(f"a bundle holds at most {MAX_MANIFEST_ENTRIES} frames")
        seq = struct.unpack_from("<Q", frame, 8)[0]
        self.out.write(_RECORD.pack(RECORD_SYNC, TAG_FRAME, len(frame)))
        self.out.write(frame)
        self.entries.append(ManifestEntry(seq, _digest(frame), len(frame)))
        self.bytes += RECORD_OVERHEAD + len(frame)

    def add_table(self, blob: bytes) -> None:
        """A series table the frames added after it name (wire v2); not in the manifest.
        ValueError unless `blob` is one whole table (docs/wire.md §10.1) by its own head."""
        try:
            length = parse_table_head(blob).length
        except WireError as exc:
            raise ValueError(f"not a series table: {exc.detail}") from None
        if length != len(blob):
            raise ValueError(f"a series table of {length} bytes by its head, given {len(blob)}")
        self.out.write(_RECORD.pack(RECORD_SYNC, TAG_TABLE, len(blob)))
        self.out.write(blob)
        self.bytes += RECORD_OVERHEAD + len(blob)

    def size_with(self, frame_len: int, site: str, node: str, table_len: int = 0) -> int:
        """The bundle's size if one more frame of frame_len bytes (after a table record of
        table_len bytes, if not 0) were added and it finished."""
        table = RECORD_OVERHEAD + table_len if table_len else 0
        return self.bytes + table + RECORD_OVERHEAD + frame_len + RECORD_OVERHEAD + manifest_len(
            len(self.entries) + 1, site, node)

    def finish(
        self, signing_key: SigningKey, site: str, node: str, created_ms: int, unplaced: bool = False
    ) -> Manifest:
        """unplaced: the spool these frames come from never learned the collector's chain for
        the node (its `resume_needed`); the manifest says so (MANIFEST_UNPLACED)."""
        raw = encode_manifest(signing_key, site, node, created_ms, self.entries, unplaced)
        self.out.write(_RECORD.pack(RECORD_SYNC, TAG_MANIFEST, len(raw)))
        self.out.write(raw)
        self.bytes += RECORD_OVERHEAD + len(raw)
        return parse_manifest(raw)


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FrameRecord:
    """A frame record whose length agrees with the frame's own; not yet verified."""

    offset: int
    raw: bytes


@dataclass(frozen=True)
class TableRecord:
    """A series table record whose length agrees with the table's own head; not yet checked
    against any frame."""

    offset: int
    raw: bytes


@dataclass(frozen=True)
class ManifestRecord:
    offset: int
    manifest: Manifest | None  # None: it does not parse (see detail)
    detail: str = ""


@dataclass(frozen=True)
class Damaged:
    """Bytes from offset to end that hold no usable record; `reason` as a WireError's."""

    offset: int
    end: int
    reason: str
    detail: str


Record = FrameRecord | TableRecord | ManifestRecord | Damaged


def _frame_len(body: bytes) -> int | None:
    """The length a frame's own header declares, or None if its header is cut short."""
    if len(body) < FIXED_HEADER_LEN + 1:
        return None
    site_len = body[FIXED_HEADER_LEN]
    node_at = FIXED_HEADER_LEN + 1 + site_len
    if node_at >= len(body):
        return None
    payload_len = struct.unpack_from("<I", body, 92)[0]
    return int(node_at + 1 + body[node_at] + payload_len + SIGNATURE_LEN)


# The most bytes a frame's or manifest's header (fixed part and both names) can take: enough
# to learn the length the body declares without copying the body.
_FRAME_HEAD = FIXED_HEADER_LEN + 2 + 2 * MAX_NAME_LEN
_MANIFEST_HEAD = _MANIFEST_FIXED.size + 2 + 2 * MAX_NAME_LEN


def _manifest_len(head: bytes) -> int | None:
    """The length a manifest's own header declares, or None if its header is cut short."""
    if len(head) < _MANIFEST_FIXED.size + 1:
        return None
    count = _MANIFEST_FIXED.unpack_from(head, 0)[5]
    site_len = head[_MANIFEST_FIXED.size]
    node_at = _MANIFEST_FIXED.size + 1 + site_len
    if node_at >= len(head):
        return None
    return int(node_at + 1 + head[node_at] + count * MANIFEST_ENTRY_LEN + SIGNATURE_LEN)


def _body_agrees(buf: Buffer, body_at: int, tag: int, length: int) -> bool:
    """Whether the body at body_at starts with its magic and declares `length` itself, read
    from a slice of at most header size: a lying record costs a few hundred bytes, not its
    claimed length."""
    if tag == TAG_FRAME:
        head = buf[body_at : body_at + min(length, _FRAME_HEAD)]
        return head[:4] == MAGIC and _frame_len(head) == length
    if tag == TAG_TABLE:
        head = buf[body_at : body_at + min(length, TABLE_HEAD_LEN)]
        try:
            return head[:4] == TABLE_MAGIC and parse_table_head(head).length == length
        except WireError:
            return False
    head = buf[body_at : body_at + min(length, _MANIFEST_HEAD)]
    return head[:4] == MANIFEST_MAGIC and _manifest_len(head) == length


def _plausible(buf: Buffer, at: int, size: int) -> bool:
    """Whether a record starts at `at`: sync, a known tag, a length inside the file, and
    the body's own magic and length (from its header alone)."""
    head = buf[at : at + RECORD_OVERHEAD]
    if len(head) < RECORD_OVERHEAD:
        return False
    sync, tag, length = _RECORD.unpack_from(head, 0)
    if sync != RECORD_SYNC or tag not in _TAGS or at + RECORD_OVERHEAD + length > size:
        return False
    return _body_agrees(buf, at + RECORD_OVERHEAD, tag, length)


def _resync(buf: Buffer, start: int, size: int) -> int:
    """The next offset at or after `start` where a plausible record begins (size if none)."""
    at = start
    while True:
        at = buf.find(RECORD_SYNC, at)
        if at < 0:
            return size
        if _plausible(buf, at, size):
            return at
        at += 1


def read_bundle(buf: Buffer, max_frame_bytes: int, max_manifest_bytes: int) -> Iterator[Record]:
    """Every record of a bundle in file order, keeping what can be kept.

    A frame or series table record longer than max_frame_bytes is reported `too_large` and
    skipped unread (the HTTP body limit applies to each frame and each table). A record
    whose header or length is wrong is reported as Damaged and the reader looks for the next
    record (sync, tag, length inside the file, then the frame's, table's or manifest's magic
    and the length its own head declares), so a bit flip, a cut or a splice costs only the
    records it touched. Signatures are not checked here, nor tables past their head."""
    size = len(buf)
    if size < len(BUNDLE_HEADER) or buf[: len(BUNDLE_MAGIC)] != BUNDLE_MAGIC:
        yield Damaged(0, size, "malformed", "not a Waystation bundle (bad magic)")
        return
    version = buf[4:5][0]
    if version != BUNDLE_VERSION:
        yield Damaged(0, size, "unsupported_version", f"bundle version {version}, this side reads {BUNDLE_VERSION}")
        return
    pos = len(BUNDLE_HEADER)
    while pos < size:
        head = buf[pos : pos + RECORD_OVERHEAD]
        problem = ""
        if len(head) < RECORD_OVERHEAD:
            problem = f"{size - pos} bytes at the end are too short for a record (truncated)"
        else:
            sync, tag, length = _RECORD.unpack_from(head, 0)
            body_at = pos + RECORD_OVERHEAD
            if sync != RECORD_SYNC or tag not in _TAGS:
                problem = "no record starts here"
            elif body_at + length > size:
                problem = f"record of {length} bytes runs past the end of the file (truncated)"
            elif tag in (TAG_FRAME, TAG_TABLE) and length > max_frame_bytes:
                what = "frame" if tag == TAG_FRAME else "series table"
                yield Damaged(pos, body_at + length, "too_large",
                              f"{what} of {length} bytes exceeds max_body_bytes {max_frame_bytes}")
                pos = body_at + length
                continue
            elif tag == TAG_MANIFEST and length > max_manifest_bytes:
                yield Damaged(pos, body_at + length, "too_large",
                              f"manifest of {length} bytes exceeds {max_manifest_bytes}")
                pos = body_at + length
                continue
            elif tag == TAG_FRAME:
                # The length is checked from the frame's header before the body is copied.
                if _body_agrees(buf, body_at, tag, length):
                    yield FrameRecord(pos, buf[body_at : body_at + length])
                    pos = body_at + length
                    continue
                problem = "frame record's length disagrees with the frame inside it"
            elif tag == TAG_TABLE:
                if _body_agrees(buf, body_at, tag, length):
                    yield TableRecord(pos, buf[body_at : body_at + length])
                    pos = body_at + length
                    continue
                problem = "series table record's length disagrees with the table inside it"
            elif buf[body_at : body_at + 4] != MANIFEST_MAGIC:
                problem = "manifest record does not hold a manifest"
            else:
                # Copied once, then passed whether it parses or not: the cost is what is passed.
                try:
                    yield ManifestRecord(pos, parse_manifest(buf[body_at : body_at + length]))
                except WireError as exc:
                    yield ManifestRecord(pos, None, f"{exc.reason}: {exc.detail}")
                pos = body_at + length
                continue
        nxt = _resync(buf, pos + 1, size)
        yield Damaged(pos, nxt, "malformed", f"{problem}; {nxt - pos} bytes skipped")
        pos = nxt


@dataclass(frozen=True)
class Seen:
    """A frame found in a bundle, as the manifest check needs it."""

    offset: int
    seq: int
    hash: bytes
    length: int


_RANGES_SHOWN = 20  # a hostile bundle's damage must not make one line megabytes long


def _seq_ranges(seqs: Sequence[int]) -> str:
    out: list[list[int]] = []
    for seq in sorted(seqs):
        if out and out[-1][1] + 1 == seq:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out[:_RANGES_SHOWN])
    return shown + (f", ... ({len(out)} ranges)" if len(out) > _RANGES_SHOWN else "")


def manifest_problems(manifest: Manifest, seen: Iterable[Seen]) -> list[str]:
    """What differs between a (verified) manifest and the frames found: missing, extra
    (spliced in), substituted and reordered frames, each named by seq."""
    problems: list[str] = []
    listed = {e.seq: e for e in manifest.entries}
    found: dict[int, Seen] = {}
    extra: list[int] = []
    substituted: list[int] = []
    for s in seen:
        entry = listed.get(s.seq)
        if entry is None:
            extra.append(s.seq)
            continue
        if entry.hash != s.hash or entry.length != s.length:
            substituted.append(s.seq)
        found.setdefault(s.seq, s)
    missing = [seq for seq in listed if seq not in found]
    if missing:
        problems.append(f"seq {_seq_ranges(missing)} listed in the manifest but not in the bundle "
                        "(truncated or cut out)")
    if extra:
        problems.append(f"seq {_seq_ranges(extra)} in the bundle but not listed in its manifest (spliced in)")
    if substituted:
        problems.append(f"seq {_seq_ranges(substituted)} differs from what the manifest lists "
                        "(substituted or damaged)")
    order = [s.seq for s in seen if s.seq in listed]
    want = [e.seq for e in manifest.entries if e.seq in found]
    if order != want:
        at = next((a for a, b in zip(order, want, strict=False) if a != b), None)
        problems.append(f"frames are not in the manifest's order (first out of place: seq {at})")
    return problems


# ---------------------------------------------------------------------------- receipts


@dataclass(frozen=True)
class Receipt:
    """The collector's signed statement of what it holds for one node.

    Its lists (`held`, `batches`) are read from `signed_part` on first use, so parsing a
    forged receipt allocates nothing in proportion to the counts it claims before
    `verify_receipt` has refused it."""

    collector_key_id: bytes
    receipt_no: int  # per collector, only grows: an agent applies each receipt once
    issued_ms: int
    site: str
    node: str
    node_key_id: bytes  # the node key the collector last enrolled for it (informational)
    complete_through: int
    # The node's chain head at the collector when issued: the highest seq it holds and that
    # batch's chain hash (0 and zeros: it holds nothing), as GET /v1/nodes/{site}/{node}/chain
    # gives it; a new spool continues the chain from here (docs/bundle.md §4.2).
    head_seq: int = 0
    head_hash: bytes = bytes(HASH_LEN)
    bundles: tuple[bytes, ...] = ()  # manifest hashes of the bundles this answers
    signed_part: bytes = b""
    signature: bytes = b""
    ranges_at: int = 0  # where the seq ranges start in signed_part
    n_ranges: int = 0
    n_batches: int = 0

    @cached_property
    def held(self) -> tuple[tuple[int, int], ...]:
        """Closed seq ranges the collector holds, ascending (checked by parse_receipt)."""
        return tuple(struct.unpack_from("<QQ", self.signed_part, self.ranges_at + i * 16)
                     for i in range(self.n_ranges))

    @cached_property
    def batches(self) -> tuple[tuple[int, bytes], ...]:
        """(seq, hash) of each batch of the answered bundles that the collector holds exactly
        (recorded now or before, same bytes): what the agent may delete, and nothing else."""
        at = self.ranges_at + self.n_ranges * 16
        return tuple(_HELD.unpack_from(self.signed_part, at + i * _HELD.size) for i in range(self.n_batches))


def encode_receipt(
    signing_key: SigningKey,
    collector_key_id: bytes,
    receipt_no: int,
    issued_ms: int,
    site: str,
    node: str,
    node_key_id: bytes,
    complete_through: int,
    held: Sequence[tuple[int, int]],
    batches: Sequence[tuple[int, bytes]],
    bundles: Sequence[bytes] = (),
    head: tuple[int, bytes] = (0, bytes(HASH_LEN)),
) -> bytes:
    """`head` is (highest seq the collector holds for the node, that batch's chain hash);
    (0, 32 zero bytes) when it holds nothing."""
    if len(held) > MAX_RECEIPT_RANGES or len(bundles) > MAX_RECEIPT_BUNDLES or len(batches) > MAX_RECEIPT_BATCHES:
        raise ValueError("too many ranges, batches or bundles for one receipt")
    head_seq, head_hash = head
    if len(head_hash) != HASH_LEN or (head_seq == 0) != (head_hash == bytes(HASH_LEN)) or not 0 <= head_seq <= I64_MAX:
        raise ValueError("a chain head is a seq and its 32-byte hash, or 0 and zeros when nothing is held")
    parts = [
        _RECEIPT_FIXED.pack(RECEIPT_MAGIC, RECEIPT_VERSION, collector_key_id, receipt_no, issued_ms,
                            node_key_id or bytes(KEY_ID_LEN), complete_through, head_seq, head_hash,
                            len(bundles), len(held), len(batches)),
        _name_bytes(site),
        _name_bytes(node),
        *bundles,
        *(struct.pack("<QQ", a, b) for a, b in held),
        *(_HELD.pack(seq, h) for seq, h in sorted(batches)),
    ]
    signed = b"".join(parts)
    return signed + signing_key.sign(signed).signature


def parse_receipt(raw: bytes, signing_public_key: bytes | None = None) -> Receipt:
    """Structure only (ValueError saying what is wrong); `verify_receipt` checks the signature.

    With signing_public_key, the header's collector key id and the signature over the raw
    bytes are checked first, before anything past the header is read. Either way the lists
    are not built here (see Receipt)."""
    if len(raw) < _RECEIPT_FIXED.size + 2 + SIGNATURE_LEN:
        raise ValueError(f"receipt of {len(raw)} bytes is shorter than any receipt")
    (magic, version, ckid, no, issued, nkid, through, head_seq, head_hash, n_bundles, n_ranges,
     n_batches) = _RECEIPT_FIXED.unpack_from(raw, 0)
    if magic != RECEIPT_MAGIC:
        raise ValueError("not a Waystation receipt (bad magic)")
    if version != RECEIPT_VERSION:
        raise ValueError(f"receipt version {version}, this agent reads {RECEIPT_VERSION}")
    sig_at = len(raw) - SIGNATURE_LEN
    if signing_public_key is not None:
        if ckid != key_id(signing_public_key):
            raise ValueError(f"signed by collector key {ckid.hex()}, not the key given "
                             f"{key_id(signing_public_key).hex()}")
        _verify_signed(raw[:sig_at], raw[sig_at:], signing_public_key)
    if n_ranges > MAX_RECEIPT_RANGES or n_bundles > MAX_RECEIPT_BUNDLES or n_batches > MAX_RECEIPT_BATCHES:
        raise ValueError("receipt names more ranges or bundles than any collector writes")
    try:
        site, pos = _name(raw, _RECEIPT_FIXED.size, "receipt site")
        node, pos = _name(raw, pos, "receipt node")
    except WireError as exc:
        raise ValueError(exc.detail) from None
    if pos + n_bundles * HASH_LEN + n_ranges * 16 + n_batches * _HELD.size + SIGNATURE_LEN != len(raw):
        raise ValueError(f"receipt's counts do not match its length of {len(raw)} bytes")
    bundles = tuple(raw[pos + i * HASH_LEN : pos + (i + 1) * HASH_LEN] for i in range(n_bundles))
    pos += n_bundles * HASH_LEN
    prev = 0
    for i in range(n_ranges):  # one range at a time: nothing kept
        a, b = struct.unpack_from("<QQ", raw, pos + i * 16)
        if not 1 <= a <= b or a <= prev:
            raise ValueError("receipt's seq ranges are not ascending, disjoint ranges of positive seqs")
        prev = b
    if (head_seq == 0) != (head_hash == bytes(HASH_LEN)) or head_seq > I64_MAX:
        raise ValueError("receipt's chain head is not a seq (at most 2^63 - 1) with its hash, nor 0 with zeros")
    return Receipt(ckid, no, issued, site, node, nkid, through, head_seq, head_hash, bundles, raw[:sig_at],
                   raw[sig_at:], pos, n_ranges, n_batches)


def _verify_signed(signed: bytes, signature: bytes, signing_public_key: bytes) -> None:
    try:
        VerifyKey(signing_public_key).verify(signed, signature)
    except BadSignatureError:
        raise ValueError("signature does not verify with the pinned collector key (forged or damaged)") from None


def verify_receipt(receipt: Receipt, signing_public_key: bytes) -> None:
    """ValueError unless the receipt's signature verifies with the collector's signing key."""
    _verify_signed(receipt.signed_part, receipt.signature, signing_public_key)


def encode_receipt_file(receipts: Sequence[bytes]) -> bytes:
    if len(receipts) > MAX_RECEIPTS_PER_FILE:
        raise ValueError("too many receipts for one file")
    parts = [RECEIPT_FILE_MAGIC, bytes((RECEIPT_FILE_VERSION,)), struct.pack("<I", len(receipts))]
    for r in receipts:
        parts += [struct.pack("<I", len(r)), r]
    return b"".join(parts)


def parse_receipt_file(raw: bytes) -> list[bytes]:
    """The receipts of a receipt file, unparsed; ValueError naming what is wrong."""
    if len(raw) > MAX_RECEIPT_FILE_BYTES:
        raise ValueError(f"receipt file of {len(raw)} bytes is larger than any collector writes")
    if raw[:4] != RECEIPT_FILE_MAGIC:
        raise ValueError("not a Waystation receipt file (bad magic)")
    if len(raw) < 9 or raw[4] != RECEIPT_FILE_VERSION:
        raise ValueError("unsupported or truncated receipt file header")
    (count,) = struct.unpack_from("<I", raw, 5)
    if count > MAX_RECEIPTS_PER_FILE:
        raise ValueError(f"receipt file claims {count} receipts")
    pos, out = 9, []
    for i in range(count):
        if pos + 4 > len(raw):
            raise ValueError(f"receipt file truncated at receipt {i + 1} of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ValueError(f"receipt file truncated in receipt {i + 1} of {count}")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(raw):
        raise ValueError(f"{len(raw) - pos} unexpected bytes after the last receipt")
    return out


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable: a bundle or receipt written, renamed into place, and
    then carried away on a stick must be there, not only its temp name."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
