"""`import-receipt` on the spool: receipts in any order, exact replays refused, short
transactions beside a running agent; a new spool placed by a receipt's chain head;
`export` at the manifest's frame limit."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import wire
import wire.bundle
from agent import cli, keys
from agent import spool as spool_mod
from agent.config import load_agent_config
from agent.spool import ReceiptReplayed, Spool

CK = b"\xc0" * 8  # a collector key id


def _series(i: int) -> list[wire.Series]:
    ts = tuple(1_700_000_000_000 + i * 10_000 + j * 1000 for j in range(3))
    return [wire.Series("node_load1", (), wire.MetricType.GAUGE, ts, (1.0, 2.0, float(i)))]


def _spool(tmp_path: Path, n: int) -> tuple[Spool, dict[int, bytes]]:
    key = SigningKey.generate()
    sp = Spool(tmp_path / "spool.db")
    for i in range(n):
        sp.append_data(key, "s", "n", _series(i), 10**9)
    hashes = {int(seq): wire.batch_hash(bytes(frame))
              for seq, frame in sp.db.execute("SELECT seq, frame FROM batches")}
    return sp, hashes


def _seqs(sp: Spool) -> list[int]:
    return [r[0] for r in sp.db.execute("SELECT seq FROM batches ORDER BY seq")]


def test_receipts_apply_in_any_order_and_only_exact_replays_are_refused(tmp_path: Path) -> None:
    sp, h = _spool(tmp_path, 4)
    assert sp.apply_receipt(CK, 6, [(3, h[3]), (4, h[4])], 4)[0] == 2
    # Receipt 5 came back later than 6: it is not a replay, and it applies.
    assert sp.apply_receipt(CK, 5, [(1, h[1]), (2, h[2])], 2)[0] == 2
    assert _seqs(sp) == []
    assert sp.stats().collector_complete_through == 4  # never moves back
    for no in (5, 6):
        with pytest.raises(ReceiptReplayed, match=f"receipt {no} .*already applied here"):
            sp.apply_receipt(CK, no, [], 0)
    assert sp.apply_receipt(b"\xc1" * 8, 5, [], 0) == (0, 0)  # numbers are per collector key
    assert sp.last_receipt(CK) == 6


def test_applied_receipts_are_remembered_within_a_bound(tmp_path: Path) -> None:
    sp, _ = _spool(tmp_path, 1)
    keep = spool_mod.RECEIPTS_REMEMBERED
    for no in range(10, 10 + keep + 5):
        sp.apply_receipt(CK, no, [], 0)
    (count,) = sp.db.execute("SELECT COUNT(*) FROM applied_receipts").fetchone()
    assert count == keep
    with pytest.raises(ReceiptReplayed, match="older than the"):
        sp.apply_receipt(CK, 3, [], 0)  # below every number remembered: may have been applied
    sp.apply_receipt(CK, 10 + keep + 100, [], 0)  # newer ones always apply


def test_legacy_single_receipt_number_still_refuses_its_replay(tmp_path: Path) -> None:
    sp, h = _spool(tmp_path, 2)
    with sp.db:
        sp.db.execute("INSERT INTO meta VALUES (?, ?)", (f"receipt_no:{CK.hex()}", 7))
    with pytest.raises(ReceiptReplayed, match="already applied"):
        sp.apply_receipt(CK, 7, [(1, h[1])], 1)
    assert _seqs(sp) == [1, 2]
    assert sp.apply_receipt(CK, 6, [(1, h[1])], 1)[0] == 1
    with pytest.raises(ReceiptReplayed):
        sp.apply_receipt(CK, 7, [], 0)  # folded into the table


def test_apply_leaves_the_spool_writable_between_chunks(tmp_path: Path) -> None:
    """A running agent's writes wait at most one chunk, not the whole receipt."""
    sp, h = _spool(tmp_path, 2)
    other = sqlite3.connect(str(tmp_path / "spool.db"), timeout=0.2, isolation_level=None)
    chunk = getattr(spool_mod, "RECEIPT_CHUNK", 1000)
    wrote: list[int] = []

    def names() -> Iterator[tuple[int, bytes]]:
        yield 1, h[1]
        for i in range(2 * chunk + 10):
            if i == chunk + 5:  # the apply is under way: the agent appends meanwhile
                other.execute("INSERT OR REPLACE INTO meta VALUES ('agent_was_here', 1)")
                wrote.append(i)
            yield 10_000 + i, b"\x00" * 32
        yield 2, h[2]

    assert sp.apply_receipt(CK, 1, names(), 2)[0] == 2
    assert wrote and _seqs(sp) == []
    other.close()


