"""Wire v1: round trips, every rejection path, hostile input, compactness, and docs/wire.md's example.

Run `python3 tests/unit/test_wire.py` to print the worked example blocks that docs/wire.md embeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

import wire
from wire import (
    ZERO_HASH,
    Codec,
    DropReceipt,
    Frame,
    Kind,
    Limits,
    MetricType,
    Series,
    WireError,
)

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "wire.md"

# The fixed header exactly as docs/wire.md spells it, kept apart from wire.frame._FIXED on purpose.
DOC_FIXED = struct.Struct("<4sBBBBQ32sqQqqIIII8s")
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

KEY = SigningKey(hashlib.sha256(b"waystation test key").digest())
PUB = bytes(KEY.verify_key)
OTHER_KEY = SigningKey(hashlib.sha256(b"waystation other key").digest())
MAX_RAW = 16 << 20
DEFAULT_LIMITS = Limits()

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ctx(seq: int = 1, prev: bytes = ZERO_HASH, key: SigningKey = KEY, level: int = 3) -> wire.BatchContext:
    return wire.BatchContext(key, "site-a", "node-1", seq, prev, 1_700_000_000_000, 42, level)


def bits(values: tuple[float, ...]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def assert_same(got: list[Series], want: list[Series]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.name, g.labels, g.timestamps_ms) == (w.name, w.labels, w.timestamps_ms)
        assert g.mtype is MetricType(w.mtype)
        # bitwise: -0.0 stays -0.0, NaN payloads (Prometheus stale markers) survive
        assert bits(g.values) == bits(w.values), (g.values, w.values)


def accept(raw: bytes, pub: bytes = PUB, limits: Limits = DEFAULT_LIMITS) -> tuple[Frame, Any]:
    """The receiver's checks in the order docs/wire.md prescribes."""
    frame = wire.parse_frame(raw)
    if frame.header.key_id != wire.key_id(pub):
        raise WireError("unknown_key", "no such key for this node")
    wire.verify_signature(frame, pub)
    body = wire.decompress_payload(frame, MAX_RAW)
    if frame.header.kind == Kind.DATA:
        series = wire.decode_series(body, limits)
        wire.check_counts(frame, series)
        return frame, series
    if frame.header.kind == Kind.DROP_RECEIPT:
        receipt = wire.decode_drop_receipt(body)
        wire.check_drop_receipt(receipt, frame.header)
        return frame, receipt
    return frame, wire.decode_key_rotation(frame, body)


def reason(fn: Callable[[], object]) -> str:
    with pytest.raises(WireError) as info:
        fn()
    return info.value.reason


def forge(
    *,
    magic: bytes = b"WSB1",
    version: int = 1,
    kind: int = 0,
    codec: int = 0,
    flags: int = 0,
    seq: int = 1,
    raw: bytes = b"",
    payload: bytes | None = None,
    raw_len: int | None = None,
    payload_len: int | None = None,
    site: bytes = b"s",
    node: bytes = b"n",
    series_count: int = 0,
    sample_count: int = 0,
    created_wall_ms: int = 1,
    window: tuple[int, int] = (3, 4),
    key: SigningKey = KEY,
    tail: bytes = b"",
) -> bytes:
    """Build and sign a frame with any header values, valid or not, from the doc's layout."""
    if payload is None:
        payload = zstandard.ZstdCompressor(level=3).compress(raw) if codec == 1 else raw
    head = DOC_FIXED.pack(
        magic,
        version,
        kind,
        codec,
        flags,
        seq,
        ZERO_HASH,
        created_wall_ms,
        2,
        window[0],
        window[1],
        series_count,
        sample_count,
        len(raw) if raw_len is None else raw_len,
        len(payload) if payload_len is None else payload_len,
        hashlib.sha256(bytes(key.verify_key)).digest()[:8],
    )
    signed = head + bytes([len(site)]) + site + bytes([len(node)]) + node + payload + tail
    return signed + key.sign(signed).signature


# ---------------------------------------------------------------- payload builder from the doc


def p_u32(n: int) -> bytes:
    return struct.pack("<I", n)


def p_ints(width: int, values: list[int]) -> bytes:
    code = {1: "b", 2: "h", 4: "i", 8: "q"}[width]
    return bytes([width]) + struct.pack(f"<{len(values)}{code}", *values)


def p_strings(strings: list[bytes]) -> bytes:
    return p_u32(len(strings)) + b"".join(p_u32(len(s)) for s in strings) + b"".join(strings)


def p_column(ts: list[int], width: int = 8) -> bytes:
    out = struct.pack("<Iq", len(ts), ts[0])
    if len(ts) > 1:
        deltas = [b - a for a, b in zip(ts, ts[1:], strict=False)]
        out += struct.pack("<q", deltas[0]) + p_ints(width, [b - a for a, b in zip(deltas, deltas[1:], strict=False)])
    return out


def p_series(name: int, mtype: int, labels: list[tuple[int, int]], col: int) -> bytes:
    return struct.pack("<IBHI", name, mtype, len(labels), col) + b"".join(struct.pack("<II", k, v) for k, v in labels)


def p_payload(strings: list[bytes], cols: list[bytes], metas: list[bytes], values: list[bytes]) -> bytes:
    return (
        p_strings(strings) + p_u32(len(cols)) + b"".join(cols) + p_u32(len(metas)) + b"".join(metas) + b"".join(values)
    )


def v_const(x: float) -> bytes:
    return struct.pack("<Bd", 0, x)


def v_scaled(k: int, first: int, width: int, deltas: list[int]) -> bytes:
    return struct.pack("<BBq", 1, k, first) + p_ints(width, deltas)


def v_float(xs: list[float]) -> bytes:
    return bytes([2]) + struct.pack(f"<{len(xs)}d", *xs)


T0 = 1_700_000_000_000


def simple_payload(**over: Any) -> bytes:
    """One gauge `up{job="a"}` with 3 points; keyword args replace one part."""
    parts: dict[str, Any] = {
        "strings": [b"up", b"job", b"a"],
        "cols": [p_column([T0, T0 + 1000, T0 + 2000], width=1)],
        "metas": [p_series(0, 0, [(1, 2)], 0)],
        "values": [v_scaled(0, 1, 1, [0, 1])],
    }
    parts.update(over)
    return p_payload(parts["strings"], parts["cols"], parts["metas"], parts["values"])


