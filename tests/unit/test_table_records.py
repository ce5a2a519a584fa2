"""Series table records in air-gap bundles (docs/bundle.md §1, §3; wire v2, docs/wire.md §10).

A bundle carries each series table its version 2 frames name once, in a table record ahead
of them and outside the manifest. The reader hands the record back as it was written, names
a damaged one and finds the next frame after it, and skips an oversized one unread.
"""

from __future__ import annotations

import hashlib
import io
import struct

import pytest
from nacl.signing import SigningKey

import wire
from wire import MetricType, Series, bundle
from wire.columns import columns_table_id

KEY = SigningKey(hashlib.sha256(b"table records test node").digest())
T0 = 1_700_000_000_000
MAX_FRAME = 1 << 20


class Enrolled:
    public_key = bytes(KEY.verify_key)

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return None


def lookup(key_id: bytes) -> Enrolled | None:
    return Enrolled() if key_id == wire.key_id(bytes(KEY.verify_key)) else None


def batches(n: int, builder: wire.TableBuilder, start: int = 1,
            names: tuple[str, ...] = ("node_load1", "up")) -> list[tuple[wire.CurrentTable, bytes]]:
    """n version 2 data frames of one node, chained, each with the table it names."""
    out, prev = [], wire.ZERO_HASH
    for seq in range(start, start + n):
        s = [Series(name, (("job", "node"),), MetricType.GAUGE, (T0 + seq,), (float(seq),)) for name in names]
        table, placed = builder.place(s)
        f = wire.sign_batch(wire.prepare_columns(table, placed, 3),
                            wire.BatchContext(KEY, "lab", "n1", seq, prev, T0 + seq, seq, 3))
        out.append((table, f))
        prev = wire.batch_hash(f)
    return out


def write(items: list[tuple[wire.CurrentTable, bytes]]) -> bytes:
    """As an exporter writes them: each table once, before the first frame that names it."""
    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    written: set[bytes] = set()
    for table, frame in items:
        if table.id not in written:
            size = w.size_with(len(frame), "lab", "n1", len(table.blob))
            w.add_table(table.blob)
            written.add(table.id)
        else:
            size = w.size_with(len(frame), "lab", "n1")
        w.add(frame)
        assert w.bytes + bundle.RECORD_OVERHEAD + bundle.manifest_len(len(w.entries), "lab", "n1") == size
    w.finish(KEY, "lab", "n1", T0)
    assert w.bytes == len(buf.getvalue())
    return buf.getvalue()


def records(raw: bytes, max_frame: int = MAX_FRAME) -> list[bundle.Record]:
    return list(bundle.read_bundle(raw, max_frame, 1 << 24))


def kinds(recs: list[bundle.Record]) -> list[str]:
    return [type(r).__name__ for r in recs]


def open_all(recs: list[bundle.Record]) -> list[wire.VerifiedBatch | wire.Refusal]:
    """The reader's loop: a table record's table goes with the frames after it that name it."""
    tables: dict[bytes, bytes] = {}
    held = wire.MemoryTables()
    out = []
    for r in recs:
        if isinstance(r, bundle.TableRecord):
            tables[wire.table_id(r.raw)] = r.raw
        elif isinstance(r, bundle.FrameRecord):
            named = wire.parse_frame(r.raw)
            attached = None
            try:
                attached = tables.get(columns_table_id(wire.decompress_payload(named, 1 << 24)))
            except wire.WireError:
                pass
            out.append(wire.open_batch(r.raw, lookup, series_tables=held, attached_table=attached))
    return out


def test_table_records_read_back_as_written_ahead_of_their_frames() -> None:
    builder = wire.TableBuilder(3)
    items = batches(3, builder) + batches(2, builder, start=4, names=("node_load1", "up", "node_load5"))
    raw = write(items)
    recs = records(raw)
    assert kinds(recs) == ["TableRecord", "FrameRecord", "FrameRecord", "FrameRecord", "TableRecord", "FrameRecord",
                           "FrameRecord", "ManifestRecord"]
    tables = [r for r in recs if isinstance(r, bundle.TableRecord)]
    assert [t.raw for t in tables] == [items[0][0].blob, items[3][0].blob]
    assert tables[0].offset == len(bundle.BUNDLE_HEADER)
    assert raw[tables[0].offset : tables[0].offset + 7] == struct.pack("<2sBI", b"WR", 0x54, len(items[0][0].blob))
    # The manifest lists the frames only.
    (m,) = [r.manifest for r in recs if isinstance(r, bundle.ManifestRecord)]
    assert m is not None and [e.seq for e in m.entries] == [1, 2, 3, 4, 5]
    seen = [bundle.Seen(r.offset, struct.unpack_from("<Q", r.raw, 8)[0], wire.batch_hash(r.raw), len(r.raw))
            for r in recs if isinstance(r, bundle.FrameRecord)]
    assert bundle.manifest_problems(m, seen) == []
    opened = open_all(recs)
    assert all(isinstance(o, wire.VerifiedBatch) for o in opened), opened
    assert [[s.name for s in o.series] for o in opened if isinstance(o, wire.VerifiedBatch)][-1] == [
        "node_load1", "up", "node_load5"]