def test_cut_short_apply_is_not_recorded_and_applies_again(tmp_path: Path) -> None:
    sp, h = _spool(tmp_path, 3)
    assert sp.resume_needed()  # a new spool
    chunk = getattr(spool_mod, "RECEIPT_CHUNK", 1000)

    def names() -> Iterator[tuple[int, bytes]]:
        yield 1, h[1]
        for i in range(chunk):
            yield 10_000 + i, b"\x00" * 32
        raise OSError("stick pulled")

    with pytest.raises(OSError):
        sp.apply_receipt(CK, 4, names(), 3)
    assert _seqs(sp) == [2, 3]  # the first chunk committed: it named only held batches
    assert not sp.resume_needed()  # it matched one of the spool's own batches
    assert sp.last_receipt(CK) == 0  # not recorded as applied
    assert sp.stats().collector_complete_through is None
    assert sp.apply_receipt(CK, 4, [(s, h[s]) for s in (1, 2, 3)], 3)[0] == 2  # finishes it
    assert _seqs(sp) == [] and sp.last_receipt(CK) == 4
    assert sp.stats().counters["acked_batches"] == 3


def test_resume_flag_stays_when_nothing_matches_by_hash(tmp_path: Path) -> None:
    sp, h = _spool(tmp_path, 2)
    assert sp.resume_needed()
    assert sp.apply_receipt(CK, 1, [(1, b"\x01" * 32), (2, b"\x02" * 32)], 2) == (0, 0)
    assert sp.resume_needed() and _seqs(sp) == [1, 2]


def _frames(sp: Spool) -> dict[int, wire.Frame]:
    return {int(seq): wire.parse_frame(bytes(f)) for seq, f in sp.db.execute("SELECT seq, frame FROM batches")}


HEAD = b"\xab" * 32  # the hash of a batch the collector holds and this spool never made


def test_a_new_spool_renumbers_above_the_chain_head_a_receipt_states(tmp_path: Path) -> None:
    """A reinstalled node's spool, numbered from 1, follows the collector's seq 7 after it."""
    key = SigningKey.generate()
    sp, _ = _spool(tmp_path, 3)
    done = sp.resume_from_receipt(key, "s", "n", (7, HEAD), [])
    assert (done.outcome, done.moved) == (spool_mod.RENUMBERED, 3)
    frames = _frames(sp)
    assert sorted(frames) == [8, 9, 10] and not sp.resume_needed()
    assert frames[8].header.prev_hash == HEAD  # the chain continues the collector's
    for seq in (9, 10):
        assert frames[seq].header.prev_hash == wire.batch_hash(frames[seq - 1].raw)
        wire.verify_signature(frames[seq], bytes(key.verify_key))
    assert sp.append_data(key, "s", "n", _series(9), 10**9) == 11
    # The receipt's own batch list names the collector's batch at 7: nothing here matches it.
    assert sp.apply_receipt(CK, 1, [(7, HEAD)], 7) == (0, 0)
    assert sorted(_frames(sp)) == [8, 9, 10, 11]
    again = sp.resume_from_receipt(key, "s", "n", (20, HEAD), [])  # placed once, never again
    assert again.outcome == spool_mod.NOT_NEEDED and sorted(_frames(sp)) == [8, 9, 10, 11]


