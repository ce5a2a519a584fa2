"""docs/wire.md read as a second implementation would read it.

Every frame and payload here is built by hand from the document's layouts, never by the
reference encoder, and every rule the document states is tried at its edges. A failure
means the document and wire/ disagree: fix whichever is wrong, not the bytes here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import wire
from wire import DropReceipt, Frame, Kind, MetricType, Series, WireError

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "wire.md"
DOC_TEXT = DOC.read_text(encoding="utf-8")

KEY = SigningKey(hashlib.sha256(b"wire spec key").digest())
NEW_KEY = SigningKey(hashlib.sha256(b"wire spec next key").digest())
T = 1_700_000_000_000
MAX_SEQ = 2**63 - 1

# §1.1, spelled out here rather than taken from wire.frame.
FIXED = struct.Struct("<4sBBBBQ32sqQqqIIII8s")


def reason(fn: Callable[[], object]) -> str:
    with pytest.raises(WireError) as info:
        fn()
    return info.value.reason


def detail(fn: Callable[[], object]) -> str:
    with pytest.raises(WireError) as info:
        fn()
    return info.value.detail


def frame_bytes(
    *,
    kind: int = 0,
    seq: int = 1,
    raw: bytes = b"",
    created_wall_ms: int = T,
    window: tuple[int, int] = (T, T),
    counts: tuple[int, int] = (0, 0),
    flags: int = 0,
    version: int = 1,
    site: bytes = b"site-a",
    node: bytes = b"node-1",
    key: SigningKey = KEY,
) -> bytes:
    """A codec NONE frame from §1: fixed header, names, payload, signature over all of it."""
    head = FIXED.pack(
        b"WSB1", version, kind, 0, flags, seq, bytes(32), created_wall_ms, 7,
        window[0], window[1], counts[0], counts[1], len(raw), len(raw),
        hashlib.sha256(bytes(key.verify_key)).digest()[:8],
    )
    signed = head + bytes([len(site)]) + site + bytes([len(node)]) + node + raw
    return signed + key.sign(signed).signature


# ---------------------------------------------------------------- §3.0 payload, by hand


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def f64(x: float) -> bytes:
    return struct.pack("<d", x)


def intarray(width: int, values: list[int]) -> bytes:
    return bytes([width]) + b"".join(v.to_bytes(width, "little", signed=True) for v in values)


def string_table(strings: list[bytes]) -> bytes:
    return u32(len(strings)) + b"".join(u32(len(s)) for s in strings) + b"".join(strings)


def series_head(name: int, column: int, labels: tuple[tuple[int, int], ...] = ()) -> bytes:
    return u32(name) + bytes([0]) + struct.pack("<H", len(labels)) + u32(column) + b"".join(
        u32(k) + u32(v) for k, v in labels
    )


def payload(columns: list[bytes], values: list[bytes]) -> bytes:
    """Series i is named "m<i>", is a GAUGE without labels, and uses column i (or column 0)."""
    names = [f"m{i}".encode() for i in range(len(values))]
    heads = [series_head(i, i if len(columns) > 1 else 0) for i in range(len(values))]
    return (
        string_table(names) + u32(len(columns)) + b"".join(columns) + u32(len(heads)) + b"".join(heads)
        + b"".join(values)
    )


def one_series(column: bytes, value_block: bytes) -> bytes:
    return payload([column], [value_block])


def bit_pattern(values: tuple[float, ...]) -> bytes:
    return b"".join(f64(v) for v in values)


COL_1 = u32(1) + i64(T)  # n = 1: count and first timestamp, nothing more
COL_2 = u32(2) + i64(T) + i64(1000) + intarray(1, [])  # n = 2: first delta and an empty intarray
CONST_1 = bytes([0]) + f64(1.0)


def test_a_column_of_no_points_is_malformed_even_when_no_series_uses_it() -> None:
    empty = u32(0) + i64(T)
    unused = string_table([]) + u32(1) + empty + u32(0)
    assert reason(lambda: wire.decode_series(unused)) == "malformed"
    assert reason(lambda: wire.decode_series(one_series(empty, CONST_1))) == "malformed"


def test_a_one_point_column_is_its_count_and_first_timestamp_alone() -> None:
    assert len(COL_1) == 12
    (s,) = wire.decode_series(one_series(COL_1, CONST_1))
    assert s.timestamps_ms == (T,) and s.values == (1.0,)
    # The reference encoder writes a one-point series exactly so (CONST, 12-byte column).
    assert wire.encode_series([Series("m0", (), MetricType.GAUGE, (T,), (1.0,))]) == one_series(COL_1, CONST_1)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_a_two_point_column_ends_with_the_width_byte_of_an_empty_intarray(width: int) -> None:
    column = u32(2) + i64(T) + i64(1000) + intarray(width, [])
    assert len(column) == 21
    (s,) = wire.decode_series(one_series(column, CONST_1))
    assert s.timestamps_ms == (T, T + 1000) and s.values == (1.0, 1.0)


def test_the_reference_encoder_writes_a_two_point_column_with_width_1() -> None:
    encoded = wire.encode_series([Series("m0", (), MetricType.GAUGE, (T, T + 1000), (1.0, 1.0))])
    assert encoded == one_series(COL_2, CONST_1)


@pytest.mark.parametrize("width", [0, 3, 5, 9, 255])
def test_an_empty_intarray_with_an_invalid_width_is_malformed(width: int) -> None:
    column = u32(2) + i64(T) + i64(1000) + bytes([width])
    assert reason(lambda: wire.decode_series(one_series(column, CONST_1))) == "malformed"
    scaled_one = bytes([1, 1]) + i64(415) + bytes([width])
    assert reason(lambda: wire.decode_series(one_series(COL_1, scaled_one))) == "malformed"


# (n, value block as §3.0 (d) lays it out, the values it must decode to)
VALUE_BLOCKS: dict[str, tuple[int, bytes, tuple[float, ...]]] = {
    "const-n1": (1, bytes([0]) + f64(-0.0), (-0.0,)),
    "const-n2": (2, bytes([0]) + f64(2.5), (2.5, 2.5)),
    "scaled-n1-width1": (1, bytes([1, 1]) + i64(415) + intarray(1, []), (41.5,)),
    "scaled-n1-width2": (1, bytes([1, 1]) + i64(415) + intarray(2, []), (41.5,)),
    "scaled-n1-width4": (1, bytes([1, 1]) + i64(415) + intarray(4, []), (41.5,)),
    "scaled-n1-width8": (1, bytes([1, 1]) + i64(415) + intarray(8, []), (41.5,)),
    "scaled-n1-k0-limit": (1, bytes([1, 0]) + i64(-(2**53)) + intarray(1, []), (-(2.0**53),)),
    "scaled-n2-width1": (2, bytes([1, 2]) + i64(4150) + intarray(1, [25]), (41.5, 41.75)),
    "scaled-n2-width8": (2, bytes([1, 2]) + i64(4150) + intarray(8, [25]), (41.5, 41.75)),
    "float64-n1": (1, bytes([2]) + f64(0.5), (0.5,)),
    "float64-n2": (2, bytes([2]) + f64(0.5) + f64(-0.0), (0.5, -0.0)),
}


@pytest.mark.parametrize("case", sorted(VALUE_BLOCKS))
def test_value_blocks_decode_byte_for_byte_as_documented(case: str) -> None:
    n, block, want = VALUE_BLOCKS[case]
    column = COL_1 if n == 1 else COL_2
    # Twice in a row: a block one byte too short or too long shifts the second one.
    (first, second) = wire.decode_series(payload([column], [block, block]))
    assert bit_pattern(first.values) == bit_pattern(second.values) == bit_pattern(want)


def test_a_one_point_scaled_delta_without_its_width_byte_is_malformed() -> None:
    short = bytes([1, 1]) + i64(415)  # stops after i0, as the decoder once did
    assert reason(lambda: wire.decode_series(one_series(COL_1, short))) == "malformed"
    # Followed by another block, the next mode byte (0, CONST) would be read as the width.
    assert reason(lambda: wire.decode_series(payload([COL_1], [short, CONST_1]))) == "malformed"


@pytest.mark.parametrize("i0", [2**53 + 1, -(2**53) - 1, MAX_SEQ])
def test_a_one_point_scaled_delta_beyond_2_53_is_malformed(i0: int) -> None:
    block = bytes([1, 0]) + i64(i0) + intarray(1, [])
    assert reason(lambda: wire.decode_series(one_series(COL_1, block))) == "malformed"


def doc_small_examples() -> dict[str, bytes]:
    table = DOC_TEXT.split("Small examples, byte for byte", 1)[1].split("Encoder's mode choice", 1)[0]
    rows: dict[str, bytes] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and re.fullmatch(r"(`[0-9a-f ]+` ?)+", cells[1]):
            rows[cells[0]] = bytes.fromhex(cells[1].replace("`", "").replace(" ", ""))
    return rows


def test_the_documents_small_examples_are_what_the_decoder_reads() -> None:
    rows = doc_small_examples()
    assert rows == {
        "column, n = 1, `[T]`": COL_1,
        "column, n = 2, `[T, T+1000]`": COL_2,
        "`CONST`, any n, 1.0": CONST_1,
        "`SCALED_DELTA`, n = 1, `[41.5]` as k = 1": VALUE_BLOCKS["scaled-n1-width1"][1],
        "`SCALED_DELTA`, n = 2, `[41.5, 41.75]` as k = 2": VALUE_BLOCKS["scaled-n2-width1"][1],
        "`FLOAT64`, n = 1, `[0.5]`": bytes([2]) + f64(0.5),
    }
    (s,) = wire.decode_series(one_series(rows["column, n = 2, `[T, T+1000]`"],
                                         rows["`SCALED_DELTA`, n = 2, `[41.5, 41.75]` as k = 2"]))
    assert s.timestamps_ms == (T, T + 1000) and s.values == (41.5, 41.75)


# ---------------------------------------------------------------- §1.1 and §6: header ranges


def test_seq_2_63_minus_1_is_the_largest_accepted() -> None:
    assert wire.parse_frame(frame_bytes(seq=MAX_SEQ)).header.seq == MAX_SEQ == wire.MAX_SEQ


@pytest.mark.parametrize("seq", [2**63, 2**63 + 1, 2**64 - 1])
def test_seq_of_2_63_or_more_is_malformed_naming_the_value_and_the_limit(seq: int) -> None:
    raw = frame_bytes(seq=seq)
    assert reason(lambda: wire.parse_frame(raw)) == "malformed"
    said = detail(lambda: wire.parse_frame(raw))
    assert str(seq) in said and str(MAX_SEQ) in said


def test_senders_refuse_to_sign_a_seq_outside_1_to_2_63_minus_1() -> None:
    for seq in (0, 2**63):
        ctx = wire.BatchContext(KEY, "site-a", "node-1", seq, bytes(32), T, 7)
        with pytest.raises(ValueError):
            wire.encode_data_batch(ctx, [])
        with pytest.raises(ValueError):
            wire.encode_key_rotation(ctx, NEW_KEY)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_a_window_ending_before_it_starts_is_malformed_for_every_kind(kind: int) -> None:
    assert reason(lambda: wire.parse_frame(frame_bytes(kind=kind, window=(T, T - 1)))) == "malformed"
    assert wire.parse_frame(frame_bytes(kind=kind, window=(T, T))).header.window_end_ms == T


def test_senders_refuse_to_sign_a_window_ending_before_it_starts() -> None:
    backwards = DropReceipt(((1, 1),), T, T - 1, 1, 1, 1, "spool_quota")
    with pytest.raises(ValueError):
        wire.encode_drop_receipt(wire.BatchContext(KEY, "site-a", "node-1", 2, bytes(32), T, 7), backwards)


def test_a_data_window_spans_every_point_even_when_a_series_goes_back() -> None:
    series = [
        Series("back", (), MetricType.GAUGE, (T + 5000, T, T + 2000), (1.0, 2.0, 3.0)),
        Series("one", (), MetricType.GAUGE, (T + 1000,), (1.0,)),
    ]
    ctx = wire.BatchContext(KEY, "site-a", "node-1", 1, bytes(32), T + 9000, 7)
    h = wire.parse_frame(wire.encode_data_batch(ctx, series)).header
    assert (h.window_start_ms, h.window_end_ms) == (T, T + 5000)


def test_an_empty_data_batch_has_its_creation_time_as_window() -> None:
    ctx = wire.BatchContext(KEY, "site-a", "node-1", 1, bytes(32), T + 9000, 7)
    h = wire.parse_frame(wire.encode_data_batch(ctx, [])).header
    assert (h.window_start_ms, h.window_end_ms, h.series_count) == (T + 9000, T + 9000, 0)


def test_sealed_flag_parses_and_an_unknown_version_is_unsupported_version() -> None:
    # A sealed payload is a matter for after the signature (§5, §7): the structure parses.
    assert wire.parse_frame(frame_bytes(flags=wire.FLAG_SEALED)).header.flags == wire.FLAG_SEALED
    assert reason(lambda: wire.parse_frame(frame_bytes(version=3))) == "unsupported_version"


# ---------------------------------------------------------------- §3.1 drop receipts


WINDOW = (T, T + 60_000)


def receipt_json(**change: object) -> bytes:
    obj: dict[str, object] = {
        "batches": 8, "bytes": 1000, "ranges": [[3, 9], [12, 12]], "reason": "spool_quota",
        "samples": 80, "t0_ms": T, "t1_ms": T + 60_000,
    }
    obj.update(change)
    return json.dumps(obj).encode()


def open_receipt(raw_frame: bytes) -> DropReceipt:
    """§7 steps 2-6 for a drop receipt (codec NONE: the payload is the raw payload)."""
    frame = wire.parse_frame(raw_frame)
    wire.verify_signature(frame, bytes(KEY.verify_key))
    receipt = wire.decode_drop_receipt(wire.decompress_payload(frame, 1 << 20))
    wire.check_drop_receipt(receipt, frame.header)
    return receipt


def receipt_frame(seq: int = 13, window: tuple[int, int] = WINDOW, counts: tuple[int, int] = (0, 0),
                  **change: object) -> bytes:
    """A receipt frame as §3.1 asks for by default; each argument breaks one part of it."""
    return frame_bytes(kind=1, seq=seq, raw=receipt_json(**change), window=window, counts=counts)


def test_a_receipt_that_agrees_with_its_header_is_accepted() -> None:
    assert open_receipt(receipt_frame()).ranges == ((3, 9), (12, 12))
    assert open_receipt(receipt_frame(batches=3)).batches == 3  # fewer batches than seqs named
    assert open_receipt(receipt_frame(t0_ms=T, t1_ms=T, window=(T, T))).t1_ms == T
    assert open_receipt(receipt_frame(seq=2**63 - 1, ranges=[[1, 2**63 - 2]], batches=5)).batches == 5


@pytest.mark.parametrize(
    ("seq", "counts", "window", "change"),
    [
        pytest.param(12, (0, 0), WINDOW, {}, id="range-reaches-own-seq"),
        pytest.param(5, (0, 0), WINDOW, {}, id="range-beyond-own-seq"),
        pytest.param(13, (1, 0), WINDOW, {}, id="series-count"),
        pytest.param(13, (0, 80), WINDOW, {}, id="sample-count"),
        pytest.param(13, (0, 0), (T, T + 60_001), {}, id="window-end-not-t1"),
        pytest.param(13, (0, 0), (T - 1, T + 60_000), {}, id="window-start-not-t0"),
        pytest.param(13, (0, 0), WINDOW, {"batches": 0}, id="no-batches"),
        pytest.param(13, (0, 0), WINDOW, {"batches": 9}, id="more-batches-than-seqs"),
        pytest.param(13, (0, 0), WINDOW, {"ranges": [[3, 9], [5, 10]], "batches": 9}, id="overlap-counted-once"),
        pytest.param(13, (0, 0), WINDOW, {"ranges": [[3, 9], [3, 9]], "batches": 8}, id="repeat-counted-once"),
        pytest.param(13, (0, 0), WINDOW, {"ranges": [], "batches": 1}, id="no-ranges"),
    ],
)
def test_a_receipt_that_disagrees_with_its_header_or_itself_is_schema(
    seq: int, counts: tuple[int, int], window: tuple[int, int], change: dict[str, object]
) -> None:
    raw = receipt_frame(seq, window, counts, **change)
    assert reason(lambda: open_receipt(raw)) == "schema"


def test_overlapping_ranges_name_each_seq_once() -> None:
    assert open_receipt(receipt_frame(ranges=[[3, 9], [5, 10]], batches=8)).batches == 8


def test_a_receipt_whose_t1_precedes_t0_is_schema() -> None:
    # parse_frame refuses such a window; the receipt's own rule holds without it.
    frame = wire.parse_frame(receipt_frame())
    receipt = wire.decode_drop_receipt(frame.payload)
    header = dataclasses.replace(frame.header, window_start_ms=T + 1, window_end_ms=T)
    backwards = dataclasses.replace(receipt, t0_ms=T + 1, t1_ms=T)
    assert reason(lambda: wire.check_drop_receipt(backwards, header)) == "schema"


def test_a_receipt_check_refuses_another_kind_of_header() -> None:
    header = wire.parse_frame(frame_bytes(kind=0, seq=13, window=(T, T + 60_000))).header
    receipt = wire.decode_drop_receipt(receipt_json())
    assert reason(lambda: wire.check_drop_receipt(receipt, header)) == "schema"


@pytest.mark.parametrize("bad", [[[1, 2**63]], [[2**63, 2**63]], [[0, 1]]])
def test_receipt_ranges_are_malformed_outside_1_to_2_63_minus_1(bad: list[list[int]]) -> None:
    assert reason(lambda: wire.decode_drop_receipt(receipt_json(ranges=bad))) == "malformed"


# ---------------------------------------------------------------- §3.2 key rotation header


def rotation_body(site: str = "site-a", node: str = "node-1", hex_key: str | None = None) -> bytes:
    old_id = hashlib.sha256(bytes(KEY.verify_key)).digest()[:8]
    new_pub = bytes(NEW_KEY.verify_key)
    msg = b"waystation-key-rotation\0" + site.encode() + b"\0" + node.encode() + b"\0" + old_id + new_pub
    proof = NEW_KEY.sign(msg).signature
    return json.dumps({"new_public_key": hex_key or new_pub.hex(), "proof": proof.hex()}).encode()


def open_rotation(raw_frame: bytes) -> wire.KeyRotation:
    frame: Frame = wire.parse_frame(raw_frame)
    wire.verify_signature(frame, bytes(KEY.verify_key))
    return wire.decode_key_rotation(frame, wire.decompress_payload(frame, 1 << 20))


def test_a_rotation_with_zero_counts_and_its_creation_time_as_window_is_accepted() -> None:
    raw = frame_bytes(kind=2, raw=rotation_body(), created_wall_ms=T + 5, window=(T + 5, T + 5))
    assert open_rotation(raw).new_public_key == bytes(NEW_KEY.verify_key)


@pytest.mark.parametrize(
    ("counts", "window"),
    [((1, 0), (T, T)), ((0, 1), (T, T)), ((0, 0), (T, T + 1)), ((0, 0), (T - 1, T - 1))],
    ids=["series-count", "sample-count", "window-end", "window-not-creation"],
)
def test_a_rotation_header_that_breaks_the_kind_is_schema(counts: tuple[int, int], window: tuple[int, int]) -> None:
    raw = frame_bytes(kind=2, raw=rotation_body(), counts=counts, window=window)
    assert reason(lambda: open_rotation(raw)) == "schema"


def test_rotation_checks_run_in_the_documented_order() -> None:
    # malformed JSON before a bad header, a bad header before a bad proof
    bad_hex = frame_bytes(kind=2, raw=rotation_body(hex_key="zz" * 32), counts=(1, 0))
    assert reason(lambda: open_rotation(bad_hex)) == "malformed"
    other_node = frame_bytes(kind=2, raw=rotation_body(node="node-2"), counts=(1, 0))
    assert reason(lambda: open_rotation(other_node)) == "schema"
    assert reason(lambda: open_rotation(frame_bytes(kind=2, raw=rotation_body(node="node-2")))) == "bad_signature"


# ---------------------------------------------------------------- §3.0.1 schema


def gauge(name: str, *labels: tuple[str, str]) -> Series:
    return Series(name, labels, MetricType.GAUGE, (T,), (1.0,))


def test_schema_accepts_every_name_prometheus_can_carry() -> None:
    ok = [
        gauge("node_load1", ("job", "node")),
        gauge("job:rate5m:sum", ("_private", ""), ("Z9", "ü")),
        gauge("_", ("site", "claimed"), ("node", "claimed")),  # the collector overrides these
        gauge("node_load1", ("job", "node")),  # the same series twice is allowed
    ]
    assert wire.schema_problem(ok) is None


@pytest.mark.parametrize(
    ("series", "offender"),
    [
        (gauge(""), "metric name"),
        (gauge("1up"), "metric name"),
        (gauge("up-time"), "metric name"),
        (gauge("temp_°c"), "metric name"),
        (gauge("up\n"), "metric name"),
        (gauge("up", ("", "x")), "label name"),
        (gauge("up", ("1a", "x")), "label name"),
        (gauge("up", ("a:b", "x")), "label name"),
        (gauge("up", ("__name__", "x")), "label name"),
        (gauge("up", ("__x", "x")), "label name"),
        (gauge("up", ("é", "x")), "label name"),
        (gauge("up", ("job", "a"), ("job", "b")), "repeats"),
    ],
)
def test_schema_refuses_what_prometheus_cannot_carry(series: Series, offender: str) -> None:
    problem = wire.schema_problem([gauge("fine", ("job", "x")), series])
    assert problem is not None and offender in problem


def test_schema_names_the_first_offender() -> None:
    problem = wire.schema_problem([gauge("ok"), gauge("first-bad"), gauge("second-bad")])
    assert problem is not None and "first-bad" in problem and "second-bad" not in problem


# ---------------------------------------------------------------- the reference agent's output


def test_every_batch_the_agent_spools_passes_every_readers_checks(tmp_path: Path) -> None:
    """Eviction, a refused batch, resuming above the collector's chain and a key rotation:
    whatever the agent writes, a receiver following the document accepts."""
    from agent.spool import Spool

    def data(i: int) -> list[Series]:
        ts = tuple(T + 60_000 * i + 1000 * j for j in range(5))
        return [Series("node_load1", (("job", "node"),), MetricType.GAUGE, ts, tuple(float(j) for j in range(5)))]

    sp = Spool(tmp_path / "spool.db")
    try:
        for i in range(5):
            sp.append_data(KEY, "site-a", "node-1", data(i), 10**9)
        sp.ack(3, None)
        sp.append_data(KEY, "site-a", "node-1", data(5), 1)  # evicts 1, 2, 4, 5: ranges [1,2], [4,5]
        sp.reject(6, "schema: test", (KEY, "site-a", "node-1"))
        sp.resume(KEY, "site-a", "node-1", 1000, hashlib.sha256(b"collector head").digest())
        sp.append_key_rotation(KEY, NEW_KEY, "site-a", "node-1")
        sp.append_data(NEW_KEY, "site-a", "node-1", data(6), 10**9)
        frames = []
        while (claimed := sp.claim_oldest()) is not None:
            frames.append(claimed.frame)
    finally:
        sp.close()

    keys = {wire.key_id(bytes(k.verify_key)): bytes(k.verify_key) for k in (KEY, NEW_KEY)}
    receipts: list[DropReceipt] = []
    kinds: list[Kind] = []
    for raw in frames:
        frame = wire.parse_frame(raw)
        h = frame.header
        wire.verify_signature(frame, keys[h.key_id])
        body = wire.decompress_payload(frame, 1 << 20)
        kinds.append(h.kind)
        if h.kind == Kind.DATA:
            series = wire.decode_series(body)
            wire.check_counts(frame, series)
            assert wire.schema_problem(series) is None
        elif h.kind == Kind.DROP_RECEIPT:
            receipt = wire.decode_drop_receipt(body)
            wire.check_drop_receipt(receipt, h)
            receipts.append(receipt)
        else:
            assert wire.decode_key_rotation(frame, body).new_public_key == bytes(NEW_KEY.verify_key)
    assert set(kinds) == set(Kind)
    assert [(r.reason, r.ranges, r.batches) for r in receipts] == [
        ("spool_quota", ((1000, 1001), (1003, 1004)), 4),
        ("rejected", ((1005, 1005),), 1),
    ]


# ---------------------------------------------------------------- the document itself


def test_the_document_names_every_reason_the_reference_raises() -> None:
    raised: set[str] = set()
    for path in (REPO / "wire").glob("*.py"):
        raised |= set(re.findall(r'WireError\(\s*"(\w+)"', path.read_text(encoding="utf-8")))
    raised.discard("platform")  # the encoder's guard on platforms without 4-byte C ints, never a receiver's
    listed = DOC_TEXT.split("All reason codes of the format:", 1)[1].split(".", 1)[0]
    assert raised and raised == set(re.findall(r"`(\w+)`", listed))


def doc_result_statuses() -> dict[str, int]:
    table = DOC_TEXT.split("### 9.1", 1)[1].split("**Ack**", 1)[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^\| `(\w+)` \| +(\d{3}) \|", table, re.MULTILINE)}


def test_the_document_gives_the_collectors_status_for_every_result() -> None:
    from collector.ingest import STATUS

    documented = doc_result_statuses()
    assert {r: documented.get(r) for r in STATUS} == STATUS
    assert documented["unsupported"] == 400 and documented["timeout"] == 408


def test_the_document_says_seal_only_of_encryption() -> None:
    # "sign" places a batch in the chain; "seal" is kept for encrypting to the collector's key.
    for paragraph in DOC_TEXT.split("\n\n"):
        if re.search(r"\bseal", paragraph, re.IGNORECASE):
            assert "FLAG_SEALED" in paragraph or "encrypt" in paragraph, paragraph
