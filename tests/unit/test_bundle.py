"""wire/bundle.py: the bundle reader keeps every frame it can and names the rest; the
manifest exposes truncation, reordering, splicing and substitution; receipts."""

from __future__ import annotations

import io
import struct

import pytest
from nacl.signing import SigningKey

import wire
from wire import bundle

KEY = SigningKey.generate()
T0 = 1_700_000_000_000


def frames(n: int, node: str = "n1", start: int = 1) -> list[bytes]:
    out, prev = [], wire.ZERO_HASH
    for seq in range(start, start + n):
        s = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (T0 + seq,), (float(seq),))]
        f = wire.encode_data_batch(wire.BatchContext(KEY, "lab", node, seq, prev, T0 + seq, seq, 3), s)
        out.append(f)
        prev = wire.batch_hash(f)
    return out


def make(fs: list[bytes], node: str = "n1") -> bytes:
    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    for f in fs:
        w.add(f)
    w.finish(KEY, "lab", node, T0)
    assert w.bytes == len(buf.getvalue())
    return buf.getvalue()


def read(raw: bytes, max_frame: int = 1 << 20) -> tuple[list[bytes], list[bundle.Manifest], list[bundle.Damaged]]:
    got, manifests, damaged = [], [], []
    for rec in bundle.read_bundle(raw, max_frame, 1 << 24):
        if isinstance(rec, bundle.FrameRecord):
            got.append(rec.raw)
        elif isinstance(rec, bundle.ManifestRecord):
            assert rec.manifest is not None, rec.detail
            manifests.append(rec.manifest)
        else:
            damaged.append(rec)
    return got, manifests, damaged


def problems(raw: bytes) -> list[str]:
    got, manifests, _ = read(raw)
    seen = []
    pos = 0
    for f in got:
        seen.append(bundle.Seen(pos, struct.unpack_from("<Q", f, 8)[0], wire.batch_hash(f), len(f)))
        pos += 1
    out: list[str] = []
    for m in manifests:
        bundle.verify_manifest(m, bytes(KEY.verify_key))
        out += bundle.manifest_problems(m, seen)
    return out


def test_an_intact_bundle_reads_back_its_frames_and_a_verifying_manifest() -> None:
    fs = frames(5)
    got, (m,), damaged = read(make(fs))
    assert got == fs and damaged == []
    assert [e.seq for e in m.entries] == [1, 2, 3, 4, 5] and (m.site, m.node) == ("lab", "n1")
    bundle.verify_manifest(m, bytes(KEY.verify_key))
    assert problems(make(fs)) == []


def test_a_truncated_bundle_keeps_the_whole_frames_and_names_the_missing_ones() -> None:
    fs = frames(5)
    raw = make(fs)
    cut = raw[: raw.index(fs[3]) + 10]  # inside frame 4; the manifest is gone too
    got, manifests, damaged = read(cut)
    assert got == fs[:3] and manifests == []
    assert len(damaged) == 1 and "truncated" in damaged[0].detail


def test_a_bit_flip_in_a_length_costs_only_that_frame() -> None:
    fs = frames(5)
    raw = bytearray(make(fs))
    at = raw.index(fs[2]) - 4  # the record's length field of frame 3
    raw[at] ^= 0x10
    got, (m,), damaged = read(bytes(raw))
    assert got == [fs[0], fs[1], fs[3], fs[4]] and damaged
    assert problems(bytes(raw)) == ["seq 3 listed in the manifest but not in the bundle (truncated or cut out)"]


def test_a_bit_flip_in_a_payload_keeps_the_frame_for_its_signature_to_refuse() -> None:
    fs = frames(3)
    raw = bytearray(make(fs))
    raw[raw.index(fs[1]) + len(fs[1]) - 70] ^= 0x01
    got, _, damaged = read(bytes(raw))
    assert damaged == [] and len(got) == 3 and got[1] != fs[1]
    assert problems(bytes(raw)) == ["seq 2 differs from what the manifest lists (substituted or damaged)"]
    key = type("K", (), {"public_key": bytes(KEY.verify_key), "refusal": lambda *a: None})()
    opened = wire.open_batch(got[1], lambda _kid: key)
    assert isinstance(opened, wire.Refusal) and opened.result == "bad_signature"


