"""Sealed payloads (docs/wire.md §5): the pinned key's text, the envelope, open_batch's
refusals, the order of checks (signature before decryption), and §5.4's worked example.

The example and the envelope checks are built from the document with libsodium's raw
crypto_box, never with wire.sealing, so a failure means the document and wire/ disagree.
Run `python3 tests/unit/test_sealing.py` to print the blocks docs/wire.md embeds.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from nacl.bindings import crypto_box, crypto_box_open, crypto_scalarmult_base
from nacl.public import PrivateKey
from nacl.signing import SigningKey

import wire
from agent.config import load_agent_config
from agent.spool import Spool
from tests.integration.harness import plaintext_hits
from tests.unit.test_wire import EXAMPLE_SEED, T0, assert_same, doc_block, example_series
from wire import Codec, Kind, MetricType, Series
from wire.config import ConfigError
from wire.keys import CollectorKey, parse_collector_key

NODE = SigningKey(hashlib.sha256(b"sealing test node").digest())
COLLECTOR_SIGNING = SigningKey(hashlib.sha256(b"sealing test collector signing").digest())
COLLECTOR_SEALING = PrivateKey(hashlib.sha256(b"sealing test collector sealing").digest())
PIN = CollectorKey(bytes(COLLECTOR_SIGNING.verify_key), bytes(COLLECTOR_SEALING.public_key))
OTHER_SEALING = PrivateKey(hashlib.sha256(b"another collector").digest())
OTHER_PIN = CollectorKey(bytes(SigningKey(hashlib.sha256(b"another signing").digest()).verify_key),
                         bytes(OTHER_SEALING.public_key))
KEYS = {PIN.key_id: COLLECTOR_SEALING}


class Enrolled:
    """A node key record as open_batch wants it: valid for every seq of s1/n1."""

    public_key = bytes(NODE.verify_key)

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return None


def lookup(key_id: bytes) -> Enrolled | None:
    return Enrolled() if key_id == wire.key_id(bytes(NODE.verify_key)) else None


class CountingKeys(Mapping[bytes, PrivateKey]):
    """Sealing keys that count every look-up: decryption work starts with one."""

    def __init__(self, keys: dict[bytes, PrivateKey]) -> None:
        self.keys = keys
        self.lookups = 0

    def __getitem__(self, key: bytes) -> PrivateKey:
        self.lookups += 1
        return self.keys[key]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def series(n: int = 3) -> list[Series]:
    return [
        Series("node_cpu_seconds_total", (("cpu", str(i)), ("mode", "idle")), MetricType.COUNTER,
               (T0, T0 + 1000), (100.0 + i, 101.5 + i))
        for i in range(n)
    ]


def sealed_frame(s: list[Series], pin: CollectorKey = PIN, seq: int = 1) -> bytes:
    prepared = wire.seal_prepared(wire.prepare_data(s, 3), pin)
    return wire.sign_batch(prepared, wire.BatchContext(NODE, "s1", "n1", seq, wire.ZERO_HASH, T0, 1))


def signed_with_payload(envelope: bytes, raw_len: int) -> bytes:
    """A frame around any envelope, signed by the node: what a broken or hostile node sends."""
    p = wire.Prepared(Kind.DATA, Codec.ZSTD, envelope, raw_len, T0, T0 + 1000, 3, 6, wire.FLAG_SEALED)
    return wire.sign_batch(p, wire.BatchContext(NODE, "s1", "n1", 1, wire.ZERO_HASH, T0, 1))


def refusal(raw: bytes, keys: Mapping[bytes, PrivateKey] | None = KEYS,
            limits: wire.OpenLimits = wire.DEFAULT_OPEN_LIMITS) -> wire.Refusal:
    opened = wire.open_batch(raw, lookup, limits, sealing_keys=keys)
    assert isinstance(opened, wire.Refusal), "a batch that should be refused opened"
    return opened


# ---------------------------------------------------------------- the pinned key's text


def test_pinned_key_text_round_trips_and_carries_its_key_id() -> None:
    text = PIN.text()
    prefix, key_id, _ = text.split(":")
    assert prefix == "wsc1" and key_id == PIN.key_id.hex()
    assert PIN.key_id == hashlib.sha256(PIN.signing_public_key + PIN.sealing_public_key).digest()[:8]
    assert parse_collector_key(text) == PIN
    assert parse_collector_key(f"  {text}\n") == PIN


@pytest.mark.parametrize(
    ("mangle", "says"),
    [
        (lambda t: t.split(":", 1)[1], "expected wsc1:<key id>:<base64>"),
        (lambda t: "wsc2" + t[4:], "this agent understands 'wsc1'"),
        (lambda t: t.replace(":", ":zz", 1), "must be 16 hex digits"),
        (lambda t: t[:-6] + "!!!!==", "is not base64"),
        (lambda t: t[:-4], "must decode to 64 bytes"),
        (lambda t: t[:-24] + "=", "must decode to 64 bytes"),
        (lambda t: t.rsplit(":", 1)[0] + ":" + "AAAA" * 8, "must decode to 64 bytes"),
        (lambda t: t[:-8] + ("B" if t[-8] != "B" else "C") + t[-7:], "does not match the keys"),
        (lambda t: t.replace(PIN.key_id.hex(), OTHER_PIN.key_id.hex()), "does not match the keys"),
    ],
)
def test_a_bad_pinned_key_says_what_is_wrong(mangle: object, says: str) -> None:
    bad = mangle(PIN.text())  # type: ignore[operator]
    with pytest.raises(ValueError) as info:
        parse_collector_key(bad)
    assert says in str(info.value)


def test_agent_config_names_collector_key_when_it_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[uplink]\ncollector_key = "{PIN.text()}"\n')
    assert load_agent_config(good).uplink.collector_pin == PIN
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[uplink]\ncollector_key = "{PIN.text()[:-10]}"\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(bad)
    assert "uplink" in str(info.value) and "collector_key" in str(info.value) and str(bad) in str(info.value)
    assert load_agent_config(None).uplink.collector_pin is None  # default: not sealed


# ---------------------------------------------------------------- seal, sign, open


def test_sealed_batch_opens_to_exactly_what_was_sealed() -> None:
    s = series()
    raw = sealed_frame(s)
    frame = wire.parse_frame(raw)
    assert frame.header.flags == wire.FLAG_SEALED
    assert frame.header.raw_len == len(wire.encode_series(s))
    assert frame.payload[0] == 1 and frame.payload[1:9] == PIN.key_id
    assert b"node_cpu_seconds_total" not in raw and b"idle" not in raw
    opened = wire.open_batch(raw, lookup, sealing_keys=KEYS)
    assert isinstance(opened, wire.VerifiedBatch), opened
    assert_same(opened.series, s)


def test_every_payload_gets_its_own_ephemeral_key() -> None:
    a, b = (wire.seal(b"same payload", PIN) for _ in range(2))
    assert a[:9] == b[:9] and a[9:41] != b[9:41] and a[41:] != b[41:]


def test_the_reference_sealer_is_crypto_box_seal_as_documented() -> None:
    payload = wire.compress(b"x" * 500 + bytes(range(256)), 3)
    env = wire.seal(payload, PIN)
    assert len(env) == 57 + len(payload) == wire.SEAL_OVERHEAD + len(payload)
    scheme, key_id, epk, boxed = env[0], env[1:9], env[9:41], env[41:]
    nonce = hashlib.blake2b(epk + PIN.sealing_public_key, digest_size=24).digest()
    assert (scheme, key_id) == (1, PIN.key_id)
    assert crypto_box_open(boxed, nonce, epk, bytes(COLLECTOR_SEALING)) == payload


def test_sealed_to_a_key_the_collector_does_not_hold() -> None:
    raw = sealed_frame(series(), OTHER_PIN)
    for keys in (None, {}, KEYS):
        r = refusal(raw, keys)
        assert r.result == "sealed_to_unknown_key" and r.signed
        assert OTHER_PIN.key_id.hex() in r.detail
    assert PIN.key_id.hex() in refusal(raw, KEYS).detail  # names what it does hold


def test_an_envelope_that_does_not_decrypt_with_the_key_it_names_is_undecryptable() -> None:
    # Encrypted to another pair but naming ours: the node signed it, the key cannot open it.
    env = wire.seal(wire.prepare_data(series(), 3).payload, OTHER_PIN)
    raw = signed_with_payload(env[:1] + PIN.key_id + env[9:], len(wire.encode_series(series())))
    r = refusal(raw)
    assert (r.result, r.signed) == ("undecryptable", True) and PIN.key_id.hex() in r.detail


def test_tampered_ciphertext_is_caught_by_the_signature_before_any_decryption() -> None:
    raw = bytearray(sealed_frame(series()))
    h = wire.parse_frame(bytes(raw)).header
    raw[h.header_len + 60] ^= 0x01  # inside the ciphertext
    keys = CountingKeys(KEYS)
    assert refusal(bytes(raw), keys).result == "bad_signature"
    assert keys.lookups == 0
    # The same change signed by the node (a broken sender) reaches decryption and fails there.
    resigned = signed_with_payload(wire.parse_frame(bytes(raw)).payload, h.raw_len)
    assert refusal(resigned, keys).result == "undecryptable" and keys.lookups == 1


def test_every_bit_flip_of_a_sealed_frame_is_refused_and_none_costs_decryption() -> None:
    raw = sealed_frame(series(1))
    keys = CountingKeys(KEYS)
    seen = set()
    for bit in range(8 * len(raw)):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        seen.add(refusal(bytes(bad), keys).result)
    assert keys.lookups == 0
    assert seen <= {"bad_signature", "malformed", "unknown_key", "unsupported_version"}


def test_oversized_declared_payload_is_too_large_before_decryption() -> None:
    raw = sealed_frame(series())
    keys = CountingKeys(KEYS)
    r = refusal(raw, keys, wire.OpenLimits(max_decompressed_bytes=10))
    assert r.result == "too_large" and keys.lookups == 0


def test_unknown_scheme_and_short_envelope() -> None:
    env = wire.seal(wire.prepare_data(series(), 3).payload, PIN)
    raw_len = len(wire.encode_series(series()))
    assert refusal(signed_with_payload(b"\x02" + env[1:], raw_len)).result == "unsupported"
    assert refusal(signed_with_payload(env[:56], raw_len)).result == "malformed"


def test_codec_none_sealed_payload_must_be_raw_len_long() -> None:
    raw_payload = wire.encode_series(series())
    p = wire.Prepared(Kind.DATA, Codec.NONE, wire.seal(raw_payload, PIN), len(raw_payload) + 1, T0, T0 + 1000,
                      3, 6, wire.FLAG_SEALED)
    raw = wire.sign_batch(p, wire.BatchContext(NODE, "s1", "n1", 1, wire.ZERO_HASH, T0, 1))
    assert refusal(raw).result == "malformed"


def test_a_sealed_frame_cannot_be_decompressed_without_unsealing() -> None:
    frame = wire.parse_frame(sealed_frame(series()))
    with pytest.raises(wire.WireError) as info:
        wire.decompress_payload(frame, 1 << 20)
    assert info.value.reason == "sealed_to_unknown_key"


def test_resigning_keeps_the_seal() -> None:
    old = wire.parse_frame(sealed_frame(series()))
    moved = wire.resign_batch(old, wire.BatchContext(NODE, "s1", "n1", 41, b"\x07" * 32, 0, 0))
    frame = wire.parse_frame(moved)
    assert frame.header.flags == wire.FLAG_SEALED and frame.payload == old.payload
    opened = wire.open_batch(moved, lookup, sealing_keys=KEYS)
    assert isinstance(opened, wire.VerifiedBatch) and opened.header.seq == 41


# ---------------------------------------------------------------- the spool


def _spool_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())


@pytest.mark.parametrize("sealed", [False, True])
def test_with_sealing_the_spool_and_its_wal_hold_no_name_or_label_value(tmp_path: Path, sealed: bool) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    s = [Series("node_cpu_seconds_total", (("mode", "sealing-probe-label-value"),), MetricType.COUNTER,
                (T0,), (1.0,))]
    try:
        for _ in range(3):
            spool.append_data(NODE, "s1", "n1", s, 64 * 1024, T0, seal_to=PIN if sealed else None)
        spool.reject(2, "test", (NODE, "s1", "n1"))  # a drop receipt: stays in clear, names nothing
        assert path.with_name("spool.db-wal").stat().st_size > 0  # the rows are in the WAL now
        needles = (b"node_cpu_seconds_total", b"sealing-probe-label-value")
        # Unsealed, the same bytes do show them: the check sees what only compression hides.
        assert plaintext_hits(_spool_bytes(path), needles) == (set() if sealed else set(needles))
        kinds = {wire.parse_frame(bytes(f)).header.kind: wire.parse_frame(bytes(f)).header.flags
                 for (f,) in sqlite3.connect(path).execute("SELECT frame FROM batches")}
        assert kinds == {Kind.DATA: wire.FLAG_SEALED if sealed else 0, Kind.DROP_RECEIPT: 0}
    finally:
        spool.close()


# ---------------------------------------------------------------- docs/wire.md §5.4


COLLECTOR_SEED = bytes(range(32, 64))
SEALING_SECRET = bytes(range(64, 96))
EPHEMERAL_SECRET = bytes(range(96, 128))
FIXED = struct.Struct("<4sBBBBQ32sqQqqIIII8s")  # §1.1, spelled out


def example_pin() -> CollectorKey:
    return CollectorKey(bytes(SigningKey(COLLECTOR_SEED).verify_key), crypto_scalarmult_base(SEALING_SECRET))


def example_sealed_batch() -> bytes:
    """§8's batch encrypted as §5.2 says, by hand: crypto_box_easy with the nonce of §5.2."""
    pin = example_pin()
    raw = wire.encode_series(example_series())
    epk = crypto_scalarmult_base(EPHEMERAL_SECRET)
    nonce = hashlib.blake2b(epk + pin.sealing_public_key, digest_size=24).digest()
    envelope = b"\x01" + pin.key_id + epk + crypto_box(raw, nonce, pin.sealing_public_key, EPHEMERAL_SECRET)
    node = SigningKey(EXAMPLE_SEED)
    head = FIXED.pack(b"WSB1", 1, 0, 0, 1, 1, bytes(32), T0 + 3000, 5_000_000_000, T0, T0 + 2999, 3, 10,
                      len(raw), len(envelope), hashlib.sha256(bytes(node.verify_key)).digest()[:8])
    signed = head + b"\x02s1\x02n1" + envelope
    return signed + node.sign(signed).signature


