"""Control payloads carried in the chain: drop receipts and key rotations (JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from wire.frame import MAX_SEQ, SIGNATURE_LEN, BatchContext, Codec, Frame, Header, Kind, _build, key_id
from wire.model import I64_MAX, I64_MIN, WireError


@dataclass(frozen=True)
class DropReceipt:
    """The spool evicted these seq ranges before they were delivered."""

    ranges: tuple[tuple[int, int], ...]
    t0_ms: int
    t1_ms: int
    batches: int
    samples: int
    bytes: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "ranges": [list(r) for r in self.ranges],
            "t0_ms": self.t0_ms,
            "t1_ms": self.t1_ms,
            "batches": self.batches,
            "samples": self.samples,
            "bytes": self.bytes,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class KeyRotation:
    """Announces the node's next key; signed by the old key, proven by the new one."""

    new_public_key: bytes
    proof: bytes  # new key's signature over rotation_proof_message(...)



def rotation_proof_message(site: str, node: str, old_key_id: bytes, new_public_key: bytes) -> bytes:
    return b"waystation-key-rotation\0" + site.encode() + b"\0" + node.encode() + b"\0" + old_key_id + new_public_key


def encode_drop_receipt(ctx: BatchContext, receipt: DropReceipt) -> bytes:
    raw = json.dumps(receipt.to_json(), sort_keys=True, separators=(",", ":")).encode()
    return _build(
        signing_key=ctx.signing_key,
        kind=Kind.DROP_RECEIPT,
        raw=raw,
        site=ctx.site,
        node=ctx.node,
        seq=ctx.seq,
        prev_hash=ctx.prev_hash,
        created_wall_ms=ctx.created_wall_ms,
        created_mono_ns=ctx.created_mono_ns,
        window_start_ms=receipt.t0_ms,
        window_end_ms=receipt.t1_ms,
        series_count=0,
        sample_count=0,
        codec=Codec.NONE,
        zstd_level=0,
    )


def encode_key_rotation(ctx: BatchContext, new_key: SigningKey) -> bytes:
    new_pub = bytes(new_key.verify_key)
    old_id = key_id(bytes(ctx.signing_key.verify_key))
    proof = new_key.sign(rotation_proof_message(ctx.site, ctx.node, old_id, new_pub)).signature
    raw = json.dumps({"new_public_key": new_pub.hex(), "proof": proof.hex()}, sort_keys=True).encode()
    return _build(
        signing_key=ctx.signing_key,
        kind=Kind.KEY_ROTATION,
        raw=raw,
        site=ctx.site,
        node=ctx.node,
        seq=ctx.seq,
        prev_hash=ctx.prev_hash,
        created_wall_ms=ctx.created_wall_ms,
        created_mono_ns=ctx.created_mono_ns,
        window_start_ms=ctx.created_wall_ms,
        window_end_ms=ctx.created_wall_ms,
        series_count=0,
        sample_count=0,
        codec=Codec.NONE,
        zstd_level=0,
    )



