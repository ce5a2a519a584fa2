"""Spool states, chain allocation, quota eviction with drop receipts, crash safety."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from nacl.signing import SigningKey

import wire
from agent.spool import Spool

REPO = Path(__file__).resolve().parents[2]


def _series(i: int, points: int = 5) -> list[wire.Series]:
    ts = tuple(1_700_000_000_000 + i * 10_000 + j * 1000 for j in range(points))
    return [
        wire.Series("node_load1", (("cpu", str(k)),), wire.MetricType.GAUGE, ts,
                    tuple(float(i + j + k) for j in range(points)))
        for k in range(3)
    ]


def _chain_ok(frames: list[bytes], pub: bytes) -> None:
    prev = wire.ZERO_HASH
    for n, raw in enumerate(frames, start=1):
        f = wire.parse_frame(raw)
        wire.verify_signature(f, pub)
        assert f.header.seq == n
        assert f.header.prev_hash == prev
        prev = wire.batch_hash(raw)


def test_seq_and_chain_continue_across_reopen(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "spool.db"
    sp = Spool(path)
    assert [sp.append_data(key, "s", "n", _series(i), 10**9) for i in range(3)] == [1, 2, 3]
    sp.close()
    sp = Spool(path)
    assert sp.append_data(key, "s", "n", _series(3), 10**9) == 4
    frames = [r[0] for r in sp.db.execute("SELECT frame FROM batches ORDER BY seq")]
    _chain_ok(frames, bytes(key.verify_key))
    assert sp.stats().counters["produced_samples"] == 4 * 15


def test_claims_acks_and_recovery(tmp_path: Path) -> None:
    key = SigningKey.generate()
    sp = Spool(tmp_path / "spool.db")
    for i in range(4):
        sp.append_data(key, "s", "n", _series(i), 10**9)
    newest = sp.claim_newest_after(0)
    assert newest is not None and newest.seq == 4
    assert sp.claim_newest_after(4) is None  # nothing newer than what the live lane has
    oldest = sp.claim_oldest()
    assert oldest is not None and oldest.seq == 1
    second = sp.claim_oldest()
    assert second is not None and second.seq == 2  # claimed rows are never handed out twice
    sp.ack(4, complete_through=None)
    sp.release(2, "collector unreachable")
    st = sp.stats()
    assert st.pending_batches == 3 and st.inflight_batches == 1
    assert st.last_error == "collector unreachable"
    # A process killed with seq 1 claimed: the next open must hand it out again.
    sp.close()
    sp = Spool(tmp_path / "spool.db")
    assert sp.recover_claims() == 1
    again = sp.claim_oldest()
    assert again is not None and again.seq == 1
    sp.reject(1, "HTTP 409 conflict")
    st = sp.stats()
    assert st.rejected_batches == 1 and st.pending_batches == 2
    assert sp.claim_oldest() is not None and sp.claim_oldest() is not None
    assert sp.claim_oldest() is None


def test_quota_evicts_oldest_and_appends_signed_receipt(tmp_path: Path) -> None:
    key = SigningKey.generate()
    sp = Spool(tmp_path / "spool.db")
    sizes = []
    for i in range(10):
        sp.append_data(key, "s", "n", _series(i, points=50), 10**9)
    sizes = [r[0] for r in sp.db.execute("SELECT bytes FROM batches ORDER BY seq")]
    samples = [r[0] for r in sp.db.execute("SELECT samples FROM batches ORDER BY seq")]
    sp.ack(2, None)  # delivered already: not part of what gets dropped
    quota = sum(sizes[5:]) + 1  # room for batches 6..10 only, then batch 11 arrives
    sp.append_data(key, "s", "n", _series(10, points=50), quota)
    rows = sp.db.execute("SELECT seq, kind, frame FROM batches ORDER BY seq").fetchall()
    receipt_rows = [r for r in rows if r[1] == wire.Kind.DROP_RECEIPT]
    assert len(receipt_rows) == 1
    f = wire.parse_frame(receipt_rows[0][2])
    wire.verify_signature(f, bytes(key.verify_key))
    assert f.header.seq == 12
    receipt = wire.decode_drop_receipt(wire.decompress_payload(f, 1 << 20))
    evicted = [s for a, b in receipt.ranges for s in range(a, b + 1)]
    kept = {r[0] for r in rows}
    assert 2 not in evicted and evicted and evicted[0] == 1
    assert not set(evicted) & kept
    assert receipt.samples == sum(samples[s - 1] for s in evicted)
    assert receipt.bytes == sum(sizes[s - 1] for s in evicted)
    st = sp.stats()
    assert st.counters["dropped_samples"] == receipt.samples
    data_bytes = sum(len(r[2]) for r in rows if r[1] == wire.Kind.DATA)
    assert data_bytes <= quota
    assert 11 in kept  # the newest batch always stays


_WRITER = """
import sys, time
from nacl.signing import SigningKey
import wire
from agent.spool import Spool
key = SigningKey(bytes(32))
sp = Spool(__import__('pathlib').Path(sys.argv[1]))
i = 0
while True:
    ts = tuple(1_700_000_000_000 + i * 1000 + j for j in range(20))
    s = [wire.Series('m', (('k', str(k)),), wire.MetricType.GAUGE, ts, tuple(float(j * k) for j in range(20)))
         for k in range(50)]
    sp.append_data(key, 's', 'n', s, 200_000)
    if i % 3 == 0:
        c = sp.claim_oldest()
        if c is not None:
            sp.ack(c.seq, None)
    i += 1
    print(i, flush=True)