def test_reordered_frames_are_named() -> None:
    fs = frames(4)
    raw = make(fs)
    a, b = raw.index(fs[1]) - 7, raw.index(fs[2]) - 7
    end = raw.index(fs[3]) - 7
    swapped = raw[:a] + raw[b:end] + raw[a:b] + raw[end:]
    got, _, damaged = read(swapped)
    assert sorted(got) == sorted(fs) and damaged == []
    assert problems(swapped) == ["frames are not in the manifest's order (first out of place: seq 3)"]


def test_a_splice_of_two_bundles_names_what_came_from_the_other() -> None:
    one, two = make(frames(4)), make(frames(4, start=5))
    spliced = one[: one.index(frames(4)[2]) - 7] + two[two.index(frames(4, start=5)[2]) - 7:]
    got, manifests, damaged = read(spliced)
    assert len(got) == 4 and len(manifests) == 1 and damaged == []
    assert problems(spliced) == [
        "seq 5-6 listed in the manifest but not in the bundle (truncated or cut out)",
        "seq 1-2 in the bundle but not listed in its manifest (spliced in)",
    ]


def test_an_oversized_frame_is_skipped_unread_and_named() -> None:
    fs = frames(3)
    raw = make(fs)
    got, _, damaged = read(raw, max_frame=len(fs[1]) - 1)
    assert got == [] or all(len(f) < len(fs[1]) for f in got)
    assert damaged and all(d.reason == "too_large" for d in damaged)


def test_garbage_is_not_a_bundle_and_costs_one_problem() -> None:
    (d,) = list(bundle.read_bundle(b"\0" * 10_000, 1 << 20, 1 << 20))
    assert d.reason == "malformed" and "bad magic" in d.detail
    # A bundle whose records are garbage after the header: one stretch named, not one per byte.
    recs = list(bundle.read_bundle(bundle.BUNDLE_HEADER + b"WR" * 5000, 1 << 20, 1 << 20))
    assert len(recs) == 1 and isinstance(recs[0], bundle.Damaged)


def test_a_manifest_signed_by_another_key_does_not_verify() -> None:
    _, (m,), _ = read(make(frames(2)))
    with pytest.raises(wire.WireError):
        bundle.verify_manifest(m, bytes(SigningKey.generate().verify_key))
    forged = bundle.Manifest(m.site, "n2", m.key_id, m.created_ms, m.signed_part.replace(b"n1", b"n2"),
                             m.signature, m.entries_at, m.count)
    with pytest.raises(wire.WireError, match="signature"):
        bundle.verify_manifest(forged, bytes(KEY.verify_key))


def test_receipts_round_trip_and_a_changed_byte_fails_the_signature() -> None:
    collector = SigningKey.generate()
    raw = bundle.encode_receipt(collector, b"c" * 8, 7, T0, "lab", "n1", b"k" * 8, 5, [(1, 5), (8, 9)],
                                [(1, b"h" * 32), (2, b"i" * 32)], [b"m" * 32])
    r = bundle.parse_receipt(raw)
    assert (r.receipt_no, r.site, r.node, r.complete_through, r.held) == (7, "lab", "n1", 5, ((1, 5), (8, 9)))
    assert r.batches == ((1, b"h" * 32), (2, b"i" * 32)) and r.bundles == (b"m" * 32,)
    bundle.verify_receipt(r, bytes(collector.verify_key))
    for i in (10, 60, len(raw) - 70):
        bad = bytearray(raw)
        bad[i] ^= 1
        with pytest.raises(ValueError):
            bundle.verify_receipt(bundle.parse_receipt(bytes(bad)), bytes(collector.verify_key))
    assert bundle.parse_receipt_file(bundle.encode_receipt_file([raw, raw])) == [raw, raw]
    with pytest.raises(ValueError, match="truncated"):
        bundle.parse_receipt_file(bundle.encode_receipt_file([raw])[:-3])


HEAD_SEQ_AT = 45  # docs/bundle.md §4: head_seq u64 at 45, head_hash at 53, bundle_count at 85
HEAD_HASH_AT = 53


def _receipt_with_head(collector: SigningKey, head: tuple[int, bytes]) -> bytes:
    return bundle.encode_receipt(collector, wire.key_id(bytes(collector.verify_key)), 3, T0, "lab", "n1", b"k" * 8,
                                 4, [(1, 4), (6, 9)], [(6, b"h" * 32)], [b"m" * 32], head=head)