def test_doc_builder_matches_reference_encoder() -> None:
    want = [Series("up", (("job", "a"),), MetricType.GAUGE, (T0, T0 + 1000, T0 + 2000), (1.0, 1.0, 2.0))]
    assert wire.encode_series(want) == simple_payload()
    assert_same(wire.decode_series(simple_payload()), want)


# ---------------------------------------------------------------- strategies


def nan_with(payload: int, negative: bool) -> float:
    x: float = struct.unpack("<d", struct.pack("<Q", (negative << 63) | 0x7FF0000000000000 | payload))[0]
    return x


SPECIAL = [
    0.0,
    -0.0,
    math.inf,
    -math.inf,
    math.nan,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    2.0**53,
    2.0**53 + 2,
    2.0**62,
    1e-300,
    0.1,
    1 / 3,
]
stale_nan = nan_with(2, False)  # Prometheus' staleness marker
values_one = st.one_of(
    st.floats(),  # every float incl. NaN, +-Inf, -0.0, subnormals
    st.builds(lambda i, k: i / 10**k, st.integers(-(10**15), 10**15), st.integers(0, 9)),
    st.integers(-(2**64), 2**64).map(float),
    st.sampled_from(SPECIAL + [stale_nan]),
    st.builds(nan_with, st.integers(1, 2**52 - 1), st.booleans()),
)


@st.composite
def value_lists(draw: st.DrawFn, n: int) -> tuple[float, ...]:
    kind = draw(st.sampled_from(["any", "const", "decimal_walk", "int_walk", "mixed_zero"]))
    if kind == "const":
        return (draw(values_one),) * n
    if kind == "decimal_walk":
        k = draw(st.integers(0, 9))
        start = draw(st.integers(-(10**12), 10**12))
        steps = draw(st.lists(st.integers(-1000, 1000), min_size=n - 1, max_size=n - 1))
        ints = [start]
        for s in steps:
            ints.append(ints[-1] + s)
        return tuple(i / 10**k for i in ints)
    if kind == "int_walk":
        start = draw(st.integers(0, 2**40))
        steps = draw(st.lists(st.integers(0, 10**6), min_size=n - 1, max_size=n - 1))
        out = [float(start)]
        for s in steps:
            out.append(out[-1] + s)
        return tuple(out)
    if kind == "mixed_zero":
        return tuple(draw(st.lists(st.sampled_from([0.0, -0.0, 1.0]), min_size=n, max_size=n)))
    return tuple(draw(st.lists(values_one, min_size=n, max_size=n)))


@st.composite
def columns(draw: st.DrawFn) -> tuple[int, ...]:
    n = draw(st.integers(1, 30))
    pattern = draw(st.sampled_from(["regular", "jitter", "random", "wide"]))
    if pattern == "wide":  # anywhere in +-2**61: deltas and delta-of-deltas still fit int64
        return tuple(draw(st.lists(st.integers(-(2**61), 2**61), min_size=n, max_size=n)))
    first = draw(st.integers(-(2**50), 2**50))
    if pattern == "random":  # irregular, negative and zero deltas
        deltas = draw(st.lists(st.integers(-(2**40), 2**40), min_size=n - 1, max_size=n - 1))
    else:
        step = draw(st.integers(-(10**4), 10**7))
        noise = 0 if pattern == "regular" else 50
        deltas = [step + draw(st.integers(-noise, noise)) for _ in range(n - 1)]
    ts = [first]
    for d in deltas:
        ts.append(ts[-1] + d)
    return tuple(ts)


text = st.text(max_size=12)  # full unicode, surrogates excluded (they are not UTF-8)


@st.composite
def series_lists(draw: st.DrawFn) -> list[Series]:
    cols = draw(st.lists(columns(), min_size=1, max_size=4))
    out = []
    for _ in range(draw(st.integers(0, 8))):
        ts = draw(st.sampled_from(cols))  # several series share a column
        out.append(
            Series(
                draw(text),
                tuple(draw(st.lists(st.tuples(text, text), max_size=4))),
                draw(st.sampled_from(list(MetricType))),
                ts,
                draw(value_lists(len(ts))),
            )
        )
    return out


# ---------------------------------------------------------------- round trips


@FAST
@given(series_lists())
def test_payload_round_trip_is_exact(series: list[Series]) -> None:
    assert_same(wire.decode_series(wire.encode_series(series)), series)


@settings(max_examples=60, deadline=None)
@given(series_lists().filter(bool), st.integers(1, 2**63 - 1))
def test_data_batch_round_trip_through_receiver(series: list[Series], seq: int) -> None:
    raw = wire.encode_data_batch(ctx(seq=seq), series)
    frame, got = accept(raw)
    assert_same(got, series)
    h = frame.header
    assert (h.kind, h.codec, h.seq, h.site, h.node) == (Kind.DATA, Codec.ZSTD, seq, "site-a", "node-1")
    # every point, not first and last: columns may go back in time
    assert h.window_start_ms == min(t for s in series for t in s.timestamps_ms)
    assert h.window_end_ms == max(t for s in series for t in s.timestamps_ms)
    assert frame.hash == hashlib.sha256(raw).digest()


@pytest.mark.parametrize(
    "values",
    [
        (0.0, -0.0),
        (-0.0, 0.0),
        (-0.0, -0.0, -0.0),
        (1.0, -0.0, 2.0),
        (math.nan, stale_nan, math.nan),
        (stale_nan, stale_nan),
        (1.7976931348623157e308, 1.0),
        (9007199254740993.0, 1.0),
        (2.0**62, 2.0**62 + 1024),
        (0.1, 0.2, 0.30000000000000004),
    ],
)
def test_edge_values_survive(values: tuple[float, ...]) -> None:
    s = [Series("x", (), MetricType.GAUGE, tuple(range(len(values))), values)]
    assert_same(wire.decode_series(wire.encode_series(s)), s)