"""


def test_kill9_mid_write_never_reuses_or_skips_seq(tmp_path: Path) -> None:
    """SIGKILL the writer at random moments: the chain stays intact and seqs continue."""
    key = SigningKey(bytes(32))
    path = tmp_path / "spool.db"
    rng = random.Random(7)
    seen: dict[int, bytes] = {}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()  # started writing
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sp = Spool(path)
        rows = sp.db.execute("SELECT seq, frame FROM batches ORDER BY seq").fetchall()
        next_seq = sp.stats().next_seq
        sp.close()
        for seq, frame in rows:
            # A seq once stored never changes content: it was never reused.
            assert seen.setdefault(seq, frame) == frame
            f = wire.parse_frame(frame)
            wire.verify_signature(f, bytes(key.verify_key))
        assert rows and rows[-1][0] == next_seq - 1
    # Every surviving batch links to its stored predecessor.
    by_seq = dict(seen)
    for seq, frame in by_seq.items():
        prev = by_seq.get(seq - 1)
        if prev is not None:
            assert wire.parse_frame(frame).header.prev_hash == wire.batch_hash(prev)


def test_new_spool_resumes_above_what_the_collector_holds(tmp_path: Path) -> None:
    """A reinstalled node renumbers its unsent batches after the collector's last seq."""
    key = SigningKey.generate()
    sp = Spool(tmp_path / "spool.db")
    assert sp.resume_needed()
    for i in range(3):
        sp.append_data(key, "s", "n", _series(i, points=40), 10**9)
    sizes = sum(r[0] for r in sp.db.execute("SELECT bytes FROM batches"))
    sp.append_data(key, "s", "n", _series(3, points=40), sizes - 10)  # evicts batch 1: a receipt
    (before,) = [wire.decode_drop_receipt(wire.parse_frame(r[0]).payload).ranges
                 for r in sp.db.execute("SELECT frame FROM batches WHERE kind = 1")]
    old_seqs = [r[0] for r in sp.db.execute("SELECT seq FROM batches ORDER BY seq")]
    assert old_seqs[0] > 1  # the oldest were evicted: their seqs are gaps the receipt names
    collector_head = b"\x07" * 32
    moved = sp.resume(key, "s", "n", 101, collector_head)
    rows = sp.db.execute("SELECT seq, kind, frame FROM batches ORDER BY seq").fetchall()
    assert moved == len(rows) and [r[0] for r in rows] == [s + 100 for s in old_seqs]
    prev = collector_head
    for seq, kind, frame in rows:
        f = wire.parse_frame(frame)
        wire.verify_signature(f, bytes(key.verify_key))
        assert (f.header.seq, f.header.prev_hash) == (seq, prev)
        prev = wire.batch_hash(frame)
        if kind == wire.Kind.DROP_RECEIPT:
            assert wire.decode_drop_receipt(f.payload).ranges == tuple((a + 100, b + 100) for a, b in before)
    covered = {s for a, b in before for s in range(a + 100, b + 101)}
    assert covered and min(covered) == 101 and not covered & {r[0] for r in rows}
    assert not sp.resume_needed()
    assert sp.resume(key, "s", "n", 500, b"\x01" * 32) == 0  # once only
    assert sp.append_data(key, "s", "n", _series(9), 10**9) == rows[-1][0] + 1
    sp.close()
    assert not Spool(tmp_path / "spool.db").resume_needed()


def test_rejected_data_batch_is_named_in_a_receipt_and_kept_for_audit(tmp_path: Path) -> None:
    key = SigningKey.generate()
    sp = Spool(tmp_path / "spool.db")
    for i in range(3):
        sp.append_data(key, "s", "n", _series(i), 10**9)
    claimed = sp.claim_oldest()
    assert claimed is not None and claimed.seq == 1
    sp.reject(1, "HTTP 400 schema", (key, "s", "n"))
    sp.reject(2, "HTTP 409 conflict")  # the collector holds another batch 2: no receipt
    rows = sp.db.execute("SELECT seq, kind, state FROM batches ORDER BY seq").fetchall()
    assert rows[:3] == [(1, 0, "rejected"), (2, 0, "rejected"), (3, 0, "pending")]
    assert [r[1] for r in rows[3:]] == [wire.Kind.DROP_RECEIPT]
    receipt = wire.decode_drop_receipt(
        wire.parse_frame(sp.db.execute("SELECT frame FROM batches WHERE seq = 4").fetchone()[0]).payload
    )
    assert receipt.ranges == ((1, 1),) and receipt.reason == "rejected" and receipt.samples == 15
    st = sp.stats()
    assert st.rejected_batches == 2 and st.counters["dropped_samples"] == 15
    assert sp.claim_oldest() is not None and sp.claim_oldest() is not None  # 3 and the receipt
    assert sp.claim_oldest() is None  # rejected batches are never sent again
    # Rejected rows take no quota: a quota that only fits the newest evicts nothing rejected.
    sp.append_data(key, "s", "n", _series(9), 1)
    assert {r[0] for r in sp.db.execute("SELECT seq FROM batches WHERE state = 'rejected'")} == {1, 2}
