"""Hostile input at scale: the project's own fuzzer against a real collector over loopback.

A real `waystation-collector serve` process takes requests from several sender processes,
each running a few lanes (one enrolled node each, its own key and hash chain) over HTTP/1.1
keep-alive connections. Every request is one fuzz kind, drawn per lane from a generator
seeded by --seed (replaying a lane replays its requests):

    valid             a correctly built batch (v1, v2 with or without its table, drop receipt)
    resend            an accepted body again (a duplicate)
    mutate            byte mutations of accepted bodies (v1/v2 frames, table + frame bodies,
                      drop receipts, a key rotation), not re-signed: flips, boundary values,
                      inserts, deletions, truncation, splices, lying header lengths
    table_mutate      a table + frame body whose table alone is mutated
    signed_raw        correctly signed garbage: the raw payload (v1 or v2) mutated, then
                      compressed and signed by the node's enrolled key at its next seq
    signed_zstd       the compressed payload mutated, then signed
    signed_header     header fields lying (counts, raw_len, payload_len, codec, kind, version,
                      flags, window, key id, site/node), signed
    signed_table      a v2 batch naming a mutated series table that comes with it, signed
    signed_drop       drop receipts whose JSON is mutated or lies, signed
    bomb              decompression bombs: small raw_len over a huge zstd stream, raw_len over
                      the limit, in-limit zeros, a bomb in a series table, concatenated frames
    table_ref         v2 batches naming an unknown table, another node's table (held for
                      that node: must stay unknown for this one), a table that is not the
                      one named, a table sent with a v1 frame or a drop receipt
    foreign_key       another node's frame signed with this node's key, and the reverse
    chain             valid payloads at a used seq (conflict) or with a wrong prev_hash
    garbage           empty, random, magic-prefixed and table-prefixed garbage bodies
    endpoints         the other routes: GET /v1/nodes/{site}/{node}/chain (fuzzed names),
                      /v1/nodes, /healthz, /metrics, POST /v1/import with and without its
                      token (mutated and lying bundle items), unknown routes and methods,
                      a declared body over max_body_bytes
    transport         HTTP-level lies on a fresh connection (bad Content-Length, bad chunks)

plus, in sender 0, a bounded number of slow bodies on their own connections (a sender
trickling bytes past body_read_timeout, one trickling a whole frame within it, one that
hangs up mid-body, one trickling its headers).

The oracle: a request may be accepted (or answered duplicate) only if its frame is
byte-identical to a valid frame the fuzzer built, or is correctly signed garbage that an
independent decoder written from docs/wire.md (below, not wire/) finds valid; correctly
signed garbage the collector lets past verification (accepted, duplicate, conflict,
chain_mismatch) must be valid by that decoder too. Afterwards every batch and series table
in the ledger is checked against the same sets. Also checked: no 5xx, no connection closed
without an answer (outside the slow bodies, where the collector's timeout is the expected
end), a JSON reason on every refusal, collector RSS growth after warm-up, a valid batch
accepted at the end, the process alive and its log free of tracebacks. Prints a histogram
of refusal reasons by fuzz kind, requests/s and the projected time for 1,000,000.

    python bench/hostile_suite.py --requests 1000000 --senders 2
    python bench/hostile_suite.py --requests 20000 --seed 7 --minutes-cap 2
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from array import array
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import zstandard  # noqa: E402
from nacl.exceptions import BadSignatureError  # noqa: E402
from nacl.signing import SigningKey, VerifyKey  # noqa: E402

import wire  # noqa: E402
from agent import keys as agent_keys  # noqa: E402
from bench.common import ENV, free_port, wait_http  # noqa: E402

SITE = "hostile"
MiB = 1024 * 1024
PASSED = ("accepted", "duplicate", "conflict", "chain_mismatch")  # verification went through
KINDS: dict[str, float] = {
    "valid": 5, "resend": 2, "mutate": 30, "table_mutate": 4, "signed_raw": 14, "signed_zstd": 5,
    "signed_header": 8, "signed_table": 5, "signed_drop": 3, "bomb": 0.6, "table_ref": 5,
    "foreign_key": 2, "chain": 3, "garbage": 8, "endpoints": 4, "transport": 0.4,
}


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def node_name(i: int) -> str:
    return f"fuzz-{i:03d}"


def node_key(seed: int, i: int) -> SigningKey:
    return SigningKey(sha256(f"hostile-suite:{seed}:{i}".encode()))


# ---------------------------------------------------------------------------------------
# The oracle: an independent reading of docs/wire.md (§1-§7, §10), steps 2-6 of §7. It
# shares no code with wire/; it runs only on correctly signed garbage, so speed is no goal.
# ---------------------------------------------------------------------------------------

_FIXED = struct.Struct("<4sBBBBQ32sqQqqIIII8s")
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
MAX_SERIES, MAX_SAMPLES, MAX_LABELS, MAX_STRING = 200_000, 5_000_000, 64, 4096
MAX_RAW = 128 * MiB
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TABLE_HEAD = struct.Struct("<4sBBBBIII")


class Invalid(Exception):
    """The frame breaks a rule of docs/wire.md; the message says which."""


def need(cond: bool, why: str) -> None:
    if not cond:
        raise Invalid(why)


class Cursor:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        need(n >= 0 and self.pos + n <= len(self.buf), "truncated")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def i64(self) -> int:
        return int.from_bytes(self.take(8), "little", signed=True)

    def intarray(self, count: int) -> list[int]:
        width = self.u8()
        need(width in (1, 2, 4, 8), f"integer width {width}")
        raw = self.take(width * count)
        return [int.from_bytes(raw[i:i + width], "little", signed=True) for i in range(0, len(raw), width)]

    def u32s(self, count: int) -> list[int]:
        raw = self.take(4 * count)
        return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]

    def done(self) -> None:
        need(self.pos == len(self.buf), "bytes after the end")


def _strings(c: Cursor, max_count: int) -> list[str]:
    count = c.u32()
    need(count <= max_count, "limit: too many strings")
    lengths = c.u32s(count)
    need(all(n <= MAX_STRING for n in lengths), "limit: string too long")
    try:
        return [c.take(n).decode("utf-8") for n in lengths]
    except UnicodeDecodeError as exc:
        raise Invalid(f"not UTF-8: {exc}") from None


def _schema(name: str, labels: list[tuple[str, str]]) -> None:
    need(bool(_METRIC_NAME.fullmatch(name)) and name.isascii(), f"schema: metric name {name!r}")
    keys = [k for k, _ in labels]
    for k in keys:
        need(bool(_LABEL_NAME.fullmatch(k)) and k.isascii() and not k.startswith("__"), f"schema: label {k!r}")
    need(len(set(keys)) == len(keys), "schema: repeated label name")


def _decompress(payload: bytes, codec: int, raw_len: int) -> bytes:
    need(raw_len <= MAX_RAW, "too_large")
    if codec == 0:
        need(len(payload) == raw_len, "NONE payload length differs from raw_len")
        return payload
    d = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = d.decompress(payload)
    except zstandard.ZstdError as exc:
        raise Invalid(f"zstd: {exc}") from None
    need(d.eof and not d.unused_data, "not exactly one zstd frame")
    need(len(out) == raw_len, "zstd output differs from raw_len")
    return out


def oracle_payload_v1(raw: bytes, series_count: int, sample_count: int) -> None:
    c = Cursor(raw)
    strings = _strings(c, MAX_SERIES * (2 * MAX_LABELS + 1))
    ncol = c.u32()
    need(ncol <= MAX_SERIES, "limit: columns")
    lengths, points = [], 0
    for _ in range(ncol):
        n = c.u32()
        need(n >= 1, "empty column")
        points += n
        need(points <= MAX_SAMPLES, "limit: column points")
        t = c.i64()
        if n >= 2:
            d = c.i64()
            t += d
            need(I64_MIN <= t <= I64_MAX, "timestamp leaves i64")
            for dd in c.intarray(n - 2):
                d += dd
                t += d
                need(I64_MIN <= d <= I64_MAX and I64_MIN <= t <= I64_MAX, "timestamp leaves i64")
        lengths.append(n)
    nser = c.u32()
    need(nser <= MAX_SERIES, "limit: series")
    heads = []
    for _ in range(nser):
        name, mtype, nlab, col = c.u32(), c.u8(), c.u16(), c.u32()
        need(nlab <= MAX_LABELS, "limit: labels")
        labels = [(c.u32(), c.u32()) for _ in range(nlab)]
        need(name < len(strings) and col < ncol and mtype <= 3, "index or type out of range")
        need(all(k < len(strings) and v < len(strings) for k, v in labels), "label index out of range")
        heads.append((strings[name], [(strings[k], strings[v]) for k, v in labels], lengths[col]))
    samples = 0
    for _, _, n in heads:
        samples += n
        need(samples <= MAX_SAMPLES, "limit: samples")
        mode = c.u8()
        if mode == 0:
            c.take(8)
        elif mode == 1:
            k = c.u8()
            need(k <= 9, "scale above 9")
            i = c.i64()
            need(abs(i) <= 1 << 53, "scaled integer beyond 2^53")
            for delta in c.intarray(n - 1):
                i += delta
                need(abs(i) <= 1 << 53, "scaled integer beyond 2^53")
        elif mode == 2:
            c.take(8 * n)
        else:
            raise Invalid(f"value mode {mode}")
    c.done()
    need(series_count == nser and sample_count == samples, "schema: counts")
    for name, labels, _ in heads:
        _schema(name, labels)


def oracle_table(blob: bytes) -> int:
    """A series table per §10.3; returns its series count."""
    need(len(blob) >= 20, "table shorter than its head")
    magic, version, codec, flags, reserved, count, raw_len, payload_len = _TABLE_HEAD.unpack_from(blob)
    need(magic == b"WSTB" and version == 1 and codec in (0, 1), "table head")
    need(flags == 0 and reserved == 0, "table flags (no collector key here to open a sealed one)")
    need(20 + payload_len == len(blob), "table length")
    need(count <= MAX_SERIES, "limit: table series")
    c = Cursor(_decompress(blob[20:], codec, raw_len))
    strings = _strings(c, count * (2 * MAX_LABELS + 1))
    need(c.u32() == count, "table series count differs from its head")
    for _ in range(count):
        name, mtype, nlab = c.u32(), c.u8(), c.u16()
        need(nlab <= MAX_LABELS, "limit: labels")
        labels = [(c.u32(), c.u32()) for _ in range(nlab)]
        need(name < len(strings) and mtype <= 3, "index or type out of range")
        need(all(k < len(strings) and v < len(strings) for k, v in labels), "label index out of range")
        _schema(strings[name], [(strings[k], strings[v]) for k, v in labels])
    c.done()
    return count


def _words(planed: bytes, n: int) -> array[int]:
    out = bytearray(8 * n)
    for j in range(8):
        out[j::8] = planed[j * n:(j + 1) * n]
    arr = array("Q")
    arr.frombytes(bytes(out))
    if sys.byteorder != "little":
        arr.byteswap()
    return arr


def oracle_payload_v2(raw: bytes, series_count: int, sample_count: int, tables: Mapping[bytes, bytes],
                      attached: bytes | None) -> None:
    need(len(raw) >= 52, "v2 payload shorter than its head")
    tid, t_count, m, c, pc, p = struct.unpack_from("<32sIIIII", raw)
    if attached is not None:
        need(sha256(attached) == tid, "the table sent is not the one named")
        blob: bytes | None = attached
    else:
        blob = tables.get(tid)
        need(blob is not None, "unknown_table")
    assert blob is not None
    need(oracle_table(blob) == t_count, "T differs from the table's series count")
    need(m <= MAX_SERIES and c <= MAX_SERIES and p <= MAX_SAMPLES and pc <= MAX_SAMPLES, "limit")
    need(len(raw) == 52 + 9 * m + 4 * c + 8 * pc + 8 * p, "v2 payload length")
    cur = Cursor(raw)
    cur.take(52)
    gaps, cols, col_len = cur.u32s(m), cur.u32s(m), cur.u32s(c)
    scales = cur.take(m)
    index = -1
    for g in gaps:
        need(g >= 1, "gap of 0")
        index += g
    need(index < t_count, "table index beyond the table")
    need(all(n >= 1 for n in col_len) and sum(col_len) == pc, "column lengths")
    need(all(k < c for k in cols), "column out of range")
    need(all(s <= 9 or s == 255 for s in scales), "scale")
    counts = [col_len[k] for k in cols]
    need(sum(counts) == p, "series points differ from P")
    cur.take(8 * pc)  # every timestamp word sequence decodes (modulo 2^64)
    values = _words(cur.take(8 * p), p)
    at = 0
    for n, s in zip(counts, scales, strict=True):
        if s != 255:
            acc = 0
            for w in values[at:at + n]:
                acc = (acc + w) & ((1 << 64) - 1)
                i = acc - (1 << 64) if acc >= 1 << 63 else acc
                need(abs(i) <= 1 << 53, "scaled integer beyond 2^53")
        at += n
    cur.done()
    need(series_count == m and sample_count == p, "schema: counts")


def oracle_drop(raw: bytes, seq: int, window: tuple[int, int], counts: tuple[int, int]) -> None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Invalid(f"drop receipt JSON: {exc}") from None
    need(isinstance(obj, dict), "drop receipt not an object")

    def integer(v: object, lo: int, hi: int) -> int:
        need(type(v) is int and lo <= v <= hi, f"not an integer in range: {v!r}")  # type: ignore[operator]
        return int(v)  # type: ignore[call-overload]

    need(all(k in obj for k in ("ranges", "t0_ms", "t1_ms", "batches", "samples", "bytes", "reason")), "key missing")
    ranges = obj["ranges"]
    need(isinstance(ranges, list) and len(ranges) <= 100_000, "ranges")
    pairs = []
    for r in ranges:
        need(isinstance(r, list) and len(r) == 2, "range")
        a, b = integer(r[0], 1, I64_MAX), integer(r[1], 1, I64_MAX)
        need(a <= b, "range a > b")
        pairs.append((a, b))
    need(isinstance(obj["reason"], str), "reason")
    t0, t1 = integer(obj["t0_ms"], I64_MIN, I64_MAX), integer(obj["t1_ms"], I64_MIN, I64_MAX)
    batches = integer(obj["batches"], 0, I64_MAX)
    integer(obj["samples"], 0, I64_MAX)
    integer(obj["bytes"], 0, I64_MAX)
    need(counts == (0, 0) and t0 <= t1 and window == (t0, t1), "schema: receipt header")
    need(all(b < seq for _, b in pairs), "schema: receipt covers its own seq")
    named, upto = 0, 0
    for a, b in sorted(pairs):
        if b > upto:
            named += b - max(a, upto + 1) + 1
            upto = b
    need(1 <= batches <= named, "schema: receipt batch count")


def oracle_rotation(raw: bytes, site: str, node: str, key_id: bytes, wall: int,
                    window: tuple[int, int], counts: tuple[int, int]) -> None:
    try:
        obj = json.loads(raw.decode("utf-8"))
        new_pk, proof = obj["new_public_key"], obj["proof"]
        need(isinstance(new_pk, str) and isinstance(proof, str), "rotation fields")
        need(re.fullmatch("[0-9a-fA-F]{64}", new_pk) is not None, "rotation key hex")
        need(re.fullmatch("[0-9a-fA-F]{128}", proof) is not None, "rotation proof hex")
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, KeyError) as exc:
        raise Invalid(f"rotation JSON: {exc}") from None
    need(counts == (0, 0) and window == (wall, wall), "schema: rotation header")
    msg = b"waystation-key-rotation\x00" + site.encode() + b"\x00" + node.encode() + b"\x00" + key_id
    try:
        VerifyKey(bytes.fromhex(new_pk)).verify(msg + bytes.fromhex(new_pk), bytes.fromhex(proof))
    except BadSignatureError:
        raise Invalid("rotation proof") from None


def oracle_verdict(frame: bytes, public_key: bytes, site: str, node: str, tables: Mapping[bytes, bytes],
                   attached: bytes | None) -> str | None:
    """None when docs/wire.md says the collector must open this frame of `site`/`node` (whose
    enrolled key is `public_key` and which holds `tables` for it), else why not."""
    try:
        need(len(frame) >= 170, "shorter than any frame")
        (magic, version, kind, codec, flags, seq, _prev, wall, _mono, ws, we, n_series, n_samples, raw_len,
         payload_len, kid) = _FIXED.unpack_from(frame)
        need(magic == b"WSB1", "magic")
        need(version in (1, 2), "unsupported_version")
        c = Cursor(frame)
        c.take(104)
        site_b = c.take(c.u8())
        node_b = c.take(c.u8())
        head_len = c.pos
        need(head_len + payload_len + 64 == len(frame), "frame length")
        try:
            f_site, f_node = site_b.decode("utf-8"), node_b.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("names not UTF-8") from None
        need(kind <= 2 and codec <= 1 and bool(f_site) and bool(f_node), "kind, codec or names")
        need(flags == 0, "flags (sealed: no collector key here)")
        need(1 <= seq <= I64_MAX and we >= ws, "seq or window")
        need((f_site, f_node) == (site, node) and kid == sha256(public_key)[:8], "unknown_key")
        try:
            VerifyKey(public_key).verify(frame[:-64], frame[-64:])
        except BadSignatureError:
            raise Invalid("bad_signature") from None
        columnar = kind == 0 and version == 2
        need(attached is None or columnar, "a table sent with a frame that names none")
        raw = _decompress(frame[head_len:head_len + payload_len], codec, raw_len)
        if columnar:
            oracle_payload_v2(raw, n_series, n_samples, tables, attached)
        elif kind == 0:
            oracle_payload_v1(raw, n_series, n_samples)
        elif kind == 1:
            oracle_drop(raw, seq, (ws, we), (n_series, n_samples))
        else:
            oracle_rotation(raw, f_site, f_node, kid, wall, (ws, we), (n_series, n_samples))
    except Invalid as exc:
        return str(exc)
    return None


def split_body(body: bytes) -> tuple[bytes | None, bytes]:
    """(table, frame) as docs/wire.md §10.6 reads a request body."""
    if body[:4] == b"WSTB" and len(body) >= 20:
        end = 20 + int.from_bytes(body[16:20], "little")
        return body[:end], body[end:]
    return None, body


# ---------------------------------------------------------------------------------------
# Building frames: the wire package for valid batches, a hand signer for lying headers.
# ---------------------------------------------------------------------------------------


def sign_frame(key: SigningKey, fields: dict[str, Any], payload: bytes) -> bytes:
    """A frame with whatever header fields `fields` says (lies included), correctly signed."""
    site_b, node_b = fields["site"].encode(), fields["node"].encode()
    head = _FIXED.pack(
        b"WSB1", fields["version"] & 0xFF, fields["kind"] & 0xFF, fields["codec"] & 0xFF, fields["flags"] & 0xFF,
        fields["seq"], fields["prev"], fields["wall"], fields["mono"], fields["ws"], fields["we"],
        fields["series"] & 0xFFFFFFFF, fields["samples"] & 0xFFFFFFFF, fields["raw_len"] & 0xFFFFFFFF,
        fields.get("payload_len", len(payload)) & 0xFFFFFFFF, fields.get("key_id", wire.key_id(bytes(key.verify_key))),
    )
    signed = head + bytes((len(site_b) & 0xFF,)) + site_b + bytes((len(node_b) & 0xFF,)) + node_b + payload
    return signed + key.sign(signed).signature


BOUNDARY = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One to four random byte-level mutations."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(12)
        n = len(b)
        at = rng.randrange(n) if n else 0
        if op <= 2 and n:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 3 and n:
            b[at] = rng.randrange(256)
        elif op == 4 and n:
            b[at] = rng.choice((0, 0xFF, 0x7F, 0x80, 1))
        elif op == 5 and n >= 4:
            at = rng.randrange(n - 3)
            value = rng.choice(BOUNDARY + (n, n - 1, n + 1, rng.getrandbits(32)))
            b[at:at + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        elif op == 6:
            b[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 7 and n:
            del b[at:at + rng.randint(1, 16)]
        elif op == 8 and n:
            del b[rng.randrange(n):]
        elif op == 9:
            b += rng.randbytes(rng.randint(1, 64))
        elif op == 10 and n:
            j = rng.randrange(n)
            b[at:at] = b[j:j + rng.randint(1, 32)]
        elif n:
            b[at:at + rng.randint(1, 32)] = bytes(min(n - at, 32))
    return bytes(b)


@dataclass
class Sent:
    """Which frames the fuzzer may see accepted, and which tables the ledger may hold."""

    valid: set[bytes] = field(default_factory=set)  # hashes of valid frames it built
    mutants: set[bytes] = field(default_factory=set)  # signed garbage the oracle found valid
    tables: set[tuple[str, bytes]] = field(default_factory=set)  # (node, table id) legitimately sent


# ---------------------------------------------------------------------------------------
# HTTP/1.1 over asyncio streams: keep-alive, no library in the way of odd requests.
# ---------------------------------------------------------------------------------------


class NoAnswer(Exception):
    """The connection ended (or stalled) before a whole response arrived."""


class Http:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def raw(self, data: bytes, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        """Write bytes as they are and read one response."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        try:
            self.writer.write(data)
            async with asyncio.timeout(timeout):
                return await self._response(self.reader)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            await self.close()
            raise NoAnswer(f"{type(exc).__name__}: {exc}") from None

    async def _response(self, r: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        line = await r.readline()
        if not line:
            raise ConnectionResetError("closed before any response")
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (h := await r.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while (size := int((await r.readline()).split(b";")[0], 16)) > 0:
                body += await r.readexactly(size + 2)
                body = body[:-2]
            await r.readline()
        else:
            body = await r.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: application/x-waystation-batch\r\n{extra}\r\n")
        return await self.raw(head.encode() + body, timeout)


def answer(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


# ---------------------------------------------------------------------------------------
# A lane: one enrolled node, its chain, its fuzz kinds.
# ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    hist: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, result or status)
    failures: list[str] = field(default_factory=list)
    failure_count: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    no_reason: int = 0
    oracle_disagree: int = 0  # signed garbage refused that the oracle finds valid (informational)
    oracle_examples: list[str] = field(default_factory=list)
    mutants_accepted: int = 0
    artifacts: Path | None = None

    def fail(self, what: str, detail: str, body: bytes | None = None) -> None:
        self.failure_count[what] += 1
        if len(self.failures) < 40:
            self.failures.append(f"{what}: {detail}")
            if body is not None and self.artifacts is not None:
                self.artifacts.mkdir(parents=True, exist_ok=True)
                (self.artifacts / f"{what}-{os.getpid()}-{len(self.failures)}.bin").write_bytes(body)


class Bombs:
    """zstd streams prepared once per sender: large outputs from a few KB."""

    def __init__(self) -> None:
        z = zstandard.ZstdCompressor(level=1)
        self.zeros_64m = z.compress(bytes(64 * MiB))
        self.zeros_16m = z.compress(bytes(16 * MiB))
        self.zeros_1m = z.compress(bytes(MiB))


class Lane:
    def __init__(self, port: int, seed: int, index: int, nodes: int, token: str, sent: Sent, tally: Tally,
                 bombs: Bombs, foreign: list[tuple[str, bytes]]) -> None:
        self.http = Http(port)
        self.port = port
        self.rng = random.Random(f"{seed}:lane:{index}")
        self.index = index
        self.node = node_name(index)
        self.key = node_key(seed, index)
        self.public = bytes(self.key.verify_key)
        self.other = node_key(seed, (index + 1) % nodes)
        self.other_node = node_name((index + 1) % nodes)
        self.token = token
        self.sent, self.tally, self.bombs = sent, tally, bombs
        self.foreign = foreign  # (node, table id) of other lanes' first tables
        self.seq, self.prev = 1, wire.ZERO_HASH
        self.builder = wire.TableBuilder(zstd_level=3)
        self.zstd = zstandard.ZstdCompressor(level=1)
        self.held: dict[bytes, bytes] = {}  # tables the collector holds for this node
        self.templates: deque[bytes] = deque(maxlen=24)  # accepted bodies
        self.conflicts: list[bytes] = []  # signed frames at used seqs (never to be accepted)
        self.identities = [(f"node_fuzz_metric_{k % 7}", (("lane", str(index)), ("k", str(k)))) for k in range(16)]

    # --- building valid batches ---

    def series(self) -> list[wire.Series]:
        rng = self.rng
        now = int(time.time() * 1000)
        points = rng.choice((1, 1, 2, 3))
        ts = tuple(now - 1000 * (points - i) for i in range(points))
        chosen = rng.sample(self.identities, rng.randint(1, len(self.identities)))
        out = []
        for name, labels in chosen:
            style = rng.randrange(3)
            vals = tuple(float(rng.randint(0, 100)) if style == 0 else round(rng.uniform(-1e3, 1e3), 2) if style == 1
                         else rng.random() for _ in ts)
            out.append(wire.Series(name, labels, wire.MetricType.GAUGE, ts, vals))
        return out

    def ctx(self, seq: int | None = None, prev: bytes | None = None) -> wire.BatchContext:
        return wire.BatchContext(self.key, SITE, self.node, self.seq if seq is None else seq,
                                 self.prev if prev is None else prev, int(time.time() * 1000), time.monotonic_ns(), 3)

    def valid_body(self, version: int | None = None) -> tuple[bytes, bytes]:
        """(body, frame) of a correctly built batch at the next seq; recorded as valid."""
        version = version or self.rng.choice((1, 2, 2))
        if version == 1:
            frame = wire.encode_data_batch(self.ctx(), self.series())
            body = frame
        else:
            table, placed = self.builder.place(self.series())
            frame = wire.sign_batch(wire.prepare_columns(table, placed, 3, int(time.time() * 1000)), self.ctx())
            send_table = table.id not in self.held or self.rng.random() < 0.1
            body = wire.with_table(table.blob if send_table else None, frame)
            if send_table:
                self.sent.tables.add((self.node, table.id))
        self.sent.valid.add(sha256(frame))
        return body, frame

    def raw_parts(self) -> tuple[dict[str, Any], bytes, bytes | None]:
        """(header fields, raw payload, table the payload names) of a valid data batch, unsigned."""
        series = self.series()
        now = int(time.time() * 1000)
        fields = {"site": SITE, "node": self.node, "seq": self.seq, "prev": self.prev, "wall": now,
                  "mono": time.monotonic_ns(), "ws": min(min(s.timestamps_ms) for s in series),
                  "we": max(max(s.timestamps_ms) for s in series), "series": len(series),
                  "samples": sum(len(s.timestamps_ms) for s in series), "kind": 0, "flags": 0}
        if self.rng.random() < 0.4 or not self.held:
            fields["version"] = 1
            return fields, wire.encode_series(series), None
        table, placed = self.builder.place(series)
        fields["version"] = 2
        p = wire.prepare_columns(table, placed, 3, now, codec=wire.Codec.NONE)
        return fields, p.payload, (table.blob if table.id not in self.held else None)

    # --- sending ---

    async def post(self, kind: str, body: bytes, *, signed: bool = False, expect: tuple[str, ...] = (),
                   path: str = "/v1/batches", headers: dict[str, str] | None = None) -> str:
        """POST one body and judge the answer; returns the result word ('' when none)."""
        t = self.tally
        t.requests += 1
        try:
            status, _, resp = await self.http.request("POST", path, body, headers)
        except NoAnswer as exc:
            t.hist[(kind, "no answer")] += 1
            t.fail("no_answer", f"{kind}: {exc}", body)
            return ""
        t.statuses[status] += 1
        obj = answer(resp)
        result = obj.get("result") if obj else None
        if not isinstance(result, str):
            t.no_reason += 1
            t.hist[(kind, f"HTTP {status}, no JSON reason")] += 1
            t.fail("no_reason", f"{kind}: HTTP {status} {resp[:120]!r}", body)
            return ""
        t.hist[(kind, result)] += 1
        if status >= 500:
            t.fail("5xx", f"{kind}: HTTP {status} {result}: {obj.get('error')}", body)
        if expect and result not in expect:
            t.fail("unexpected", f"{kind}: {result} ({obj.get('error')}), expected {'/'.join(expect)}", body)
        attached, frame = split_body(body)
        if result in ("accepted", "duplicate"):
            h = sha256(frame)
            if h not in self.sent.valid and h not in self.sent.mutants:
                if not (signed and self.judge(frame, attached, kind, result, body)):
                    t.fail("wrongly_accepted", f"{kind}: {result} for a frame the oracle does not know", body)
                    return result
            if obj.get("seq") != int.from_bytes(frame[8:16], "little"):
                t.fail("ack_seq", f"{kind}: ack names seq {obj.get('seq')}", body)
        elif result in PASSED:
            h = sha256(frame)
            known = h in self.sent.valid or h in self.sent.mutants or frame in self.conflicts
            if not known and not (signed and self.judge(frame, attached, kind, result, body)):
                t.fail("passed_verification", f"{kind}: {result} for a frame the oracle finds invalid "
                                              f"or never signed", body)
        elif signed and self.rng.random() < 0.05 and result not in ("unknown_table", "unknown_key"):
            # A sample of refused signed garbage: the oracle should agree it is invalid.
            verdict = oracle_verdict(frame, self.public, SITE, self.node, self.held, attached)
            if verdict is None:
                t.oracle_disagree += 1
                if len(t.oracle_examples) < 5:
                    t.oracle_examples.append(f"{kind}: collector {result} ({obj.get('error')}), oracle: valid")
        return result

    def judge(self, frame: bytes, attached: bytes | None, kind: str, result: str, body: bytes) -> bool:
        """Correctly signed garbage that got past verification: valid by the oracle? A valid
        accepted one becomes part of the chain (and its table part of the node's)."""
        verdict = oracle_verdict(frame, self.public, SITE, self.node, self.held, attached)
        if verdict is not None:
            self.tally.fail("passed_verification", f"{kind}: {result}, oracle says invalid: {verdict}", body)
            return True  # reported here, once
        self.sent.mutants.add(sha256(frame))
        if result == "accepted":
            self.tally.mutants_accepted += 1
            if attached is not None:
                self.held[sha256(attached)] = attached
                self.sent.tables.add((self.node, sha256(attached)))
        return True

    def advance(self, frame: bytes) -> None:
        self.seq += 1
        self.prev = sha256(frame)

    async def send_valid(self, kind: str = "valid") -> None:
        r = self.rng.random()
        if r < 0.08 and self.seq > 2:
            receipt = wire.DropReceipt(((1, self.seq - 1),), 1, 2, 1, 0, 0, "spool_quota")
            frame = wire.encode_drop_receipt(self.ctx(), receipt)
            self.sent.valid.add(sha256(frame))
            body = frame
        else:
            body, frame = self.valid_body()
        result = await self.post(kind, body, expect=("accepted",))
        if result == "accepted":
            self.advance(frame)
            self.templates.append(body)
            attached, _ = split_body(body)
            if attached is not None:
                self.held[sha256(attached)] = attached

    async def send_first(self) -> None:
        """The lane's first batch: v2 with its table (other lanes name that table as foreign)."""
        body, frame = self.valid_body(version=2)
        if await self.post("valid", body, expect=("accepted",)) == "accepted":
            self.advance(frame)
            self.templates.append(body)
            attached, _ = split_body(body)
            assert attached is not None
            self.held[sha256(attached)] = attached
            rot = wire.encode_key_rotation(self.ctx(seq=1, prev=wire.ZERO_HASH), SigningKey.generate())
            self.conflicts.append(rot)  # correctly signed at a used seq: never to be accepted

    async def step(self, kind: str) -> None:
        rng = self.rng
        if kind == "valid" or not self.templates:
            await self.send_valid()
        elif kind == "resend":
            await self.post(kind, rng.choice(self.templates), expect=("duplicate",))
        elif kind == "mutate":
            base = rng.choice(list(self.templates) + self.conflicts)
            await self.post(kind, self.header_lie(base) if rng.random() < 0.2 else mutate_bytes(rng, base))
        elif kind == "table_mutate":
            with_tables = [b for b in self.templates if b[:4] == b"WSTB"]
            if with_tables:
                table, frame = split_body(rng.choice(with_tables))
                assert table is not None
                await self.post(kind, mutate_bytes(rng, table) + frame)
        elif kind.startswith("signed_") or kind == "bomb":
            await self.signed(kind)
        elif kind == "table_ref":
            await self.table_ref()
        elif kind == "foreign_key":
            await self.foreign_key()
        elif kind == "chain":
            await self.chain()
        elif kind == "garbage":
            await self.garbage()
        elif kind == "endpoints":
            await self.endpoints()
        elif kind == "transport":
            await self.transport()

    def header_lie(self, base: bytes) -> bytes:
        """A frame whose header lengths lie, not re-signed."""
        table, frame = split_body(base)
        b = bytearray(frame)
        field_at = self.rng.choice((88, 92, 80, 84, 104))  # raw_len, payload_len, counts, site length
        if field_at == 104:
            b[104] = self.rng.choice((0, 1, 255, b[104] + 1, b[104] - 1))
        else:
            b[field_at:field_at + 4] = (self.rng.choice(BOUNDARY + (len(frame),)) & 0xFFFFFFFF).to_bytes(4, "little")
        return (table or b"") + bytes(b)

    async def signed(self, kind: str) -> None:
        """Correctly signed garbage at the node's next seq: only the garbage can stop it."""
        rng = self.rng
        fields, raw, table = self.raw_parts()
        codec = rng.choice((0, 1, 1))
        payload = self.zstd.compress(raw) if codec else raw
        fields.update(codec=codec, raw_len=len(raw))
        if kind == "signed_raw":
            raw = mutate_bytes(rng, raw)
            payload = self.zstd.compress(raw) if codec else raw
            fields["raw_len"] = len(raw)
        elif kind == "signed_zstd":
            fields["codec"] = 1
            payload = mutate_bytes(rng, self.zstd.compress(raw))
        elif kind == "signed_header":
            lie = rng.randrange(12)
            key = ("series", "samples", "raw_len", "payload_len", "codec", "kind", "version", "flags", "ws",
                   "site", "key_id", "wall")[lie]
            if key in ("series", "samples", "raw_len", "payload_len"):
                fields[key] = rng.choice((0, 1, fields.get(key, len(payload)) + 1, fields.get(key, len(payload)) - 1,
                                          0xFFFFFFFF, 0x7FFFFFFF)) & 0xFFFFFFFF
            elif key in ("codec", "kind", "version", "flags"):
                fields[key] = rng.choice((0, 1, 2, 3, 0x80, 0xFF))
            elif key == "ws":
                fields["ws"] = fields["we"] + rng.choice((1, 1000, 1 << 40))
            elif key == "site":
                fields[rng.choice(("site", "node"))] = rng.choice(("x", self.other_node, "é" * 3, "a" * 255))
            elif key == "key_id":
                fields["key_id"] = rng.randbytes(8)
            else:
                fields["wall"] = rng.getrandbits(63)  # informational: still valid
        elif kind == "signed_table":
            if table is None and fields["version"] == 2:
                table = self.held.get(raw[:32])
            if table is None:
                return await self.signed("signed_raw")
            table = mutate_bytes(rng, table)
            t_count = int.from_bytes(table[8:12], "little") if len(table) >= 12 else 0
            raw = sha256(table) + t_count.to_bytes(4, "little") + raw[36:]
            payload = self.zstd.compress(raw) if codec else raw
            fields["raw_len"] = len(raw)
        elif kind == "signed_drop":
            payload = self.lying_receipt(fields)
            table = None
        else:  # bomb
            payload, table = self.bomb(fields)
        frame = sign_frame(self.key, fields, payload)
        result = await self.post(kind, (table or b"") + frame, signed=True)
        if result == "accepted":
            self.advance(frame)

    def lying_receipt(self, fields: dict[str, Any]) -> bytes:
        rng = self.rng
        seq = fields["seq"]
        obj: dict[str, Any] = {"ranges": [[1, max(1, seq - 1)]], "t0_ms": 1, "t1_ms": 2, "batches": 1,
                               "samples": 0, "bytes": 0, "reason": "spool_quota"}
        fields.update(kind=1, codec=0, series=0, samples=0, ws=1, we=2, version=1)
        lie = rng.randrange(8)
        if lie == 0:
            obj["ranges"] = [[1, seq + rng.randint(0, 5)]]
        elif lie == 1:
            obj["batches"] = rng.choice((0, seq + 10, -1, 1.0, True, "1"))
        elif lie == 2:
            obj["t0_ms"], obj["t1_ms"] = 5, 3
        elif lie == 3:
            del obj[rng.choice(list(obj))]
        elif lie == 4:
            obj["ranges"] = [[3, 2]] if rng.random() < 0.5 else [[0, 1]]
        elif lie == 5:
            fields["series"] = 1
        raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        if lie >= 6:
            raw = mutate_bytes(rng, raw)
        fields["raw_len"] = len(raw)
        return raw

    def bomb(self, fields: dict[str, Any]) -> tuple[bytes, bytes | None]:
        rng = self.rng
        b = self.bombs
        fields.update(codec=1, version=1)
        shape = rng.randrange(6)
        if shape == 0:  # tiny claim over 64 MiB
            fields["raw_len"] = rng.choice((100, 4096, MiB))
            return b.zeros_64m, None
        if shape == 1:  # claim over the limit
            fields["raw_len"] = rng.choice((MAX_RAW + 1, 0xFFFFFFFF))
            return b.zeros_64m, None
        if shape == 2:  # an honest 16 MiB of zeros: within the limit, then not a payload
            fields["raw_len"] = 16 * MiB
            return b.zeros_16m, None
        if shape == 3:  # a second frame (64 MiB) after one of exactly raw_len, or trailing bytes
            fields["raw_len"] = MiB
            return b.zeros_1m + (b.zeros_64m if rng.random() < 0.5 else b"\x00" * 7), None
        if shape == 4:  # a series table whose zstd payload is a bomb
            fields["version"] = 2
            head = _TABLE_HEAD.pack(b"WSTB", 1, 1, 0, 0, 1, rng.choice((64, 16 * MiB)), len(b.zeros_64m))
            table = head + b.zeros_64m
            raw = sha256(table) + (1).to_bytes(4, "little") + bytes(16)
            fields["raw_len"] = len(raw)
            fields["codec"] = 0
            return raw, table
        fields["raw_len"] = 16 * MiB  # a claim the stream cannot meet
        return b.zeros_1m, None

    async def table_ref(self) -> None:
        rng = self.rng
        shape = rng.randrange(5)
        fields, raw, table = self.raw_parts()
        if fields["version"] != 2 or not self.held:
            shape = 4
        fields.update(codec=0, raw_len=len(raw))
        if shape == 0:  # an unknown table id
            raw, table = rng.randbytes(32) + raw[32:], None
            expect: tuple[str, ...] = ("unknown_table",)
        elif shape == 1 and self.foreign:  # another node's table, by id
            _other, tid = rng.choice(self.foreign)
            raw, table = tid + raw[32:], None
            expect = ("unknown_table",)
        elif shape == 2:  # a table sent that is not the one named
            table = rng.choice(list(self.held.values()) + [b"WSTB\x01" + bytes(15)])
            raw = rng.randbytes(32) + raw[32:]
            expect = ("malformed",)
        elif shape == 3:  # the right table id, table not sent, but mutated T
            raw = raw[:32] + (int.from_bytes(raw[32:36], "little") + 1).to_bytes(4, "little") + raw[36:]
            table = None
            expect = ("malformed",) if raw[:32] in self.held else ("unknown_table",)
        else:  # a table sent with a frame that names none (v1 data or a drop receipt)
            table = rng.choice(list(self.held.values())) if self.held else None
            if table is None:
                return await self.send_valid()
            if rng.random() < 0.5:
                fields2, raw2, _ = self.raw_parts()
                fields, raw = fields2, wire.encode_series(self.series())
                series = wire.decode_series(raw)
                fields.update(version=1, codec=0, raw_len=len(raw), series=len(series),
                              samples=sum(len(s.timestamps_ms) for s in series),
                              ws=min(min(s.timestamps_ms) for s in series),
                              we=max(max(s.timestamps_ms) for s in series))
            else:
                raw = self.lying_receipt(fields)
                fields["raw_len"] = len(raw)
            expect = ("malformed",)
        frame = sign_frame(self.key, fields, raw)
        result = await self.post("table_ref", (table or b"") + frame, signed=True, expect=expect)
        if result == "accepted":
            self.advance(frame)

    async def foreign_key(self) -> None:
        """This node's key signing for another node, and the other node's key for this one."""
        fields, raw, table = self.raw_parts()
        fields.update(codec=0, raw_len=len(raw), version=1)
        raw = wire.encode_series(self.series())
        series = wire.decode_series(raw)
        fields.update(raw_len=len(raw), series=len(series), samples=sum(len(s.timestamps_ms) for s in series),
                      ws=min(min(s.timestamps_ms) for s in series), we=max(max(s.timestamps_ms) for s in series))
        if self.rng.random() < 0.5:
            fields["node"] = self.other_node
            frame = sign_frame(self.key, fields, raw)
        else:
            frame = sign_frame(self.other, fields, raw)
        await self.post("foreign_key", frame, expect=("unknown_key",))

    async def chain(self) -> None:
        """Valid payloads, correctly signed, at the wrong place in the chain."""
        if self.seq < 3:
            return await self.send_valid()
        if self.rng.random() < 0.5:
            seq = self.rng.randint(1, self.seq - 1)
            frame = wire.encode_data_batch(self.ctx(seq=seq, prev=self.rng.randbytes(32)), self.series())
            expect: tuple[str, ...] = ("conflict",)
        else:
            frame = wire.encode_data_batch(self.ctx(prev=self.rng.randbytes(32)), self.series())
            expect = ("chain_mismatch",)
        self.conflicts.append(frame)
        del self.conflicts[1:-8]
        await self.post("chain", frame, expect=expect)

    async def garbage(self) -> None:
        rng = self.rng
        shape = rng.randrange(5)
        if shape == 0:
            body = b""
        elif shape == 1:
            body = rng.randbytes(rng.randint(1, 4096))
        elif shape == 2:
            body = b"WSB1" + rng.randbytes(rng.randint(0, 400))
        elif shape == 3:
            body = b"WSTB" + rng.randbytes(rng.randint(0, 400))
        else:
            head = bytearray(rng.randbytes(104))
            head[0:4] = b"WSB1"
            head[4] = rng.choice((1, 2))
            body = bytes(head) + rng.randbytes(rng.randint(0, 300))
        await self.post("garbage", body)

    async def get_json(self, kind: str, path: str, json_expected: bool = True) -> None:
        t = self.tally
        t.requests += 1
        try:
            status, _, resp = await self.http.request("GET", path)
        except NoAnswer as exc:
            t.hist[(kind, "no answer")] += 1
            t.fail("no_answer", f"{kind} GET {path[:80]}: {exc}")
            return
        t.statuses[status] += 1
        obj = answer(resp)
        word = (obj.get("result") if obj and "result" in obj else None) or f"HTTP {status}"
        t.hist[(kind, word)] += 1
        if status >= 500:
            t.fail("5xx", f"{kind} GET {path[:80]}: HTTP {status}")
        if json_expected and status != 200 and obj is None:
            t.no_reason += 1
            t.fail("no_reason", f"{kind} GET {path[:80]}: HTTP {status} {resp[:80]!r}")

    async def endpoints(self) -> None:
        rng = self.rng
        shape = rng.randrange(10)
        if shape <= 2:
            names = [self.node, SITE, "", "..", "a/b", "%00", "é", "x" * rng.randint(1, 3000),
                     rng.randbytes(rng.randint(1, 40)).decode("latin-1")]
            site = SITE if rng.random() < 0.5 else rng.choice(names)
            node = self.node if rng.random() < 0.5 else rng.choice(names)
            q = urllib.parse.quote
            # An empty name, or one with { or }, leaves the route unmatched (aiohttp's {name}
            # excludes braces): the router's plain 404, not the API's.
            await self.get_json("endpoints", f"/v1/nodes/{q(site, safe='')}/{q(node, safe='')}/chain",
                                json_expected=bool(site and node) and not set("{}") & set(site + node))
        elif shape == 3:
            await self.get_json("endpoints", rng.choice(("/v1/nodes", "/healthz")), json_expected=False)
        elif shape == 4:
            if rng.random() < 0.05:
                await self.get_json("endpoints", "/metrics", json_expected=False)
            else:
                path = rng.choice(("/v1/batches", "/nope", "/v1/import", "/v1/nodes/x", "/%ff", "/v1/batches/.."))
                await self.get_json("endpoints", path, json_expected=False)
        elif shape == 5:  # a declared body over max_body_bytes, never sent
            self.tally.requests += 1
            http = Http(self.port)
            try:
                head = (b"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                        % (16 * MiB + rng.randint(1, 1 << 30)))
                status, _, resp = await http.raw(head, 30)
                obj = answer(resp) or {}
                self.tally.statuses[status] += 1
                self.tally.hist[("endpoints", str(obj.get("result", f"HTTP {status}")))] += 1
                if obj.get("result") != "too_large":
                    self.tally.fail("unexpected", f"declared oversize body: HTTP {status} {resp[:80]!r}")
            except NoAnswer as exc:
                self.tally.hist[("endpoints", "no answer")] += 1
                self.tally.fail("no_answer", f"declared oversize body: {exc}")
            finally:
                await http.close()
        else:
            await self.import_post()

    async def import_post(self) -> None:
        """POST /v1/import: bundle items (u32 length, item), some mutated, some lying."""
        rng = self.rng
        items = [rng.choice(self.templates) for _ in range(rng.randint(1, 4))]
        items = [mutate_bytes(rng, it) if rng.random() < 0.5 else it for it in items]
        body = b"".join(len(it).to_bytes(4, "little") + it for it in items)
        if rng.random() < 0.15:
            body = mutate_bytes(rng, body)  # lying item lengths, mostly
        token = self.token if rng.random() < 0.85 else rng.choice(("", "x" * 40, self.token[:-1] + "0"))
        t = self.tally
        t.requests += 1
        try:
            status, _, resp = await self.http.request(
                "POST", "/v1/import", body, {"X-Waystation-Import-Token": token,
                                             "X-Waystation-Origin-File": "fuzz%00%ff" if rng.random() < 0.3 else "f"})
        except NoAnswer as exc:
            t.hist[("import", "no answer")] += 1
            t.fail("no_answer", f"import: {exc}", body)
            return
        t.statuses[status] += 1
        obj = answer(resp)
        if obj is None:
            t.no_reason += 1
            t.fail("no_reason", f"import: HTTP {status} {resp[:80]!r}", body)
            return
        if status >= 500:
            t.fail("5xx", f"import: HTTP {status} {obj}", body)
        if token != self.token and status != 403:
            t.fail("unexpected", f"import with a wrong token: HTTP {status}", body)
        if "results" not in obj:
            t.hist[("import", str(obj.get("result")))] += 1
            return
        results = obj["results"]
        if len(results) != len(items) and status == 200:
            # The body's items as the collector read them (a mutation may re-cut them).
            t.hist[("import", "items re-cut by a mutation")] += 1
        pos, read = 0, []
        while pos + 4 <= len(body):
            n = int.from_bytes(body[pos:pos + 4], "little")
            read.append(body[pos + 4:pos + 4 + n])
            pos += 4 + n
        for res, item in zip(results, read, strict=False):
            t.hist[("import", str(res.get("result")))] += 1
            if res.get("result") in ("accepted", "duplicate", "duplicate_pruned"):
                h = sha256(split_body(item)[1])
                if h not in self.sent.valid and h not in self.sent.mutants:
                    t.fail("wrongly_accepted", f"import: {res.get('result')} for an unknown frame", item)

    async def transport(self) -> None:
        """HTTP-level lies on a fresh connection: the server may answer 400 or close."""
        rng = self.rng
        body = rng.choice(self.templates)
        shape = rng.randrange(4)
        if shape == 0:
            head = b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
        elif shape == 1:
            head = b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n"
        elif shape == 2:
            head = b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            body = b""
        else:
            head = b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            body = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        t = self.tally
        t.requests += 1
        http = Http(self.port)
        try:
            status, _, resp = await http.raw(head + body, 30)
            t.statuses[status] += 1
            obj = answer(resp)
            t.hist[("transport", str(obj.get("result")) if obj else f"HTTP {status} (HTTP parser)")] += 1
            if status >= 500:
                t.fail("5xx", f"transport: HTTP {status}")
        except NoAnswer as exc:
            t.hist[("transport", "no answer")] += 1
            t.fail("no_answer", f"transport {shape}: {exc}")
        finally:
            await http.close()


async def slow_bodies(port: int, count: int, body_timeout: float, frames: list[bytes], tally: Tally,
                      seed: int) -> None:
    """Bounded slow senders (accepted frames again), at most 3 at once. The answer is read
    while the bytes still trickle: the collector's timeout is the expected end of the slow ones."""
    rng = random.Random(f"{seed}:slow")
    gate = asyncio.Semaphore(3)
    expected = {"slow_timeout": ("timeout", "closed without an answer"), "slow_complete": ("duplicate",),
                "slow_headers": ("duplicate", "timeout", "closed without an answer")}

    async def trickle(w: asyncio.StreamWriter, shape: str, head: bytes, frame: bytes) -> None:
        if shape == "slow_headers":  # the headers over 1.5 body_read_timeout, then the body at once
            for ch in head:
                w.write(bytes((ch,)))
                await w.drain()
                await asyncio.sleep(1.5 * body_timeout / len(head))
            w.write(frame)
        elif shape == "slow_complete":  # the whole body within a third of the timeout
            w.write(head)
            step = max(1, len(frame) // 10)
            for at in range(0, len(frame), step):
                w.write(frame[at:at + step])
                await w.drain()
                await asyncio.sleep(body_timeout / 30)
        else:  # half, then a byte every 1/20 of the timeout: never done in time
            w.write(head + frame[: len(frame) // 2])
            for ch in frame[len(frame) // 2:]:
                await w.drain()
                await asyncio.sleep(body_timeout / 20)
                w.write(bytes((ch,)))
        await w.drain()

    async def one(i: int) -> None:
        shape = ("slow_timeout", "slow_complete", "slow_abort", "slow_headers")[i % 4]
        frame = rng.choice(frames)
        head = (b"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                b"Content-Type: application/x-waystation-batch\r\n\r\n" % len(frame))
        async with gate:
            tally.requests += 1
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                tally.fail("no_answer", f"{shape}: cannot connect: {exc}")
                return
            if shape == "slow_abort":  # half the body, then the sender hangs up
                w.write(head + frame[: len(frame) // 2])
                await w.drain()
                await asyncio.sleep(0.2)
                w.close()
                tally.hist[(shape, "closed by the sender (nothing to answer)")] += 1
                return
            writer = asyncio.ensure_future(trickle(w, shape, head, frame))
            word = ""
            try:
                async with asyncio.timeout(body_timeout * 2 + 15):
                    line = await r.readline()
                    if not line:
                        word = "closed without an answer"
                    else:
                        status = int(line.split()[1])
                        tally.statuses[status] += 1
                        n = 0
                        while (h := await r.readline()) not in (b"\r\n", b""):
                            if h.lower().startswith(b"content-length:"):
                                n = int(h.split(b":")[1])
                        obj = answer(await r.readexactly(n)) or {}
                        word = str(obj.get("result", f"HTTP {status}"))
                        if status >= 500:
                            tally.fail("5xx", f"{shape}: HTTP {status}")
            except TimeoutError:
                word = "no answer within twice body_read_timeout"
            except (OSError, asyncio.IncompleteReadError) as exc:
                word = f"connection ended: {type(exc).__name__}"
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                w.close()
            tally.hist[(shape, word)] += 1
            if word not in expected[shape]:
                tally.fail("slow", f"{shape}: {word}, expected {'/'.join(expected[shape])}")

    await asyncio.gather(*(one(i) for i in range(count)))


@dataclass
class SenderJob:
    index: int
    port: int
    seed: int
    lanes: list[int]
    nodes: int
    requests: int
    deadline: float  # time.time()
    token: str
    foreign: list[tuple[str, bytes]]
    slow: int
    body_timeout: float
    http_lies: bool
    out: Path
    artifacts: Path


def sender_main(job: SenderJob, progress: Any) -> None:
    """One sender process: its lanes round-robin over one event loop, one connection each."""
    tally = Tally(artifacts=job.artifacts)
    sent = Sent()
    bombs = Bombs()
    lanes = [Lane(job.port, job.seed, i, job.nodes, job.token, sent, tally, bombs, job.foreign) for i in job.lanes]
    kinds = [k for k in KINDS if job.http_lies or k != "transport"]
    weights = [KINDS[k] for k in kinds]

    async def run_lane(lane: Lane, budget: int) -> None:
        await lane.send_first()
        for i in range(budget - 1):
            if time.time() > job.deadline:
                break
            kind = lane.rng.choices(kinds, weights)[0]
            try:
                await lane.step(kind)
            except Exception as exc:  # the fuzzer's own bug: counted, never hidden
                tally.fail("fuzzer_error", f"{kind}: {type(exc).__name__}: {exc}")
            if i % 50 == 0:
                with progress.get_lock():
                    progress.value += 50
        await lane.http.close()

    async def main() -> None:
        per_lane = max(2, job.requests // len(lanes))
        tasks = [run_lane(lane, per_lane) for lane in lanes]
        if job.slow:
            async def slow_later() -> None:
                while not all(lane.templates for lane in lanes):
                    await asyncio.sleep(0.2)
                frames = [split_body(b)[1] for lane in lanes for b in lane.templates]
                await slow_bodies(job.port, job.slow, job.body_timeout, frames, tally, job.seed)

            tasks.append(slow_later())
        await asyncio.gather(*tasks)

    asyncio.run(main())
    with open(job.out, "wb") as fh:
        pickle.dump({"tally": tally, "sent": sent,
                     "heads": {lane.node: (lane.seq, lane.prev) for lane in lanes}}, fh)


# ---------------------------------------------------------------------------------------
# The run: collector, enrolment, senders, RSS, final checks.
# ---------------------------------------------------------------------------------------


def first_table_id(seed: int, index: int) -> bytes:
    """The table a lane's first v2 batch sends (lanes build it the same way, from the seed)."""
    lane = Lane(0, seed, index, 1, "", Sent(), Tally(), None, [])  # type: ignore[arg-type]
    table, _ = lane.builder.place(lane.series())
    return table.id


def rss_sampler(pid: int, progress: Any, stop: threading.Event, samples: list[tuple[float, int, int]]) -> None:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    while not stop.wait(0.5):
        try:
            samples.append((time.monotonic() - t0, progress.value, proc.memory_info().rss))
        except psutil.Error:
            return


def run_suite(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs everything; returns the figures and {check: passed} under 'checks'."""
    if not args.warmup:
        args.warmup = max(2000, args.requests // 20)
    work = Path(tempfile.mkdtemp(prefix="ws-hostile-"))
    data = work / "collector"
    data.mkdir()
    nodes = args.senders * args.lanes
    say(f"work dir {work}; enrolling {nodes} nodes ...")
    fleet = work / "fleet.txt"
    keys = (agent_keys.public_key_text(bytes(node_key(args.seed, i).verify_key)) for i in range(nodes))
    fleet.write_text("".join(f"{SITE} {node_name(i)} {key}\n" for i, key in enumerate(keys)))
    subprocess.run([sys.executable, "-m", "collector", "enroll", "--data-dir", str(data), "--from", str(fleet)],
                   env=ENV, check=True, capture_output=True)
    config = work / "collector.toml"
    config.write_text(f'[limits]\nbody_read_timeout = "{args.body_read_timeout:g}s"\n')
    port = free_port()
    log_path = work / "collector.log"
    report: dict[str, Any] = {"work": str(work)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "collector", "serve", "--data-dir", str(data), "--listen",
                                 f"127.0.0.1:{port}", "--config", str(config)], env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        token = json.loads((data / "serve.json").read_text())["token"]
        foreign = [(node_name(i), first_table_id(args.seed, i)) for i in range(nodes)]
        ctx = multiprocessing.get_context("fork")
        progress = ctx.Value("q", 0)
        deadline = time.time() + args.minutes_cap * 60
        per_sender = args.requests // args.senders
        jobs = [SenderJob(s, port, args.seed, list(range(s * args.lanes, (s + 1) * args.lanes)), nodes,
                          per_sender, deadline, token,
                          [f for f in foreign if f[0] not in {node_name(i) for i in range(s * args.lanes,
                                                                                        (s + 1) * args.lanes)}],
                          args.slow if s == 0 else 0, args.body_read_timeout, not args.no_http_lies,
                          work / f"sender-{s}.pickle",
                          work / "artifacts") for s in range(args.senders)]
        samples: list[tuple[float, int, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=rss_sampler, args=(proc.pid, progress, stop, samples), daemon=True)
        sampler.start()
        say(f"{args.requests} requests from {args.senders} senders x {args.lanes} lanes "
            f"(seed {args.seed}, cap {args.minutes_cap:g} min) ...")
        t0 = time.monotonic()
        procs = [ctx.Process(target=sender_main, args=(job, progress), name=f"sender-{job.index}") for job in jobs]
        for p in procs:
            p.start()
        last = t0
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            if time.monotonic() - last >= args.progress_every:
                last = time.monotonic()
                rss = samples[-1][2] / MiB if samples else 0.0
                say(f"  {progress.value:>9} requests, {progress.value / (last - t0):7.0f}/s, "
                    f"collector RSS {rss:.1f} MiB")
            if time.time() > deadline + 120:
                for p in procs:
                    if p.is_alive():
                        p.kill()
        wall = time.monotonic() - t0
        for p in procs:
            p.join()
        stop.set()
        sampler.join()

        tally, sent = Tally(), Sent()
        heads: dict[str, tuple[int, bytes]] = {}
        for job in jobs:
            if not job.out.exists():
                tally.fail("sender_died", f"sender {job.index} left no results")
                continue
            part = pickle.loads(job.out.read_bytes())
            t: Tally = part["tally"]
            tally.hist += t.hist
            tally.statuses += t.statuses
            tally.failures += t.failures
            tally.failure_count += t.failure_count
            tally.requests += t.requests
            tally.no_reason += t.no_reason
            tally.oracle_disagree += t.oracle_disagree
            tally.oracle_examples += t.oracle_examples
            tally.mutants_accepted += t.mutants_accepted
            sent.valid |= part["sent"].valid
            sent.mutants |= part["sent"].mutants
            sent.tables |= part["sent"].tables
            heads.update(part["heads"])

        final = final_batches(port, args.seed, sent)
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    ledger_problems, ledger_batches = check_ledger(data / "ledger.db", sent, {node_name(i) for i in range(nodes)})
    log_text = log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback")
    # aiohttp logs each request its parser refuses with a traceback unless the collector
    # quiets it (collector.app.MalformedHttpLog): counted apart, so a regression is named.
    parser_tracebacks = len(re.findall(r"Traceback[^\n]*\n(?:  .*\n)*aiohttp\.http_exceptions\.", log_text))
    after = [s for s in samples if s[1] >= args.warmup]
    base = after[0][2] if after else 0
    rss_end = after[-1][2] if after else 0
    growth = (rss_end - base) / MiB
    five = sum(n for s, n in tally.statuses.items() if s >= 500)
    checks = {
        "nothing wrongly accepted (oracle, per answer)": not (tally.failure_count["wrongly_accepted"]
                                                              or tally.failure_count["passed_verification"]
                                                              or tally.failure_count["ack_seq"]),
        "ledger holds only batches and tables the oracle accepts": not ledger_problems,
        "no 5xx": five == 0,
        "no connection closed without an answer (slow bodies aside)": tally.failure_count["no_answer"] == 0,
        "every refusal carries a JSON reason": tally.no_reason == 0,
        "answers as expected where the kind fixes one": tally.failure_count["unexpected"] == 0,
        "slow bodies end as expected": tally.failure_count["slow"] == 0,
        "collector RSS grew < 50 MB after warm-up": bool(after) and growth < 50,
        "a valid batch accepted at the end": final,
        "collector alive at the end": alive,
        "collector log free of tracebacks": tracebacks == 0,
        "fuzzer ran without errors of its own": not (tally.failure_count["fuzzer_error"]
                                                     or tally.failure_count["sender_died"]),
    }
    report.update(requests=tally.requests, wall_s=wall, rate=tally.requests / wall, checks=checks,
                  hist=tally.hist, statuses=tally.statuses, failures=tally.failures,
                  failure_count=tally.failure_count, ledger_problems=ledger_problems[:20],
                  ledger_batches=ledger_batches, mutants_accepted=tally.mutants_accepted,
                  oracle_disagree=tally.oracle_disagree, oracle_examples=tally.oracle_examples,
                  rss=[s[2] for s in after], rss_growth_mib=growth, tracebacks=tracebacks,
                  parser_tracebacks=parser_tracebacks,
                  valid_built=len(sent.valid))
    print_report(report, say)
    if all(checks.values()) and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"artifacts kept in {work} (collector.log, collector/ledger.db, artifacts/)")
    return report


def final_batches(port: int, seed: int, sent: Sent) -> bool:
    """A fresh valid v1 and v2 batch for node 0, at the chain head the collector reports."""
    import urllib.request

    key = node_key(seed, 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/nodes/{SITE}/{node_name(0)}/chain", timeout=10) as r:
        head = json.loads(r.read())
    seq, prev = int(head["next_seq"]), bytes.fromhex(head["head_hash"])
    now = int(time.time() * 1000)
    series = [wire.Series("node_fuzz_final", (("check", "end"),), wire.MetricType.GAUGE, (now,), (1.0,))]
    ok = True
    for version in (1, 2):
        ctx = wire.BatchContext(key, SITE, node_name(0), seq, prev, now, time.monotonic_ns(), 3)
        if version == 1:
            body = frame = wire.encode_data_batch(ctx, series)
        else:
            table, placed = wire.TableBuilder(3).place(series)
            frame = wire.sign_batch(wire.prepare_columns(table, placed, 3, now), ctx)
            body = table.blob + frame
            sent.tables.add((node_name(0), table.id))
        sent.valid.add(sha256(frame))
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/batches", data=body, method="POST",
                                     headers={"Content-Type": "application/x-waystation-batch"})
        with urllib.request.urlopen(req, timeout=30) as r:
            ok = ok and json.loads(r.read()).get("result") == "accepted"
        seq, prev = seq + 1, sha256(frame)
    return ok


def check_ledger(path: Path, sent: Sent, nodes: set[str]) -> tuple[list[str], int]:
    """Every batch and series table the ledger holds, against the oracle's sets."""
    problems = []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        n = 0
        for site, node, seq, digest, frame in db.execute("SELECT site, node, seq, hash, frame FROM batches"):
            n += 1
            frame = bytes(frame)
            if sha256(frame) != bytes(digest):
                problems.append(f"{site}/{node} seq {seq}: stored hash is not the frame's")
            if sha256(frame) not in sent.valid and sha256(frame) not in sent.mutants:
                problems.append(f"{site}/{node} seq {seq}: a frame the oracle never found valid")
            if site != SITE or node not in nodes:
                problems.append(f"{site!r}/{node!r} seq {seq}: not an enrolled node")
        for node, tid, blob in db.execute("SELECT node, table_id, blob FROM series_tables"):
            if sha256(bytes(blob)) != bytes(tid) or (node, bytes(tid)) not in sent.tables:
                problems.append(f"series table {bytes(tid).hex()[:16]} of {node}: not one this node sent validly")
    finally:
        db.close()
    return problems, n


def print_report(r: dict[str, Any], say: Callable[[str], None]) -> None:
    hist: Counter[tuple[str, str]] = r["hist"]
    say("\nanswers by fuzz kind (result word, or HTTP status where the route has none):")
    for kind in sorted({k for k, _ in hist}):
        row = sorted(((n, res) for (k, res), n in hist.items() if k == kind), reverse=True)
        total = sum(n for n, _ in row)
        say(f"  {kind:<14}{total:>9}  " + ", ".join(f"{res} {n}" for n, res in row))
    say("HTTP statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(r["statuses"].items())))
    say(f"\n{r['requests']} requests in {r['wall_s']:.1f} s: {r['rate']:.0f} requests/s; "
        f"1,000,000 would take {1e6 / max(r['rate'], 1e-9) / 60:.1f} min at this rate")
    rss = r["rss"]
    if rss:
        say(f"collector RSS after warm-up: start {rss[0] / MiB:.1f} MiB, min {min(rss) / MiB:.1f}, "
            f"max {max(rss) / MiB:.1f}, end {rss[-1] / MiB:.1f} (growth {r['rss_growth_mib']:+.1f} MiB, "
            f"{len(rss)} samples)")
    say(f"valid frames built {r['valid_built']}; correctly signed garbage the oracle found valid and the "
        f"collector accepted: {r['mutants_accepted']}; ledger batches {r['ledger_batches']}")
    say(f"refused signed garbage the oracle found valid (sampled, informational): {r['oracle_disagree']}")
    for ex in r["oracle_examples"]:
        say(f"    {ex}")
    say(f"collector log tracebacks: {r['tracebacks']}, of which aiohttp's HTTP parser "
        f"(BadHttpMessage, one per malformed HTTP request of the transport kind): {r['parser_tracebacks']}")
    if r["failures"]:
        say("failures (first 40): " + ", ".join(f"{k} {n}" for k, n in r["failure_count"].items()))
        for f in r["failures"]:
            say(f"    {f}")
    for p in r["ledger_problems"]:
        say(f"    ledger: {p}")
    say("\nchecks:")
    for name, ok in r["checks"].items():
        say(f"  {'PASS' if ok else 'FAIL'}  {name}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000, help="fuzz requests in all")
    ap.add_argument("--seed", type=int, default=1, help="seeds every lane's generator and every node key")
    ap.add_argument("--senders", type=int, default=2, help="sender processes")
    ap.add_argument("--lanes", type=int, default=4, help="lanes per sender: one node and one connection each")
    ap.add_argument("--minutes-cap", type=float, default=25.0, help="stop sending after this long, whatever is left")
    ap.add_argument("--slow", type=int, default=12, help="slow-body connections in all (sender 0, 3 at once)")
    ap.add_argument("--body-read-timeout", type=float, default=30.0,
                    help="the collector's limits.body_read_timeout, seconds (the slow bodies' deadline)")
    ap.add_argument("--warmup", type=int, default=0, help="requests before the RSS baseline (default: 5%%, >= 2000)")
    ap.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    ap.add_argument("--no-http-lies", action="store_true",
                    help="leave out the transport kind (HTTP-level lies, refused by aiohttp's parser)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir even when every check passes")
    return ap


def main() -> int:
    args = parser().parse_args()
    report = run_suite(args)
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