def test_value_modes_chosen_as_documented() -> None:
    def value_part(values: tuple[float, ...]) -> bytes:
        raw = wire.encode_series([Series("x", (), MetricType.GAUGE, tuple(range(len(values))), values)])
        head = p_strings([b"x"]) + p_u32(1) + p_column(list(range(len(values))), 1) + p_u32(1) + p_series(0, 0, [], 0)
        assert raw.startswith(head)
        return raw[len(head) :]

    assert value_part((7.5, 7.5)) == v_const(7.5)
    assert value_part((41.5, 41.75, 42.0)) == v_scaled(2, 4150, 1, [25, 25])
    assert value_part((1.0, 1000.0)) == v_scaled(0, 1, 2, [999])
    assert value_part((0.000000001, 0.000000002)) == v_scaled(9, 1, 1, [1])
    assert value_part((0.0000000001, 0.0)) == v_float([0.0000000001, 0.0])  # needs k = 10
    assert value_part((2.0**53 + 2, 0.0)) == v_float([2.0**53 + 2, 0.0])  # beyond +-2**53
    assert value_part((1.0, -0.0)) == v_float([1.0, -0.0])
    assert value_part((math.inf, 1.0)) == v_float([math.inf, 1.0])


def test_encoder_rejects_unrepresentable_timestamps() -> None:
    for ts in [(I64_MIN, I64_MAX), (0, I64_MAX, I64_MIN + 5)]:
        s = [Series("x", (), MetricType.GAUGE, ts, (0.0,) * len(ts))]
        assert reason(lambda s=s: wire.encode_series(s)) == "schema"
    s = [Series("x", (), MetricType.GAUGE, (1, 2), (1.0,))]
    assert reason(lambda: wire.encode_series(s)) == "schema"
    edge = [Series("x", (), MetricType.GAUGE, (I64_MIN, I64_MIN + 1, I64_MAX - 1, I64_MAX)[::3], (1.0, 2.0))]
    assert reason(lambda: wire.encode_series(edge)) == "schema"  # one delta of 2**64 - 1
    ok = [Series("x", (), MetricType.GAUGE, (I64_MAX - 1, I64_MAX), (1.0, 2.0))]
    assert_same(wire.decode_series(wire.encode_series(ok)), ok)


# ---------------------------------------------------------------- frame rejections


def small_data_frame(codec_zstd: bool = True) -> bytes:
    s = [
        Series("up", (("job", "agent"),), MetricType.GAUGE, (T0, T0 + 1000), (1.0, 1.0)),
        Series("temp_c", (("gpu", "0"), ("ü", "☃")), MetricType.GAUGE, (T0, T0 + 1000), (41.5, 40.25)),
    ]
    if codec_zstd:
        return wire.encode_data_batch(ctx(), s)
    raw = wire.encode_series(s)
    return forge(raw=raw, series_count=2, sample_count=4)


def test_valid_frames_accepted() -> None:
    for raw in (small_data_frame(True), small_data_frame(False)):
        frame, series = accept(raw)
        assert len(series) == 2
        assert frame.signed_part + frame.signature == raw
        assert len(frame.signature) == 64
        assert frame.header.header_len == 104 + 1 + len(frame.header.site.encode()) + 1 + len(
            frame.header.node.encode()
        )


def test_truncated_at_every_length() -> None:
    raw = small_data_frame()
    for n in range(len(raw)):
        assert reason(lambda n=n: accept(raw[:n])) == "malformed", n


def test_trailing_bytes_after_signature() -> None:
    raw = small_data_frame()
    assert reason(lambda: accept(raw + b"\0")) == "malformed"


@pytest.mark.parametrize("zstd", [True, False])
def test_every_single_bit_flip_rejected(zstd: bool) -> None:
    raw = small_data_frame(zstd)
    sig_at = len(raw) - 64
    seen: set[str] = set()
    for bit in range(8 * len(raw)):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            accept(bytes(bad))
        except WireError as exc:
            got = exc.reason
        else:
            pytest.fail(f"flip of bit {bit} accepted")
        at = bit // 8
        if at >= sig_at:
            allowed = {"bad_signature"}
        elif at == 4:
            allowed = {"unsupported_version"}
        elif at == 7 and bit % 8 == 0:
            allowed = {"bad_signature"}  # FLAG_SEALED: a valid flag, and a signed one
        elif 96 <= at < 104:
            allowed = {"unknown_key"}  # key id no longer names the node's key
        else:
            allowed = {"bad_signature", "malformed"}
        assert got in allowed, (bit, got)
        seen.add(got)
    assert "bad_signature" in seen and "malformed" in seen


def test_header_field_rejections() -> None:
    assert reason(lambda: wire.parse_frame(forge(magic=b"WSB2"))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(version=3))) == "unsupported_version"
    assert reason(lambda: wire.parse_frame(forge(version=0))) == "unsupported_version"
    assert reason(lambda: wire.parse_frame(forge(kind=3))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(codec=2))) == "malformed"
    for flags in (0x02, 0x80, 0x03):
        assert reason(lambda flags=flags: wire.parse_frame(forge(flags=flags))) == "malformed"
    assert wire.parse_frame(forge(flags=0x01)).header.flags == wire.FLAG_SEALED  # opened after the signature
    assert reason(lambda: wire.parse_frame(forge(seq=0))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(raw=b"abc", payload_len=4))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(raw=b"abc", payload_len=2))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(raw=b"abc", tail=b"x"))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(site=b""))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(node=b""))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(site=b"\xff\xfe"))) == "malformed"
    assert reason(lambda: wire.parse_frame(forge(node=b"\xc3"))) == "malformed"
    # the largest seq and names are fine
    frame = wire.parse_frame(forge(seq=2**63 - 1, site="é".encode() * 127 + b"x", node=b"n" * 255))
    assert frame.header.seq == 2**63 - 1 and len(frame.header.node) == 255


def test_signature_and_key_checks() -> None:
    raw = small_data_frame()
    frame = wire.parse_frame(raw)
    wire.verify_signature(frame, PUB)
    assert frame.header.key_id == hashlib.sha256(PUB).digest()[:8] == wire.key_id(PUB)
    assert reason(lambda: wire.verify_signature(frame, bytes(OTHER_KEY.verify_key))) == "bad_signature"
    # a batch signed by another key that claims our key id
    forged = forge(raw=b"{}", kind=1, key=OTHER_KEY)
    forged = forged[:96] + wire.key_id(PUB) + forged[104:]
    assert reason(lambda: accept(forged)) == "bad_signature"