def _evicted_spool(tmp_path: Path, key: SigningKey) -> tuple[Spool, bytes]:
    """Seqs 1-5 signed, then evicted over quota: 6 kept, a drop receipt at 7. Returns the
    spool and seq 5's hash (gone with its row, still named by seq 6's prev_hash)."""
    sp = Spool(tmp_path / "spool.db")
    for i in range(5):
        sp.append_data(key, "s", "n", _series(i), 10**9)
    fifth = wire.batch_hash(_frames(sp)[5].raw)
    sp.append_data(key, "s", "n", _series(5), 1)
    assert sorted(_frames(sp)) == [6, 7]
    return sp, fifth


def test_a_brand_new_nodes_first_receipt_renumbers_nothing(tmp_path: Path) -> None:
    """The collector's head is this spool's own batch: renumbering would record it twice."""
    key = SigningKey.generate()
    for case in ("named in the batch list", "its row here", "the next row's prev_hash", "the newest seq"):
        d = tmp_path / case.replace(" ", "-").replace("'", "")
        d.mkdir()
        if case == "the next row's prev_hash":
            sp, fifth = _evicted_spool(d, key)
            head, batches = (5, fifth), []
        else:
            sp, h = _spool(d, 4)
            head, batches = {
                # A bundle's receipt: the collector holds batches of this spool, whatever its head says.
                "named in the batch list": ((3, HEAD), [(1, h[1]), (2, h[2])]),
                "its row here": ((2, h[2]), []),  # `waystation-collector receipt`: no list
                "the newest seq": ((4, h[4]), []),
            }[case]
        before = {s: f.raw for s, f in _frames(sp).items()}
        done = sp.resume_from_receipt(key, "s", "n", head, batches)
        assert done.outcome == spool_mod.OWN_CHAIN, case
        assert {s: f.raw for s, f in _frames(sp).items()} == before and not sp.resume_needed(), case
        sp.close()


def test_a_receipt_that_holds_nothing_keeps_the_numbering_and_places_the_spool(tmp_path: Path) -> None:
    sp, h = _spool(tmp_path, 2)
    done = sp.resume_from_receipt(SigningKey.generate(), "s", "n", (0, wire.ZERO_HASH), [])
    assert done.outcome == spool_mod.NOTHING_HELD
    assert not sp.resume_needed() and {s: wire.batch_hash(f.raw) for s, f in _frames(sp).items()} == h


def test_a_head_the_spool_can_no_longer_judge_is_followed_when_everything_kept_is_above_it(
        tmp_path: Path) -> None:
    """Evicted around the head: neither its row nor the next one is left to compare. With
    every kept row above head+1 a bundle could never be placed (unplaced_gap), so the spool
    follows the head, as over HTTP; with a kept row at or below it, nothing moves."""
    key = SigningKey.generate()
    (tmp_path / "above").mkdir()
    sp, _ = _evicted_spool(tmp_path / "above", key)
    done = sp.resume_from_receipt(key, "s", "n", (3, HEAD), [])
    assert (done.outcome, done.moved) == (spool_mod.RENUMBERED, 2) and not sp.resume_needed()
    frames = _frames(sp)
    assert sorted(frames) == [9, 10] and wire.decode_drop_receipt(frames[10].payload).ranges == ((4, 8),)
    sp.close()

    sp, h = _spool(tmp_path, 6)
    sp.db.execute("DELETE FROM batches WHERE seq IN (3, 4)")  # gone around seq 3: rows 1-2 and 5-6 kept
    hashes = {s: wire.batch_hash(f.raw) for s, f in _frames(sp).items()}
    done = sp.resume_from_receipt(key, "s", "n", (3, HEAD), [])
    assert done.outcome == spool_mod.UNDECIDED
    assert sp.resume_needed() and {s: wire.batch_hash(f.raw) for s, f in _frames(sp).items()} == hashes
    sp.close()


def test_a_head_named_by_the_next_rows_prev_hash_is_judged_by_it(tmp_path: Path) -> None:
    key = SigningKey.generate()
    sp, _ = _evicted_spool(tmp_path, key)
    # Seq 6 names seq 5's hash: a head at 5 with another hash is not this spool's.
    done = sp.resume_from_receipt(key, "s", "n", (5, HEAD), [])
    assert (done.outcome, done.moved) == (spool_mod.RENUMBERED, 2)
    frames = _frames(sp)
    assert sorted(frames) == [11, 12] and frames[11].header.prev_hash == HEAD
    receipt = wire.decode_drop_receipt(frames[12].payload)
    assert receipt.ranges == ((6, 10),)  # the evicted seqs move with the chain