def example_values() -> str:
    pin = example_pin()
    epk = crypto_scalarmult_base(EPHEMERAL_SECRET)
    rows = [
        ("collector signing public key", pin.signing_public_key.hex()),
        ("collector X25519 public key", pin.sealing_public_key.hex()),
        ("collector key id", pin.key_id.hex()),
        ("pinned value", pin.text()),
        ("ephemeral public key (epk)", epk.hex()),
        ("nonce", hashlib.blake2b(epk + pin.sealing_public_key, digest_size=24).digest().hex()),
        ("chain hash of the frame", wire.batch_hash(example_sealed_batch()).hex()),
    ]
    return "\n".join(f"{k:<29} {v}" for k, v in rows)


def example_hexdump() -> str:
    raw = example_sealed_batch()
    return "\n".join(f"{i:04x}: {raw[i : i + 16].hex(' ')}" for i in range(0, len(raw), 16))


def example_annotated() -> str:
    raw = example_sealed_batch()
    h = wire.parse_frame(raw).header
    rows: list[tuple[int, bytes, str]] = []
    for off, n, what in (
        (7, 1, "flags 1 = FLAG_SEALED: the payload is the encrypted envelope"),
        (88, 4, f"raw_len {h.raw_len} (u32): the clear payload, after decryption"),
        (92, 4, f"payload_len {h.payload_len} (u32): 57 + {h.raw_len}, the envelope"),
    ):
        rows.append((off, raw[off : off + n], what))
    pos = h.header_len
    rows.append((pos, b"", f"--- envelope ({h.payload_len} bytes) starts"))
    for n, what in (
        (1, "scheme 1 = X25519 + XSalsa20-Poly1305 sealed box"),
        (8, "collector_key_id = SHA-256(signing pk || X25519 pk)[:8]"),
        (32, "ephemeral_public_key (epk)"),
        (16, "tag (Poly1305)"),
        (h.raw_len, f"ciphertext: the {h.raw_len} payload bytes of §8, encrypted"),
    ):
        rows.append((pos, raw[pos : pos + n], what))
        pos += n
    rows.append((pos, b"", f"--- envelope ends; the signature covers bytes 0..{pos - 1}"))
    rows.append((pos, raw[pos:], "Ed25519 signature (node key, over the encrypted envelope)"))
    assert pos + 64 == len(raw)
    lines = []
    for off, chunk, what in rows:
        hexed = chunk.hex(" ") if len(chunk) <= 12 else chunk[:12].hex(" ") + " .."
        lines.append(f"{off:4d} {len(chunk):3d}  {hexed:<38} {what}")
    return "\n".join(lines)