def test_chain_hash_and_prev_hash() -> None:
    first = wire.encode_data_batch(ctx(seq=1), [Series("a", (), MetricType.GAUGE, (1,), (1.0,))])
    second = wire.encode_data_batch(
        ctx(seq=2, prev=wire.batch_hash(first)), [Series("a", (), MetricType.GAUGE, (2,), (1.0,))]
    )
    f1, f2 = wire.parse_frame(first), wire.parse_frame(second)
    assert f1.header.prev_hash == bytes(32)
    assert f2.header.prev_hash == f1.hash == hashlib.sha256(first).digest()
    with pytest.raises(ValueError):
        wire.encode_data_batch(ctx(seq=0), [])


# ---------------------------------------------------------------- decompression limits


def rle_bomb(total: int) -> bytes:
    """A zstd frame of RLE blocks: 4 bytes per 128 KiB of zeros, content size declared."""
    block = 1 << 17
    n = total // block
    head = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x50]) + total.to_bytes(8, "little")
    return head + b"".join(((block << 3) | 2 | (i == n - 1)).to_bytes(3, "little") + b"\0" for i in range(n))


def test_rle_bomb_is_what_it_claims() -> None:
    small = rle_bomb(1 << 20)
    assert zstandard.ZstdDecompressor().decompress(small) == bytes(1 << 20)


def frame_for(payload: bytes, raw_len: int, codec: int = 1) -> Frame:
    return wire.parse_frame(forge(codec=codec, payload=payload, raw_len=raw_len))


def test_declared_raw_len_over_limit_is_too_large_without_decompressing() -> None:
    bomb = rle_bomb(1 << 30)
    frame = frame_for(bomb, 1 << 30)
    tracemalloc.start()
    t = time.perf_counter()
    assert reason(lambda: wire.decompress_payload(frame, MAX_RAW)) == "too_large"
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t < 0.1 and peak < 64 << 10
    assert reason(lambda: wire.decompress_payload(frame_for(b"x" * 10, MAX_RAW + 1, 0), MAX_RAW)) == "too_large"


@pytest.mark.parametrize("declared", [0, 1000, MAX_RAW])
def test_bomb_lying_about_raw_len_costs_at_most_raw_len(declared: int) -> None:
    frame = frame_for(rle_bomb(1 << 30), declared)
    tracemalloc.start()
    t = time.perf_counter()
    assert reason(lambda: wire.decompress_payload(frame, MAX_RAW)) == "malformed"
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    elapsed = time.perf_counter() - t
    print(f"bomb with raw_len={declared}: {elapsed * 1000:.1f} ms, traced peak {peak} bytes")
    assert elapsed < 1.0  # inflating 1 GiB would take far longer
    assert peak < declared + (256 << 10)


def test_decompression_structure() -> None:
    raw = b"hello " * 100
    good = zstandard.ZstdCompressor(level=3).compress(raw)
    assert wire.decompress_payload(frame_for(good, len(raw)), MAX_RAW) == raw
    unknown_size = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    assert wire.decompress_payload(frame_for(unknown_size, len(raw)), MAX_RAW) == raw
    assert reason(lambda: wire.decompress_payload(frame_for(good, len(raw) + 1), MAX_RAW)) == "malformed"
    assert reason(lambda: wire.decompress_payload(frame_for(good, len(raw) - 1), MAX_RAW)) == "malformed"
    assert reason(lambda: wire.decompress_payload(frame_for(good + b"junk", len(raw)), MAX_RAW)) == "malformed"
    assert reason(lambda: wire.decompress_payload(frame_for(good + good, len(raw)), MAX_RAW)) == "malformed"
    assert reason(lambda: wire.decompress_payload(frame_for(good[:-3], len(raw)), MAX_RAW)) == "malformed"
    assert reason(lambda: wire.decompress_payload(frame_for(b"not zstd", 5), MAX_RAW)) == "malformed"
    assert reason(lambda: wire.decompress_payload(frame_for(b"", 0), MAX_RAW)) == "malformed"
    empty = zstandard.ZstdCompressor().compress(b"")
    assert wire.decompress_payload(frame_for(empty, 0), MAX_RAW) == b""
    assert reason(lambda: wire.decompress_payload(frame_for(empty + b"j", 0), MAX_RAW)) == "malformed"
    # codec NONE: raw_len must equal payload_len
    assert wire.decompress_payload(frame_for(raw, len(raw), 0), MAX_RAW) == raw
    assert reason(lambda: wire.decompress_payload(frame_for(raw, len(raw) - 1, 0), MAX_RAW)) == "malformed"


# ---------------------------------------------------------------- payload rejections