def test_a_receipt_carries_the_chain_head_where_the_docs_place_it() -> None:
    collector = SigningKey.generate()
    raw = _receipt_with_head(collector, (9, b"z" * 32))
    r = bundle.parse_receipt(raw, bytes(collector.verify_key))
    assert (r.head_seq, r.head_hash) == (9, b"z" * 32)
    assert (r.complete_through, r.held, r.batches, r.bundles) == (4, ((1, 4), (6, 9)), ((6, b"h" * 32),), (b"m" * 32,))
    assert struct.unpack_from("<Q32sH", raw, HEAD_SEQ_AT) == (9, b"z" * 32, 1)
    assert raw[95:99] == b"\x03lab"  # the site follows the 95-byte fixed part
    none = bundle.parse_receipt(_receipt_with_head(collector, (0, wire.ZERO_HASH)))
    assert (none.head_seq, none.head_hash) == (0, wire.ZERO_HASH)  # the collector holds nothing of the node
    for head in ((5, wire.ZERO_HASH), (0, b"z" * 32), (5, b"z" * 31), (1 << 63, b"z" * 32)):
        with pytest.raises(ValueError, match="chain head"):
            _receipt_with_head(collector, head)


def test_a_changed_chain_head_fails_the_receipt_signature() -> None:
    """A forged head would make a node renumber its batches where the collector never said."""
    collector = SigningKey.generate()
    raw = _receipt_with_head(collector, (9, b"z" * 32))
    for at in (HEAD_SEQ_AT, HEAD_SEQ_AT + 7, HEAD_HASH_AT, HEAD_HASH_AT + 31):
        bad = bytearray(raw)
        bad[at] ^= 0x01
        forged = bundle.parse_receipt(bytes(bad))  # well-formed: only the signature tells
        assert (forged.head_seq, forged.head_hash) != (9, b"z" * 32)
        with pytest.raises(ValueError, match="signature does not verify"):
            bundle.verify_receipt(forged, bytes(collector.verify_key))
        with pytest.raises(ValueError, match="signature does not verify"):
            bundle.parse_receipt(bytes(bad), bytes(collector.verify_key))


def test_parse_rejects_a_truncated_or_malformed_receipt() -> None:
    collector = SigningKey.generate()
    raw = _receipt_with_head(collector, (9, b"z" * 32))
    for cut in (1, 64, 64 + 40, len(raw) - 95, len(raw) - 1):
        with pytest.raises(ValueError, match="shorter than any receipt|do not match its length|truncated"):
            bundle.parse_receipt(raw[:-cut])
    with pytest.raises(ValueError, match="do not match its length"):
        bundle.parse_receipt(raw + b"\0")
    # A head seq without its hash (or the reverse) is no chain head, signed or not.
    for at, value in ((HEAD_HASH_AT, bytes(32)), (HEAD_SEQ_AT, bytes(8))):
        bad = bytearray(raw)
        bad[at : at + len(value)] = value
        with pytest.raises(ValueError, match="chain head"):
            bundle.parse_receipt(bytes(bad))


def test_the_worked_example_in_docs_bundle_md() -> None:
    key = SigningKey(bytes(range(32)))
    s = [wire.Series("up", (), wire.MetricType.GAUGE, (1700000000000,), (1.0,))]
    f = wire.encode_data_batch(wire.BatchContext(key, "s", "n", 1, wire.ZERO_HASH, 1700000000000, 1, 3), s)
    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    w.add(f)
    m = w.finish(key, "s", "n", 1700000000500)
    raw = buf.getvalue()
    assert len(f) == 213 and len(raw) == 370
    assert raw[:12].hex(" ") == "57 53 42 4e 01 57 52 46 d5 00 00 00"
    assert wire.batch_hash(f).hex() == "a5a21e82eb8e958eeeface1456bc67a7fce8cf8306a3a8e7505631f6c49ab1d6"
    assert raw[0xE1:0xE8].hex(" ") == "57 52 4d 8a 00 00 00"
    assert raw[-138:][:16].hex(" ") == "57 53 4d 31 01 00 56 47 5a a7 54 63 47 4c f4 69"
    assert raw[-138 + 0x40 : -138 + 0x50].hex(" ") == "31 f6 c4 9a b1 d6 d5 00 00 00 33 88 4d 99 f2 90"
    assert m.hash.hex() == "6c4fc69d730e0a547b97c6ce67f7f1af4360db2a8ad66c5304e6dd95e43a4996"