def test_doc_sealed_example_is_byte_identical_and_opens() -> None:
    assert doc_block("encrypted-example-values") == example_values()
    assert doc_block("encrypted-example-hex") == example_hexdump()
    assert doc_block("encrypted-example-annotated") == example_annotated()
    pin = example_pin()
    assert pin == wire.keys.CollectorKey(bytes(SigningKey(COLLECTOR_SEED).verify_key),
                                         bytes(PrivateKey(SEALING_SECRET).public_key))
    node_pub = bytes(SigningKey(EXAMPLE_SEED).verify_key)

    class Node:
        public_key = node_pub

        def refusal(self, site: str, node: str, seq: int) -> None:
            return None

    opened = wire.open_batch(example_sealed_batch(), lambda kid: Node() if kid == wire.key_id(node_pub) else None,
                             sealing_keys={pin.key_id: PrivateKey(SEALING_SECRET)})
    assert isinstance(opened, wire.VerifiedBatch), opened
    assert_same(opened.series, example_series())


if __name__ == "__main__":
    for name, block in (("encrypted-example-values", example_values()), ("encrypted-example-hex", example_hexdump()),
                        ("encrypted-example-annotated", example_annotated())):
        print(f"<!-- BEGIN {name} -->\n```text\n{block}\n```\n<!-- END {name} -->\n")