def test_payload_limits() -> None:
    three = [
        Series(f"s{i}", (("a", "b"), ("c", "d"), ("e", "f")), MetricType.GAUGE, (1, 2, 3), (1.0, 2.0, 3.0))
        for i in range(3)
    ]
    raw = wire.encode_series(three)
    assert len(wire.decode_series(raw, Limits(max_series=3, max_samples=9, max_labels=3, max_string_len=2)))
    assert reason(lambda: wire.decode_series(raw, Limits(max_series=2))) == "limit"
    assert reason(lambda: wire.decode_series(raw, Limits(max_samples=8))) == "limit"  # one shared column of 3
    assert reason(lambda: wire.decode_series(raw, Limits(max_labels=2))) == "limit"
    assert reason(lambda: wire.decode_series(raw, Limits(max_string_len=1))) == "limit"
    long_col = wire.encode_series([Series("x", (), MetricType.GAUGE, tuple(range(10)), (0.0,) * 10)])
    assert reason(lambda: wire.decode_series(long_col, Limits(max_samples=9))) == "limit"
    utf8 = wire.encode_series([Series("é" * 6, (), MetricType.GAUGE, (1,), (1.0,))])  # 12 bytes
    assert reason(lambda: wire.decode_series(utf8, Limits(max_string_len=11))) == "limit"
    wire.decode_series(utf8, Limits(max_string_len=12))
    cols = p_u32(3) + b"".join(p_column([i]) for i in range(3))
    many_cols = p_strings([]) + cols + p_u32(0)
    assert reason(lambda: wire.decode_series(many_cols, Limits(max_series=2))) == "limit"
    assert reason(lambda: wire.decode_series(p_u32(2**32 - 1))) == "limit"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(simple_payload(strings=[b"up", b"job", b"\xff"]), id="invalid-utf8"),
        pytest.param(simple_payload(strings=[b"up", b"job", b"\xed\xa0\x80"]), id="utf8-surrogate"),
        pytest.param(simple_payload(metas=[p_series(3, 0, [(1, 2)], 0)]), id="name-index"),
        pytest.param(simple_payload(metas=[p_series(0, 0, [(1, 9)], 0)]), id="label-index"),
        pytest.param(simple_payload(metas=[p_series(0, 0, [(1, 2)], 1)]), id="column-index"),
        pytest.param(simple_payload(metas=[p_series(0, 4, [(1, 2)], 0)]), id="metric-type"),
        pytest.param(simple_payload(values=[bytes([3]) + bytes(8)]), id="value-mode"),
        pytest.param(simple_payload(values=[v_scaled(10, 1, 1, [0, 1])]), id="scale-10"),
        pytest.param(
            simple_payload(values=[struct.pack("<BBq", 1, 0, 1) + bytes([3, 0, 0, 0, 1, 0, 0])]), id="int-width-3"
        ),
        pytest.param(simple_payload(values=[v_scaled(0, 2**53, 1, [0, 1])]), id="scaled-over-2**53"),
        pytest.param(simple_payload(values=[v_scaled(0, 1 - 2**53, 1, [0, -2])]), id="scaled-under-2**53"),
        pytest.param(simple_payload(cols=[struct.pack("<Iq", 0, T0)]), id="empty-column"),
        pytest.param(simple_payload(cols=[p_column([T0, T0 + 1000])]), id="column-shorter-than-values"),
        pytest.param(simple_payload(cols=[struct.pack("<Iqq", 3, I64_MAX - 5, 3) + p_ints(1, [0])]), id="ts-overflow"),
        pytest.param(simple_payload(cols=[struct.pack("<Iqq", 3, 0, I64_MAX) + p_ints(1, [1])]), id="delta-overflow"),
        pytest.param(simple_payload(cols=[p_column([T0, T0 + 1000, T0 + 2000], 1)[:-1]]), id="truncated-column"),
        pytest.param(simple_payload() + b"\0", id="trailing-byte"),
        pytest.param(simple_payload()[:-1], id="truncated-values"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_payloads(payload: bytes) -> None:
    assert reason(lambda: wire.decode_series(payload)) == "malformed"


def test_check_counts() -> None:
    series = [Series("a", (), MetricType.GAUGE, (1, 2), (1.0, 2.0))]
    raw = wire.encode_series(series)
    for sc, n in [(1, 2)]:
        wire.check_counts(wire.parse_frame(forge(raw=raw, series_count=sc, sample_count=n)), series)
    for sc, n in [(2, 2), (1, 3), (0, 0)]:
        frame = wire.parse_frame(forge(raw=raw, series_count=sc, sample_count=n))
        assert reason(lambda frame=frame: wire.check_counts(frame, series)) == "schema"
    assert reason(lambda: accept(forge(raw=raw, series_count=1, sample_count=1))) == "schema"


# ---------------------------------------------------------------- hostile bytes never escape as other errors


def only_wire_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except WireError:
        pass


@FAST
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_wire_error(data: bytes) -> None:
    only_wire_errors(lambda: wire.parse_frame(data))
    only_wire_errors(lambda: wire.parse_frame(forge()[:104] + data))
    only_wire_errors(lambda: wire.decode_series(data))
    only_wire_errors(lambda: wire.decode_series(simple_payload()[:12] + data))
    only_wire_errors(lambda: wire.decode_drop_receipt(data))
    only_wire_errors(lambda: wire.decode_key_rotation(wire.parse_frame(forge()), data))
    for codec in (0, 1):
        frame = frame_for(data, len(data) if codec == 0 else 64, codec)
        only_wire_errors(lambda frame=frame: wire.decompress_payload(frame, MAX_RAW))
        zstd_like = frame_for(b"\x28\xb5\x2f\xfd" + data, 64, 1)
        only_wire_errors(lambda frame=zstd_like: wire.decompress_payload(frame, MAX_RAW))


@FAST
@given(series_lists(), st.data())
def test_mutated_signed_payloads_only_raise_wire_error(series: list[Series], data: st.DataObject) -> None:
    """A node with a valid key is still hostile: mutate the payload, re-sign, run the receiver."""
    raw = bytearray(wire.encode_series(series))
    if raw:
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    mutated = bytes(raw[:cut] if data.draw(st.booleans()) else raw)
    codec = data.draw(st.integers(0, 1))
    frame_raw = forge(
        raw=mutated, codec=codec, series_count=len(series), sample_count=sum(len(s.values) for s in series)
    )
    only_wire_errors(lambda: accept(frame_raw))


def test_single_byte_mutations_of_payload_exhaustive() -> None:
    raw = simple_payload()
    for at in range(len(raw)):
        for value in (0x00, 0x01, 0x7F, 0x80, 0xFF, raw[at] ^ 0x01):
            bad = raw[:at] + bytes([value]) + raw[at + 1 :]
            only_wire_errors(lambda bad=bad: wire.decode_series(bad))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
receipt_keys = ["ranges", "t0_ms", "t1_ms", "batches", "samples", "bytes", "reason", "new_public_key", "proof"]


@FAST
@given(
    st.dictionaries(
        st.sampled_from(receipt_keys), json_values | st.lists(st.lists(st.integers(-5, 2**65), max_size=3), max_size=3)
    )
)
def test_hostile_json_only_raises_wire_error(obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()
    only_wire_errors(lambda: wire.decode_drop_receipt(body))
    only_wire_errors(lambda: wire.decode_key_rotation(wire.parse_frame(forge()), body))


# ---------------------------------------------------------------- drop receipts and key rotation

RECEIPT = DropReceipt(((3, 9), (12, 12)), T0, T0 + 60_000, 8, 48_000, 123_456, "spool_quota")


def test_drop_receipt_round_trip() -> None:
    raw = wire.encode_drop_receipt(ctx(seq=13), RECEIPT)
    frame, receipt = accept(raw)
    assert receipt == RECEIPT
    h = frame.header
    assert (h.kind, h.codec, h.series_count, h.sample_count) == (Kind.DROP_RECEIPT, Codec.NONE, 0, 0)
    assert (h.window_start_ms, h.window_end_ms) == (RECEIPT.t0_ms, RECEIPT.t1_ms)
    assert json.loads(frame.payload) == {
        "batches": 8,
        "bytes": 123_456,
        "ranges": [[3, 9], [12, 12]],
        "reason": "spool_quota",
        "samples": 48_000,
        "t0_ms": T0,
        "t1_ms": T0 + 60_000,
    }


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b"null",
        b"\xff",
        b"[" * 100_000 + b"]" * 100_000,  # nesting depth bomb
        b'{"ranges": [[1, 2]]}',
    ],
    ids=["empty", "list", "null", "not-utf8", "deep-nesting", "missing-fields"],
)
def test_drop_receipt_rejects_garbage(body: bytes) -> None:
    assert reason(lambda: wire.decode_drop_receipt(body)) == "malformed"


