"""The frame: fixed header, site and node, payload, Ed25519 signature; the hash chain.

"Signing" a batch places a payload at its seq in the node's chain and signs it.
"Sealing" (FLAG_SEALED, wire/sealing.py) encrypts a compressed payload to the collector's
key before it is signed, so the signature covers the ciphertext.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from nacl.bindings import crypto_hash_sha256
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from wire import compression
from wire.compression import compress
from wire.model import I64_MAX, Series, WireError
from wire.payload import encode_series

MAGIC = b"WSB1"
WIRE_VERSION = 1
# Version 2 changes only the DATA payload (wire/columns.py: a series table named by hash and
# fixed-width columns); drop receipts and key rotations read the same in both.
WIRE_VERSION_2 = 2
WIRE_VERSIONS = (WIRE_VERSION, WIRE_VERSION_2)
SIGNATURE_LEN = 64
HASH_LEN = 32
KEY_ID_LEN = 8
ZERO_HASH = bytes(HASH_LEN)

# magic, version, kind, codec, flags, seq, prev_hash, created_wall_ms, created_mono_ns,
# window_start_ms, window_end_ms, series_count, sample_count, raw_len, payload_len, key_id
_FIXED = struct.Struct("<4sBBBBQ32sqQqqIIII8s")
FIXED_HEADER_LEN = _FIXED.size
MAX_NAME_LEN = 255  # site and node names are one length byte each
# The header field is a u64, but receivers keep seq in signed 64-bit storage (SQLite
# INTEGER, Java long): the format itself stops at 2**63 - 1 so every reader can.
MAX_SEQ = I64_MAX

FLAG_SEALED = 0x01  # the payload is encrypted to the collector's key (wire/sealing.py)
KNOWN_FLAGS = FLAG_SEALED


class Kind(IntEnum):
    DATA = 0
    DROP_RECEIPT = 1
    KEY_ROTATION = 2


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1



@dataclass(frozen=True)
class Header:
    version: int
    kind: Kind
    codec: Codec
    flags: int
    seq: int
    prev_hash: bytes
    created_wall_ms: int
    created_mono_ns: int
    window_start_ms: int
    window_end_ms: int
    series_count: int
    sample_count: int
    raw_len: int
    payload_len: int
    key_id: bytes
    site: str
    node: str
    header_len: int = 0


@dataclass(frozen=True)
class Frame:
    """A parsed but not yet verified batch: header, still-compressed payload, signature."""

    header: Header
    payload: bytes
    signature: bytes
    signed_part: bytes
    raw: bytes = field(repr=False)

    @property
    def hash(self) -> bytes:
        return batch_hash(self.raw)



def key_id(public_key: bytes) -> bytes:
    """The 8-byte id of an Ed25519 public key: the head of its SHA-256."""
    return crypto_hash_sha256(public_key)[:KEY_ID_LEN]


def batch_hash(frame: bytes) -> bytes:
    """The chain hash of a batch: SHA-256 over the whole frame, signature included."""
    return crypto_hash_sha256(frame)


@dataclass(frozen=True)
class Prepared:
    """A payload ready to be signed: compressed and counted, not yet placed in a chain."""

    kind: Kind
    codec: Codec
    payload: bytes
    raw_len: int
    window_start_ms: int
    window_end_ms: int
    series_count: int
    sample_count: int
    flags: int = 0  # FLAG_SEALED once wire.sealing.seal_prepared has encrypted the payload
    version: int = WIRE_VERSION


def _sign(
    p: Prepared,
    signing_key: SigningKey,
    site: str,
    node: str,
    seq: int,
    prev_hash: bytes,
    created_wall_ms: int,
    created_mono_ns: int,
) -> bytes:
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} is outside 1..{MAX_SEQ}")
    if p.window_end_ms < p.window_start_ms:
        raise ValueError(f"window ends at {p.window_end_ms}, before its start {p.window_start_ms}")
    if len(prev_hash) != HASH_LEN:
        raise ValueError("prev_hash must be 32 bytes")
    if p.flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown flags 0x{p.flags:02x}")
    if p.version not in WIRE_VERSIONS:
        raise ValueError(f"wire version {p.version} is not one of {WIRE_VERSIONS}")
    site_b = site.encode("utf-8")
    node_b = node.encode("utf-8")
    if not 0 < len(site_b) <= MAX_NAME_LEN or not 0 < len(node_b) <= MAX_NAME_LEN:
        raise ValueError("site and node must be 1..255 bytes of UTF-8")
    head = _FIXED.pack(
        MAGIC,
        p.version,
        p.kind,
        p.codec,
        p.flags,
        seq,
        prev_hash,
        created_wall_ms,
        created_mono_ns,
        p.window_start_ms,
        p.window_end_ms,
        p.series_count,
        p.sample_count,
        p.raw_len,
        len(p.payload),
        key_id(bytes(signing_key.verify_key)),
    )
    signed = b"".join((head, bytes((len(site_b),)), site_b, bytes((len(node_b),)), node_b, p.payload))
    return signed + signing_key.sign(signed).signature


def _build(
    *,
    signing_key: SigningKey,
    kind: Kind,
    raw: bytes,
    site: str,
    node: str,
    seq: int,
    prev_hash: bytes,
    created_wall_ms: int,
    created_mono_ns: int,
    window_start_ms: int,
    window_end_ms: int,
    series_count: int,
    sample_count: int,
    codec: Codec,
    zstd_level: int,
) -> bytes:
    payload = compress(raw, zstd_level) if codec == Codec.ZSTD else raw
    prepared = Prepared(kind, codec, payload, len(raw), window_start_ms, window_end_ms, series_count,
                        sample_count)
    return _sign(prepared, signing_key, site, node, seq, prev_hash, created_wall_ms, created_mono_ns)


def prepare_data(series: list[Series], zstd_level: int = 19, empty_window_ms: int = 0) -> Prepared:
    """Encode and compress series; the costly half of signing, done outside any lock."""
    raw = encode_series(series)
    # Over every point, not first and last: a series may go back in time, and a window
    # must never end before it starts.
    return Prepared(
        Kind.DATA,
        Codec.ZSTD,
        compress(raw, zstd_level),
        len(raw),
        min((min(s.timestamps_ms) for s in series), default=empty_window_ms),
        max((max(s.timestamps_ms) for s in series), default=empty_window_ms),
        len(series),
        sum(len(s.timestamps_ms) for s in series),
    )


def sign_batch(p: Prepared, ctx: BatchContext) -> bytes:
    """Place a prepared payload at ctx.seq in the chain and sign it."""
    return _sign(p, ctx.signing_key, ctx.site, ctx.node, ctx.seq, ctx.prev_hash, ctx.created_wall_ms,
                 ctx.created_mono_ns)


def resign_batch(frame: Frame, ctx: BatchContext) -> bytes:
    """The same payload and times at a new place in the chain (an agent resuming after its
    spool was lost renumbers what it had not sent yet above what the collector already holds).
    A sealed payload stays sealed: the ciphertext is carried over as it is."""
    h = frame.header
    p = Prepared(h.kind, h.codec, frame.payload, h.raw_len, h.window_start_ms, h.window_end_ms,
                 h.series_count, h.sample_count, h.flags, h.version)
    return _sign(p, ctx.signing_key, ctx.site, ctx.node, ctx.seq, ctx.prev_hash, h.created_wall_ms,
                 h.created_mono_ns)


@dataclass(frozen=True)
class BatchContext:
    """Who signs the next batch and where it sits in the chain."""

    signing_key: SigningKey
    site: str
    node: str
    seq: int
    prev_hash: bytes
    created_wall_ms: int
    created_mono_ns: int
    zstd_level: int = 19


def encode_data_batch(ctx: BatchContext, series: list[Series]) -> bytes:
    return sign_batch(prepare_data(series, ctx.zstd_level, ctx.created_wall_ms), ctx)




def parse_frame(raw: bytes) -> Frame:
    """Split a batch into header, payload and signature; checks structure and the header's
    own ranges (seq, window), nothing that needs a key or the payload."""
    if len(raw) < FIXED_HEADER_LEN + 2 + SIGNATURE_LEN:
        raise WireError("malformed", f"batch of {len(raw)} bytes is shorter than any valid batch")
    fields = _FIXED.unpack_from(raw, 0)
    magic, version, kind, codec, flags, seq = fields[:6]
    if magic != MAGIC:
        raise WireError("malformed", "bad magic (not a Waystation batch)")
    if version not in WIRE_VERSIONS:
        raise WireError("unsupported_version",
                        f"wire version {version}, this side speaks {', '.join(map(str, WIRE_VERSIONS))}")
    pos = FIXED_HEADER_LEN
    site_len = raw[pos]
    site_b = raw[pos + 1 : pos + 1 + site_len]
    pos += 1 + site_len
    if pos >= len(raw):
        raise WireError("malformed", "header truncated in site name")
    node_len = raw[pos]
    node_b = raw[pos + 1 : pos + 1 + node_len]
    pos += 1 + node_len
    payload_len = fields[14]
    if pos + payload_len + SIGNATURE_LEN != len(raw):
        raise WireError(
            "malformed",
            f"length mismatch: header says {payload_len}-byte payload, batch has "
            f"{len(raw) - pos - SIGNATURE_LEN}",
        )
    try:
        site = site_b.decode("utf-8")
        node = node_b.decode("utf-8")
        kind_e = Kind(kind)
        codec_e = Codec(codec)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError("malformed", f"bad header field: {exc}") from exc
    if not site or not node:
        raise WireError("malformed", "empty site or node")
    if flags & ~KNOWN_FLAGS:
        raise WireError("malformed", f"unknown flags 0x{flags:02x}")
    if seq < 1:
        raise WireError("malformed", "seq 0 is never used")
    if seq > MAX_SEQ:
        raise WireError("malformed", f"seq {seq} exceeds the largest seq, 2**63 - 1 = {MAX_SEQ}")
    window_start_ms, window_end_ms = fields[9], fields[10]
    if window_end_ms < window_start_ms:
        raise WireError("malformed", f"window ends at {window_end_ms} ms, before its start at {window_start_ms} ms")
    header = Header(
        version,
        kind_e,
        codec_e,
        flags,
        seq,
        fields[6],
        fields[7],
        fields[8],
        window_start_ms,
        window_end_ms,
        fields[11],
        fields[12],
        fields[13],
        payload_len,
        fields[15],
        site,
        node,
        pos,
    )
    sig_at = len(raw) - SIGNATURE_LEN
    return Frame(header, raw[pos:sig_at], raw[sig_at:], raw[:sig_at], raw)


def verify_signature(frame: Frame, public_key: bytes) -> None:
    try:
        VerifyKey(public_key).verify(frame.signed_part, frame.signature)
    except BadSignatureError as exc:
        raise WireError("bad_signature", "signature does not verify with the node's key") from exc


def check_raw_len(header: Header, max_raw_bytes: int) -> None:
    """The declared decoded size against the reader's limit, before any work on the payload."""
    if header.raw_len > max_raw_bytes:
        raise WireError("too_large", f"declared payload of {header.raw_len} bytes exceeds {max_raw_bytes}")


def decompress_payload(frame: Frame, max_raw_bytes: int, unsealed: bytes | None = None) -> bytes:
    """Return the raw payload, never producing more than max_raw_bytes (zstd bombs cost nothing).

    A sealed frame's payload is ciphertext: pass what wire.sealing.unseal made of it as
    `unsealed` (wire.open_batch does)."""
    h = frame.header
    check_raw_len(h, max_raw_bytes)
    payload = frame.payload
    if h.flags & FLAG_SEALED:
        if unsealed is None:
            raise WireError("sealed_to_unknown_key",
                            "the payload is sealed (encrypted to the collector's key); unseal it first")
        payload = unsealed
    if h.codec == Codec.NONE:
        if h.raw_len != len(payload):
            raise WireError("malformed", "uncompressed payload length differs from header")
        return payload
    return compression.decompress(payload, h.raw_len, max_raw_bytes)


def check_counts(frame: Frame, series: list[Series]) -> None:
    h = frame.header
    samples = sum(len(s.timestamps_ms) for s in series)
    if h.series_count != len(series) or h.sample_count != samples:
        raise WireError(
            "schema",
            f"header counts {h.series_count} series/{h.sample_count} samples, "
            f"payload has {len(series)}/{samples}",
        )