def test_the_manifest_says_whether_the_spool_was_placed_at_the_offset_the_docs_give() -> None:
    """docs/bundle.md §2: flags at byte 5, bit 0 UNPLACED; key id at 6, created_ms at 14,
    count at 22, the site at 26. Signed like the rest; an unknown bit is refused."""
    fs = frames(2)
    for unplaced in (False, True):
        buf = io.BytesIO()
        w = bundle.BundleWriter(buf)
        for f in fs:
            w.add(f)
        m = w.finish(KEY, "lab", "n1", T0, unplaced=unplaced)
        raw = m.signed_part + m.signature
        assert len(raw) == bundle.manifest_len(2, "lab", "n1") == 26 + 2 + 3 + 2 + 2 * 44 + 64
        assert raw[5] == (bundle.MANIFEST_UNPLACED if unplaced else 0)
        assert raw[6:14] == wire.key_id(bytes(KEY.verify_key))
        assert struct.unpack_from("<qI", raw, 14) == (T0, 2) and raw[26:30] == b"\x03lab"
        _, (back,), _ = read(buf.getvalue())
        assert back.unplaced is unplaced and back == m
        bundle.verify_manifest(back, bytes(KEY.verify_key))
    flipped = bytearray(raw)
    flipped[5] ^= bundle.MANIFEST_UNPLACED  # a placed bundle passed off as unplaced, or the reverse
    with pytest.raises(wire.WireError, match="signature"):
        bundle.verify_manifest(bundle.parse_manifest(bytes(flipped)), bytes(KEY.verify_key))
    flipped[5] = 0x80
    with pytest.raises(wire.WireError, match="unknown manifest flags 0x80"):
        bundle.parse_manifest(bytes(flipped))


class _Counting:
    """A bundle buffer that counts the bytes the reader copies out of it."""

    def __init__(self, raw: bytes) -> None:
        self.raw, self.copied, self.largest = raw, 0, 0

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key: slice) -> bytes:
        out = self.raw[key]
        self.copied += len(out)
        self.largest = max(self.largest, len(out))
        return out

    def find(self, sub: bytes, start: int = 0) -> int:
        return self.raw.find(sub, start)


def test_records_that_lie_about_their_length_cost_a_header_read_not_a_body_copy() -> None:
    """`WR F <len> WSB1` repeated: each looks like a frame record; its length is checked
    from the frame's header before any body is copied, so the work is bounded per byte."""
    length = 1 << 20
    pattern = bundle.RECORD_SYNC + bytes((bundle.TAG_FRAME,)) + struct.pack("<I", length) + wire.MAGIC
    raw = bundle.BUNDLE_HEADER + pattern * 3000 + bytes(length)
    buf = _Counting(raw)
    got = list(bundle.read_bundle(buf, 2 * length, 1 << 24))
    assert not any(isinstance(r, bundle.FrameRecord) for r in got)
    assert buf.largest <= 1024  # no body of the claimed 1 MiB was copied
    assert buf.copied <= 2 * 1024 * 3000 + len(raw)


def test_a_forged_receipt_is_refused_before_its_lists_are_built() -> None:
    collector = SigningKey.generate()
    n = 50_000
    raw = bytearray(bundle.encode_receipt(collector, wire.key_id(bytes(collector.verify_key)), 1, T0, "lab", "n1",
                                          b"k" * 8, 0, [(1, n)], [(s, b"h" * 32) for s in range(1, n + 1)]))
    raw[-1] ^= 1  # forged: the signature no longer verifies
    import tracemalloc

    forged = bytes(raw)
    tracemalloc.start()
    try:
        r = bundle.parse_receipt(forged)  # the agent's order: parse, check the key id, verify
        with pytest.raises(ValueError, match="signature"):
            bundle.verify_receipt(r, bytes(collector.verify_key))
        del r
        with pytest.raises(ValueError, match="signature"):
            bundle.parse_receipt(forged, bytes(collector.verify_key))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Copies of the signed bytes (slicing, the signature check), never ~160 bytes a batch of tuples.
    assert peak < 4 * len(raw) + (1 << 20)
    with pytest.raises(ValueError, match="not the key given"):
        bundle.parse_receipt(bytes(raw), bytes(SigningKey.generate().verify_key))
    raw[-1] ^= 1
    good = bundle.parse_receipt(bytes(raw), bytes(collector.verify_key))
    assert good.held == ((1, n),) and len(good.batches) == n and good.batches[0] == (1, b"h" * 32)