@pytest.mark.parametrize(
    "change",
    [
        {"ranges": [[0, 1]]},
        {"ranges": [[5, 4]]},
        {"ranges": [[1, 2, 3]]},
        {"ranges": [[1, 2**64]]},
        {"ranges": [[1, 2**63]]},
        {"ranges": [[2**63, 2**63]]},
        {"ranges": [[1.0, 2]]},
        {"ranges": [[True, 2]]},
        {"ranges": {"a": 1}},
        {"ranges": [[1, 2]] * 100_001},
        {"t0_ms": 1.5},
        {"t0_ms": "1"},
        {"t1_ms": 2**63},
        {"samples": -1},
        {"batches": None},
        {"reason": 5},
    ],
)
def test_drop_receipt_field_rules(change: dict[str, Any]) -> None:
    obj = RECEIPT.to_json() | change
    assert reason(lambda: wire.decode_drop_receipt(json.dumps(obj).encode())) == "malformed"


def test_drop_receipt_rejects_json_infinity() -> None:
    body = json.dumps(RECEIPT.to_json()).replace(f'"t0_ms": {T0}', '"t0_ms": Infinity').encode()
    assert b"Infinity" in body
    assert reason(lambda: wire.decode_drop_receipt(body)) == "malformed"


def test_key_rotation_round_trip_and_proof() -> None:
    raw = wire.encode_key_rotation(ctx(seq=7), OTHER_KEY)
    frame, rot = accept(raw)
    new_pub = bytes(OTHER_KEY.verify_key)
    assert rot.new_public_key == new_pub
    msg = b"waystation-key-rotation\0site-a\0node-1\0" + wire.key_id(PUB) + new_pub
    assert msg == wire.rotation_proof_message("site-a", "node-1", wire.key_id(PUB), new_pub)
    OTHER_KEY.verify_key.verify(msg, rot.proof)
    assert json.loads(frame.payload) == {"new_public_key": new_pub.hex(), "proof": rot.proof.hex()}
    h = frame.header
    assert (h.kind, h.codec, h.window_start_ms, h.window_end_ms) == (
        Kind.KEY_ROTATION,
        Codec.NONE,
        h.created_wall_ms,
        h.created_wall_ms,
    )


def rotation_frame(body: dict[str, str]) -> tuple[Frame, bytes]:
    raw = json.dumps(body).encode()
    return wire.parse_frame(forge(kind=2, raw=raw, site=b"site-a", node=b"node-1", window=(1, 1))), raw


def test_key_rotation_rejections() -> None:
    new_pub = bytes(OTHER_KEY.verify_key)
    good_proof = OTHER_KEY.sign(wire.rotation_proof_message("site-a", "node-1", wire.key_id(PUB), new_pub)).signature
    frame, raw = rotation_frame({"new_public_key": new_pub.hex(), "proof": good_proof.hex()})
    assert wire.decode_key_rotation(frame, raw).proof == good_proof

    wrong_signer = KEY.sign(wire.rotation_proof_message("site-a", "node-1", wire.key_id(PUB), new_pub)).signature
    other_node = OTHER_KEY.sign(wire.rotation_proof_message("site-a", "node-2", wire.key_id(PUB), new_pub)).signature
    flipped = bytes([good_proof[0] ^ 1]) + good_proof[1:]
    for proof in (wrong_signer, other_node, flipped):
        frame, raw = rotation_frame({"new_public_key": new_pub.hex(), "proof": proof.hex()})
        assert reason(lambda frame=frame, raw=raw: wire.decode_key_rotation(frame, raw)) == "bad_signature"
    for body in (
        {"new_public_key": new_pub.hex()[:-2], "proof": good_proof.hex()},
        {"new_public_key": new_pub.hex(), "proof": good_proof.hex()[:-2]},  # 63-byte proof
        {"new_public_key": new_pub.hex(), "proof": good_proof.hex() + "00"},
        {"new_public_key": "zz" * 32, "proof": good_proof.hex()},
        {"new_public_key": new_pub.hex()},
        {"new_public_key": 5, "proof": good_proof.hex()},  # type: ignore[dict-item]
    ):
        frame, raw = rotation_frame(body)
        assert reason(lambda frame=frame, raw=raw: wire.decode_key_rotation(frame, raw)) == "malformed"
    frame, _ = rotation_frame({})
    assert reason(lambda: wire.decode_key_rotation(frame, b"[" * 50_000)) == "malformed"


# ---------------------------------------------------------------- compactness