@pytest.mark.parametrize("bit", [0, 4, 12, 20, 30])
def test_a_table_record_with_a_flipped_length_is_damaged_and_the_next_frame_is_found(bit: int) -> None:
    items = batches(3, wire.TableBuilder(3))
    raw = bytearray(write(items))
    at = len(bundle.BUNDLE_HEADER) + 3 + bit // 8  # the table record's length field
    raw[at] ^= 1 << (bit % 8)
    recs = records(bytes(raw))
    assert kinds(recs) == ["Damaged", "FrameRecord", "FrameRecord", "FrameRecord", "ManifestRecord"]
    d = recs[0]
    assert isinstance(d, bundle.Damaged) and d.reason == "malformed" and d.offset == len(bundle.BUNDLE_HEADER)
    assert d.end == recs[1].offset == len(bundle.BUNDLE_HEADER) + 7 + len(items[0][0].blob)
    assert [r.raw for r in recs if isinstance(r, bundle.FrameRecord)] == [f for _, f in items]
    # The frames that needed the table are refused for the lack of it, not for damage.
    assert [o.result for o in open_all(recs) if isinstance(o, wire.Refusal)] == ["unknown_table"] * 3


def test_a_table_record_whose_head_disagrees_is_damaged() -> None:
    items = batches(2, wire.TableBuilder(3))
    blob = items[0][0].blob
    raw = write(items)
    at = raw.index(blob)
    changed = (blob[:4] + b"\x02" + blob[5:],  # table version 2
               blob[:7] + b"\x01" + blob[8:],  # reserved byte
               blob[:16] + struct.pack("<I", len(blob) - 19) + blob[20:])  # payload_len one more
    for table in changed:
        bad = raw[:at] + table + raw[at + len(blob) :]
        recs = records(bad)
        assert kinds(recs) == ["Damaged", "FrameRecord", "FrameRecord", "ManifestRecord"]


def test_a_cut_inside_a_table_record_is_damaged_and_reading_resyncs() -> None:
    items = batches(3, wire.TableBuilder(3))
    raw = write(items)
    blob = items[0][0].blob
    at = raw.index(blob)
    frames = [f for _, f in items]
    for cut in (0, 5, 19):  # inside the table's head: the record is damaged
        bad = raw[: at + cut] + raw[at + len(blob) :]  # the record's bytes after `cut` are gone
        recs = records(bad)
        assert kinds(recs) == ["Damaged", "FrameRecord", "FrameRecord", "FrameRecord", "ManifestRecord"], cut
        assert isinstance(recs[0], bundle.Damaged) and recs[0].reason == "malformed"
        assert [r.raw for r in recs if isinstance(r, bundle.FrameRecord)] == frames
    for cut in (20, len(blob) // 2, len(blob) - 1):
        # After an intact head the record still declares its old length and takes the bytes
        # that follow, as a frame record cut after its header would: what it hands back no
        # longer hashes to the id the frames name, the frame record it ran into is damaged,
        # and reading resyncs at the next frame.
        bad = raw[: at + cut] + raw[at + len(blob) :]
        recs = records(bad)
        assert kinds(recs) == ["TableRecord", "Damaged", "FrameRecord", "FrameRecord", "ManifestRecord"], cut
        assert isinstance(recs[0], bundle.TableRecord) and wire.table_id(recs[0].raw) != items[0][0].id
        assert [r.raw for r in recs if isinstance(r, bundle.FrameRecord)] == frames[1:]
        assert [getattr(o, "result", None) for o in open_all(recs)] == ["unknown_table"] * 2
    # Cut at the end of the file, inside the table: truncated.
    recs = records(raw[: at + 10])
    assert len(recs) == 1 and isinstance(recs[0], bundle.Damaged) and "truncated" in recs[0].detail


def test_a_table_record_larger_than_a_body_is_too_large_and_skipped_unread() -> None:
    # Long, unlike names: a table well larger than the one-point frames that name it.
    names = tuple(f"m_{hashlib.sha256(bytes([i])).hexdigest()}" for i in range(100))
    items = batches(2, wire.TableBuilder(3), names=names)
    blob = items[0][0].blob
    frame_len = max(len(f) for _, f in items)
    assert len(blob) > frame_len
    recs = records(write(items), max_frame=frame_len)
    assert kinds(recs) == ["Damaged", "FrameRecord", "FrameRecord", "ManifestRecord"]
    d = recs[0]
    assert isinstance(d, bundle.Damaged) and d.reason == "too_large" and "series table" in d.detail
    assert d.end == recs[1].offset
    assert [getattr(o, "result", None) for o in open_all(recs)] == ["unknown_table"] * 2


def test_resync_finds_a_table_record_after_garbage() -> None:
    items = batches(2, wire.TableBuilder(3))
    raw = write(items)
    at = len(bundle.BUNDLE_HEADER)
    bad = raw[:at] + b"WR\x54junk" + b"WRT" + raw[at:]
    recs = records(bad)
    assert kinds(recs) == ["Damaged", "TableRecord", "FrameRecord", "FrameRecord", "ManifestRecord"]
    assert all(isinstance(o, wire.VerifiedBatch) for o in open_all(recs))


def test_the_writer_takes_only_whole_tables() -> None:
    w = bundle.BundleWriter(io.BytesIO())
    blob = batches(1, wire.TableBuilder(3))[0][0].blob
    for bad in (b"", b"WSTB", blob[:-1], blob + b"\0", b"WSB1" + blob[4:]):
        with pytest.raises(ValueError):
            w.add_table(bad)
    assert w.bytes == len(bundle.BUNDLE_HEADER)
    w.add_table(blob)
    assert w.bytes == len(bundle.BUNDLE_HEADER) + 7 + len(blob)