def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting depth
        raise WireError("malformed", f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{what} is not a JSON object")
    return obj


def _json_int(value: object, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise TypeError(f"{value!r} is not an integer in [{lo}, {hi}]")
    return value


MAX_DROP_RANGES = 100_000


def decode_drop_receipt(raw: bytes) -> DropReceipt:
    """Decode a drop receipt's JSON (`malformed` when it breaks a field rule); the rules that
    need the carrying frame's header are check_drop_receipt's."""
    obj = _json_object(raw, "drop receipt")
    try:
        if not isinstance(obj["ranges"], list) or len(obj["ranges"]) > MAX_DROP_RANGES:
            raise TypeError(f"ranges must be a list of at most {MAX_DROP_RANGES} [a, b] pairs")
        ranges: list[tuple[int, int]] = []
        for pair in obj["ranges"]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise TypeError(f"range {pair!r} is not [a, b]")
            ranges.append((_json_int(pair[0], 1, MAX_SEQ), _json_int(pair[1], 1, MAX_SEQ)))
        if not isinstance(obj["reason"], str):
            raise TypeError("reason must be a string")
        receipt = DropReceipt(
            tuple(ranges),
            _json_int(obj["t0_ms"], I64_MIN, I64_MAX),
            _json_int(obj["t1_ms"], I64_MIN, I64_MAX),
            _json_int(obj["batches"], 0, I64_MAX),
            _json_int(obj["samples"], 0, I64_MAX),
            _json_int(obj["bytes"], 0, I64_MAX),
            obj["reason"],
        )
    except (KeyError, TypeError) as exc:
        raise WireError("malformed", f"drop receipt is not valid: {exc}") from exc
    if any(b < a for a, b in ranges):
        raise WireError("malformed", "drop receipt has an invalid seq range")
    return receipt


def _seqs_named(ranges: tuple[tuple[int, int], ...]) -> int:
    """How many distinct seqs the inclusive ranges cover (ranges may overlap or repeat)."""
    total = 0
    covered_to = 0  # seqs start at 1
    for a, b in sorted(ranges):
        if b > covered_to:
            total += b - max(a, covered_to + 1) + 1
            covered_to = b
    return total


def check_drop_receipt(receipt: DropReceipt, header: Header) -> None:
    """Refuse (`schema`) a drop receipt that disagrees with its own header or with itself.

    Called after decode_drop_receipt, on the header of the frame that carried the receipt.
    Every rule here is one the reference agent keeps (spool._append_receipt): a receipt
    names seqs it evicted before it was signed, counts each evicted batch once, and copies
    t0_ms/t1_ms into the header's window."""
    if header.kind != Kind.DROP_RECEIPT:
        raise WireError("schema", f"a {header.kind.name} batch does not carry a drop receipt")
    if header.series_count or header.sample_count:
        raise WireError(
            "schema",
            f"drop receipt header counts {header.series_count} series/{header.sample_count} samples, "
            "must be 0/0",
        )
    if receipt.t1_ms < receipt.t0_ms:
        raise WireError("schema", f"drop receipt t1_ms {receipt.t1_ms} precedes t0_ms {receipt.t0_ms}")
    if (header.window_start_ms, header.window_end_ms) != (receipt.t0_ms, receipt.t1_ms):
        raise WireError(
            "schema",
            f"drop receipt header window {header.window_start_ms}..{header.window_end_ms} is not "
            f"its t0_ms..t1_ms {receipt.t0_ms}..{receipt.t1_ms}",
        )
    # A receipt cannot know of batches after itself; a range reaching its own seq or beyond
    # would let one batch declare the node's future lost.
    beyond = [(a, b) for a, b in receipt.ranges if b >= header.seq]
    if beyond:
        raise WireError(
            "schema",
            f"drop receipt seq {header.seq} covers {beyond[0][0]}..{beyond[0][1]}: a receipt may "
            "only cover seqs before its own",
        )
    named = _seqs_named(receipt.ranges)
    if not 1 <= receipt.batches <= named:
        raise WireError(
            "schema",
            f"drop receipt counts {receipt.batches} batches, its ranges name {named} seqs "
            "(must be 1..that many)",
        )


def decode_key_rotation(frame: Frame, raw: bytes) -> KeyRotation:
    """Decode and prove a key rotation: `malformed` JSON, then `schema` for a header that
    disagrees with the kind, then `bad_signature` for a proof that does not verify."""
    obj = _json_object(raw, "key rotation")
    try:
        new_pub = bytes.fromhex(obj["new_public_key"])
        proof = bytes.fromhex(obj["proof"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError("malformed", f"key rotation is not valid: {exc}") from exc
    if len(new_pub) != 32 or len(proof) != SIGNATURE_LEN:
        raise WireError("malformed", "new public key must be 32 bytes and proof 64 bytes")
    h = frame.header
    if h.kind != Kind.KEY_ROTATION:
        raise WireError("schema", f"a {h.kind.name} batch does not carry a key rotation")
    if h.series_count or h.sample_count:
        raise WireError(
            "schema", f"key rotation header counts {h.series_count} series/{h.sample_count} samples, must be 0/0"
        )
    if not h.window_start_ms == h.window_end_ms == h.created_wall_ms:
        raise WireError(
            "schema",
            f"key rotation window {h.window_start_ms}..{h.window_end_ms} is not its created_wall_ms "
            f"{h.created_wall_ms}",
        )
    try:
        VerifyKey(new_pub).verify(rotation_proof_message(h.site, h.node, h.key_id, new_pub), proof)
    except BadSignatureError as exc:
        raise WireError("bad_signature", "new key's proof of possession does not verify") from exc
    return KeyRotation(new_pub, proof)