def realistic_fleet(n_series: int = 1000, n_points: int = 60, seed: int = 7) -> list[Series]:
    """Slowly changing node/GPU/SMART-like metrics sampled every second for a minute."""
    rng = random.Random(seed)
    ts = tuple(T0 + 1000 * i for i in range(n_points))
    out = []
    for i in range(n_series):
        labels = (("device", f"dev{i % 40}"), ("instance", f"node-{i // 40}"), ("job", "node"))
        kind = i % 5
        if kind == 0:  # byte counter with a steady-ish rate
            rate, v, vals = rng.randint(1000, 50_000), float(rng.randint(0, 2**40)), []
            for _ in ts:
                v += rate + rng.randint(-rate // 20, rate // 20)
                vals.append(v)
            out.append(Series(f"node_network_receive_bytes_total_{i % 7}", labels, MetricType.COUNTER, ts, tuple(vals)))
        elif kind == 1:  # event counter that rarely moves
            v, vals = float(rng.randint(0, 10_000)), []
            for _ in ts:
                v += rng.random() < 0.05
                vals.append(v)
            out.append(Series(f"node_network_receive_errs_total_{i % 7}", labels, MetricType.COUNTER, ts, tuple(vals)))
        elif kind == 2:  # temperature in 0.5 C steps
            v, vals = rng.randint(60, 160) / 2, []
            for _ in ts:
                v += rng.choice((-0.5, 0, 0, 0, 0.5))
                vals.append(v)
            out.append(Series(f"DCGM_FI_DEV_GPU_TEMP_{i % 7}", labels, MetricType.GAUGE, ts, tuple(vals)))
        elif kind == 3:  # utilization percent, integer
            v, vals = rng.randint(0, 100), []
            for _ in ts:
                v = min(100, max(0, v + rng.randint(-3, 3)))
                vals.append(float(v))
            out.append(Series(f"DCGM_FI_DEV_GPU_UTIL_{i % 7}", labels, MetricType.GAUGE, ts, tuple(vals)))
        else:  # constant (capacity, SMART status, info)
            out.append(
                Series(
                    f"node_memory_MemTotal_bytes_{i % 7}",
                    labels,
                    MetricType.GAUGE,
                    ts,
                    (float(rng.randint(1, 2**38)),) * n_points,
                )
            )
    return out


def test_compactness_under_one_byte_per_sample() -> None:
    series = realistic_fleet()
    raw = wire.encode_data_batch(ctx(level=19), series)
    samples = sum(len(s.values) for s in series)
    per_sample = len(raw) / samples
    print(
        f"\nwire v1: {len(series)} series x 60 points = {samples} samples -> {len(raw)} bytes "
        f"= {per_sample:.3f} bytes/sample (uncompressed payload {len(wire.encode_series(series))} bytes)"
    )
    assert_same(accept(raw)[1], series)
    assert per_sample < 1.0


# ---------------------------------------------------------------- docs/wire.md worked example

EXAMPLE_SEED = bytes(range(32))


def example_series() -> list[Series]:
    a = (T0, T0 + 1000, T0 + 2000)
    b = (T0, T0 + 1000, T0 + 2001, T0 + 2999)
    return [
        Series("up", (("job", "agent"),), MetricType.GAUGE, a, (1.0, 1.0, 1.0)),
        Series("temp_c", (("gpu", "0"),), MetricType.GAUGE, a, (41.5, 41.75, 42.0)),
        Series("load", (), MetricType.GAUGE, b, (1 / 3, 0.5, 2 / 3, 0.75)),
    ]


def example_batch() -> bytes:
    """The docs' example: codec NONE (zstd output can vary across library versions)."""
    series = example_series()
    return wire.frame._build(
        signing_key=SigningKey(EXAMPLE_SEED),
        kind=Kind.DATA,
        raw=wire.encode_series(series),
        site="s1",
        node="n1",
        seq=1,
        prev_hash=ZERO_HASH,
        created_wall_ms=T0 + 3000,
        created_mono_ns=5_000_000_000,
        window_start_ms=T0,
        window_end_ms=T0 + 2999,
        series_count=len(series),
        sample_count=sum(len(s.values) for s in series),
        codec=Codec.NONE,
        zstd_level=0,
    )


def example_hexdump() -> str:
    raw = example_batch()
    return "\n".join(f"{i:04x}: {raw[i : i + 16].hex(' ')}" for i in range(0, len(raw), 16))


def example_annotated() -> str:
    """Walk the example field by field, as a reader of docs/wire.md would."""
    raw = example_batch()
    rows: list[tuple[int, bytes, str]] = []
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        chunk = raw[pos : pos + n]
        rows.append((pos, chunk, what))
        pos += n
        return chunk

    take(4, 'magic "WSB1"')
    take(1, "version 1")
    take(1, "kind 0 = DATA")
    take(1, "codec 0 = NONE")
    take(1, "flags 0")
    take(8, "seq 1 (u64)")
    take(32, "prev_hash: zero, first batch")
    take(8, f"created_wall_ms {T0 + 3000} (i64)")
    take(8, "created_mono_ns 5000000000 (u64)")
    take(8, f"window_start_ms {T0} (i64)")
    take(8, f"window_end_ms {T0 + 2999} (i64)")
    take(4, "series_count 3 (u32)")
    take(4, "sample_count 10 (u32)")
    raw_len = struct.unpack("<I", raw[88:92])[0]
    take(4, f"raw_len {raw_len} (u32)")
    take(4, f"payload_len {raw_len} (u32): equal to raw_len for codec NONE")
    take(8, "key_id = SHA-256(public key)[:8]")
    take(1, "site length 2")
    take(2, 'site "s1"')
    take(1, "node length 2")
    take(2, 'node "n1"')
    rows.append((pos, b"", f"--- payload ({raw_len} bytes) starts"))
    take(4, "string count 7 (u32)")
    take(28, "7 string lengths (u32 each): 2 3 5 6 3 1 4")
    blob_len = sum(struct.unpack("<7I", raw[pos - 28 : pos]))
    take(blob_len, 'strings "up" "job" "agent" "temp_c" "gpu" "0" "load"')
    take(4, "column count 2 (u32)")
    take(12, f"col 0: n=3 (u32), first={T0} (i64)")
    take(8, "col 0: first delta 1000 (i64)")
    take(2, "col 0: 1 delta-of-delta: width 1, [0]")
    take(12, f"col 1: n=4, first={T0}")
    take(8, "col 1: first delta 1000")
    take(3, "col 1: 2 delta-of-deltas: width 1, [1, -3] -> deltas 1000 1001 998")
    take(4, "series count 3 (u32)")
    take(11, "series 0: name 0 'up', type 0 GAUGE, 1 label, column 0 (u32 u8 u16 u32)")
    take(8, "  label: key 1 'job' = value 2 'agent' (u32 u32)")
    take(11, "series 1: name 3 'temp_c', GAUGE, 1 label, column 0")
    take(8, "  label: key 4 'gpu' = value 5 '0'")
    take(11, "series 2: name 6 'load', GAUGE, 0 labels, column 1")
    take(9, "values 0: mode 0 CONST, 1.0 (f64)")
    take(10, "values 1: mode 1 SCALED_DELTA, scale 2, first 4150 (i64)")
    take(3, "  deltas: width 1, [25, 25] -> 41.5 41.75 42.0")
    take(33, "values 2: mode 2 FLOAT64, 4 x f64")
    rows.append((pos, b"", f"--- payload ends; the signature covers bytes 0..{pos - 1}"))
    take(64, "Ed25519 signature")
    assert pos == len(raw)
    lines = []
    for off, chunk, what in rows:
        hexed = chunk.hex(" ") if len(chunk) <= 12 else chunk[:12].hex(" ") + " .."
        lines.append(f"{off:4d} {len(chunk):3d}  {hexed:<38} {what}")
    return "\n".join(lines)


def doc_block(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    assert begin in text and end in text, f"docs/wire.md lacks the {name} block"
    block = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert block.startswith("```text\n") and block.endswith("\n```")
    return block[len("```text\n") : -len("\n```")]


def test_doc_worked_example_is_byte_identical() -> None:
    assert doc_block("example-hex") == example_hexdump()
    assert doc_block("example-annotated") == example_annotated()
    pub = bytes(SigningKey(EXAMPLE_SEED).verify_key)
    frame, series = accept(example_batch(), pub)
    assert_same(series, example_series())
    text = DOC.read_text(encoding="utf-8")
    assert pub.hex() in text and wire.key_id(pub).hex() in text and frame.hash.hex() in text


if __name__ == "__main__":
    pub = bytes(SigningKey(EXAMPLE_SEED).verify_key)
    print("public key", pub.hex(), "key id", wire.key_id(pub).hex(), "hash", wire.batch_hash(example_batch()).hex())
    print(f"<!-- BEGIN example-hex -->\n```text\n{example_hexdump()}\n```\n<!-- END example-hex -->")
    print(f"<!-- BEGIN example-annotated -->\n```text\n{example_annotated()}\n```\n<!-- END example-annotated -->")


def test_series_table_cache_reuses_identities_only_when_confirmed_and_identical() -> None:
    ts1 = (1_700_000_000_000,)
    ts2 = (1_700_000_060_000,)
    shape = [("node_load1", (("job", "node"),)), ("up", (("job", "vllm"), ("model", "m")))]

    def batch(ts: tuple[int, ...], values: tuple[float, float], names: list[tuple[str, Any]] = shape) -> bytes:
        return wire.encode_series([wire.Series(n, lb, wire.MetricType.GAUGE, ts, (v,))
                                   for (n, lb), v in zip(names, values, strict=True)])

    cache = wire.SeriesTableCache()
    first = wire.decode_series(batch(ts1, (1.5, 1.0)), cache=cache)
    assert not cache.hit
    again = wire.decode_series(batch(ts2, (2.5, 0.0)), cache=cache)
    assert not cache.hit, "an unconfirmed table is never trusted"
    cache.confirm()
    third = wire.decode_series(batch(ts1, (3.25, 1.0)), cache=cache)
    assert cache.hit
    assert [(s.name, s.labels, s.timestamps_ms, s.values) for s in third] == [
        ("node_load1", (("job", "node"),), ts1, (3.25,)), ("up", (("job", "vllm"), ("model", "m")), ts1, (1.0,))]
    assert again[0].labels is third[0].labels and first[0].labels is not third[0].labels  # reused
    assert again[1].values == (0.0,)
    # Same strings, different series table (labels swapped between series): decoded afresh.
    swapped = [("node_load1", (("job", "vllm"),)), ("up", (("job", "node"), ("model", "m")))]
    other = wire.decode_series(batch(ts1, (1.0, 2.0), swapped), cache=cache)
    assert not cache.hit and [s.labels for s in other] == [lb for _, lb in swapped]


def test_compression_context_is_capped_without_costing_bytes() -> None:
    """wire.compress caps zstd's match-finder tables (the agent's peak RSS at each flush):
    on a batch the size of an agent's minute the frame is as small as level 19's own
    parameters make it, from a context less than half the size. Bigger batches, where the
    cap would cost bytes, keep zstd's own parameters."""
    from agent.sources import promtext

    page = (Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "metrics" / "node_exporter.prom")
    rng = random.Random(7)
    series = [
        Series(name, tuple(sorted(labels.items())), MetricType.GAUGE, tuple(1_700_000_000_000 + 10_000 * i
                                                                             for i in range(6)),
               tuple(value + rng.choice((0.0, 0.0, 1.0, 0.5)) * i for i in range(6)))
        for fam in promtext.parse(page.read_text()) for name, labels, value, _ in fam.samples
    ]
    small = wire.encode_series(series[:2500])
    assert 100_000 < len(small) <= wire.ZSTD_CAP_MAX_INPUT
    ours = wire.compress(small, 19)
    assert zstandard.ZstdDecompressor().decompress(ours) == small
    assert zstandard.get_frame_parameters(ours).content_size == len(small)
    assert len(ours) <= len(zstandard.ZstdCompressor(level=19).compress(small)) * 1.01
    capped = wire.zstd_parameters(19, len(small))
    full = zstandard.ZstdCompressionParameters.from_level(19, source_size=len(small))
    assert (capped.hash_log, capped.chain_log) == (wire.ZSTD_TABLE_LOG_MAX, wire.ZSTD_TABLE_LOG_MAX)
    assert capped.estimated_compression_context_size() * 2 < full.estimated_compression_context_size()
    big = wire.encode_series(series * 4)
    assert len(big) > wire.ZSTD_CAP_MAX_INPUT
    uncapped = wire.zstd_parameters(19, len(big))
    default = zstandard.ZstdCompressionParameters.from_level(19, source_size=len(big))
    assert (uncapped.hash_log, uncapped.chain_log) == (default.hash_log, default.chain_log)