def test_export_stops_at_the_manifest_frame_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """More unacknowledged batches than one manifest lists: export the oldest that fit and
    count the rest as left, as --max-bytes does (was: ValueError, no bundle at all)."""
    state = tmp_path / "state"
    base = ["--state-dir", str(state)]
    assert cli.main(["keygen", *base]) == 0
    cfg = load_agent_config(None)
    key = keys.load(state / "node.key")
    sp = Spool(state / "spool.db")
    for i in range(5):
        sp.append_data(key, cfg.site, cfg.node, _series(i), 10**9)
    sp.close()
    monkeypatch.setattr(wire.bundle, "MAX_MANIFEST_ENTRIES", 3)  # 2**20 in production
    out = tmp_path / "b.wsb"
    capsys.readouterr()
    assert cli.main(["export", *base, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 batches, seq 1-3" in text
    assert "2 newer unacknowledged batches did not fit: a bundle holds at most 3 batches" in text
    records = list(wire.bundle.read_bundle(out.read_bytes(), 1 << 20, 1 << 20))
    manifests = [r.manifest for r in records if isinstance(r, wire.bundle.ManifestRecord)]
    assert len(manifests) == 1 and manifests[0] is not None
    assert [e.seq for e in manifests[0].entries] == [1, 2, 3]


def test_a_receipt_older_than_the_spool_does_not_place_it_unless_it_answers_its_bundle(tmp_path: Path) -> None:
    """The node's previous install got a receipt (head 300); the collector has since taken
    more over HTTP. Placed by that stale head, the new spool would reuse seqs the collector
    holds. One answering a bundle this spool exported is fresh, whatever the clocks say."""
    key = SigningKey.generate()
    sp, _ = _spool(tmp_path, 3)
    created = int(sp.db.execute("SELECT value FROM meta WHERE key = 'created_ms'").fetchone()[0])
    before = {s: f.raw for s, f in _frames(sp).items()}
    done = sp.resume_from_receipt(key, "s", "n", (300, HEAD), [], issued_ms=created - 60_000)
    assert done.outcome == spool_mod.STALE and sp.resume_needed()
    assert {s: f.raw for s, f in _frames(sp).items()} == before
    bundle_hash = b"\x11" * 32
    sp.note_exported(3, bundle_hash)
    done = sp.resume_from_receipt(key, "s", "n", (300, HEAD), [], issued_ms=created - 60_000, bundles=[bundle_hash])
    assert (done.outcome, done.moved) == (spool_mod.RENUMBERED, 3)
    sp.close()
    (tmp_path / "forced").mkdir()
    sp, _ = _spool(tmp_path / "forced", 1)
    done = sp.resume_from_receipt(key, "s", "n", (300, HEAD), [], issued_ms=0, force=True)
    assert done.outcome == spool_mod.RENUMBERED
    sp.close()


def test_a_head_below_what_the_spool_exported_is_not_followed_blindly(tmp_path: Path) -> None:
    """A brand-new node's own seqs 1-5 were exported (and imported) but evicted here; a
    receipt stating an older head (3) arrives. Nothing left tells whose seq 3 is, and the
    collector may hold this spool's 4-5: renumbering would record them twice. Undecided."""
    key = SigningKey.generate()
    sp, _ = _evicted_spool(tmp_path, key)
    sp.note_exported(5, b"\x22" * 32)
    hashes = {s: wire.batch_hash(f.raw) for s, f in _frames(sp).items()}
    done = sp.resume_from_receipt(key, "s", "n", (3, HEAD), [])
    assert done.outcome == spool_mod.UNDECIDED and sp.resume_needed()
    assert {s: wire.batch_hash(f.raw) for s, f in _frames(sp).items()} == hashes
    sp.close()
