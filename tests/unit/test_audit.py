"""Audit and provenance over real SQLite ledgers filled through Ledger.commit.

Tampering is done the way an intruder (or a failing disk) would: on the database file,
with SQL or by cutting bytes, never through the ledger's own API.
"""

from __future__ import annotations

import gc
import json
import sqlite3
import time
import tracemalloc
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import wire
from collector import audit, cli, provenance, trust
from collector.ledger import Ledger, Submission, connect_readonly
from tests.unit.test_ledger import NODE, SITE, T0, Chain, submit


def run_audit(path: Path, **kwargs: object) -> tuple[audit.AuditSummary, list[audit.Finding]]:
    found: list[audit.Finding] = []
    summary = audit.audit(path, on_finding=found.append, **kwargs)  # type: ignore[arg-type]
    return summary, found


def problems(found: list[audit.Finding]) -> list[tuple[str | None, int | None, str]]:
    return [(f.node, f.seq, f.problem) for f in found]


class Fleet:
    """A ledger on disk with one enrolled node whose batches are committed as ingest does."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.path = self.data_dir / "ledger.db"
        self.ledger = Ledger(self.path)
        self.key = SigningKey.generate()
        self.record = trust.enroll(self.ledger.conn, SITE, NODE, bytes(self.key.verify_key))
        self.chain = Chain(self.key)

    def data(self, *seqs: int) -> None:
        assert submit(self.ledger, self.record, *(self.chain.data(s) for s in seqs)) == ["accepted"] * len(seqs)

    def sql(self, query: str, params: tuple[object, ...] = ()) -> None:
        """Change the file behind the ledger's back (a second, raw connection)."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute(query, params)
        finally:
            db.close()

    def stored(self, seq: int) -> bytes:
        frame = self.ledger.frame(SITE, NODE, seq)
        assert frame is not None
        return frame

    def close(self) -> None:
        self.ledger.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    f = Fleet(tmp_path)
    yield f  # type: ignore[misc]
    f.close()


def test_a_clean_ledger_audits_clean_and_the_command_exits_0(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.data(*range(1, 11))
    summary, found = run_audit(fleet.path)
    assert found == []
    assert summary.clean and summary.nodes == 1 and summary.batches == 10 == summary.data_batches
    assert summary.links_checked == 10 and summary.links_unchecked == 0

    assert cli.main(["audit", "--data-dir", str(fleet.data_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("audit clean: 1 node(s), 10 batches")
    assert cli.main(["audit", "--data-dir", str(fleet.data_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["findings"] == [] and doc["summary"]["clean"] is True and doc["summary"]["batches"] == 10


def test_a_byte_flipped_inside_a_stored_frame_is_named_once(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.data(*range(1, 8))
    raw = bytearray(fleet.stored(4))
    raw[len(raw) - wire.SIGNATURE_LEN - 3] ^= 0x01  # inside the payload
    fleet.sql("UPDATE batches SET frame = ? WHERE site = ? AND node = ? AND seq = 4", (bytes(raw), SITE, NODE))

    summary, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 4, "bad_signature")]
    assert "does not verify" in found[0].detail
    # Its links (3 -> 4, 4 -> 5) cannot be proven and are not reported again as chain breaks.
    assert summary.links_unchecked == 1 and not summary.clean

    assert cli.main(["audit", "--data-dir", str(fleet.data_dir)]) == 1
    out = capsys.readouterr().out
    assert f"{SITE}/{NODE} seq 4: bad_signature:" in out and "audit FAILED: 1 problem(s)" in out


def test_a_byte_flipped_in_the_header_is_named(fleet: Fleet) -> None:
    fleet.data(1, 2, 3)
    raw = bytearray(fleet.stored(2))
    raw[60] ^= 0x80  # created_wall_ms
    fleet.sql("UPDATE batches SET frame = ? WHERE seq = 2", (bytes(raw),))
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 2, "bad_signature")]


def test_a_deleted_row_is_a_missing_seq(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.data(*range(1, 8))
    fleet.sql("DELETE FROM batches WHERE seq IN (3, 4)")

    summary, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 3, "missing")]
    assert found[0].through_seq == 4 and "no verified drop receipt names it" in found[0].detail
    assert summary.links_unchecked == 1  # 5's predecessor is gone

    assert cli.main(["audit", "--data-dir", str(fleet.data_dir), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(f["seq"], f["through_seq"], f["problem"]) for f in doc["findings"]] == [(3, 4, "missing")]
    assert doc["summary"]["findings"] == {"missing": 1}


def test_the_newest_row_deleted_is_missing_by_the_nodes_own_record(fleet: Fleet) -> None:
    fleet.data(1, 2, 3)
    fleet.sql("DELETE FROM batches WHERE seq = 3")
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 3, "missing")]


def test_two_rows_swapped_are_each_named(fleet: Fleet) -> None:
    fleet.data(*range(1, 8))
    a, b = fleet.stored(3), fleet.stored(5)
    # Every column but the key moves: the rows look self-consistent, the signed seq does not.
    for seq, frame in ((3, b), (5, a)):
        h = wire.parse_frame(frame).header
        fleet.sql(
            "UPDATE batches SET frame = ?, hash = ?, prev_hash = ?, created_wall_ms = ?, "
            "window_start_ms = ?, window_end_ms = ? WHERE seq = ?",
            (frame, wire.batch_hash(frame), h.prev_hash, h.created_wall_ms, h.window_start_ms, h.window_end_ms, seq),
        )
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 3, "row_mismatch"), (NODE, 5, "row_mismatch")]
    assert "holds the frame signed as s1/n1 seq 5" in found[0].detail
    assert "holds the frame signed as s1/n1 seq 3" in found[1].detail


def test_a_row_moved_to_another_node_is_named(fleet: Fleet) -> None:
    fleet.data(1, 2, 3)
    other = SigningKey.generate()
    record = trust.enroll(fleet.ledger.conn, SITE, "n2", bytes(other.verify_key))
    chain2 = Chain(other, node="n2")
    assert submit(fleet.ledger, record, chain2.data(1)) == ["accepted"]
    fleet.sql("UPDATE batches SET frame = ? WHERE node = 'n2' AND seq = 1", (fleet.stored(1),))
    _, found = run_audit(fleet.path)
    assert problems(found) == [("n2", 1, "row_mismatch")]
    assert "holds the frame signed as s1/n1 seq 1" in found[0].detail


def test_a_stored_column_that_disagrees_with_the_signed_header_is_named(fleet: Fleet) -> None:
    fleet.data(1, 2, 3)
    fleet.sql("UPDATE batches SET window_end_ms = window_end_ms + 1, sample_count = 99 WHERE seq = 2")
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 2, "row_mismatch")]
    assert "window_end_ms" in found[0].detail and "sample_count 99 (signed: 2)" in found[0].detail


def test_a_validly_signed_substitute_breaks_the_chain(fleet: Fleet) -> None:
    """Whoever holds the node key can sign another seq 3; the chain still gives it away."""
    fleet.data(1, 2, 3, 4)
    forged = wire.encode_data_batch(
        wire.BatchContext(fleet.key, SITE, NODE, 3, wire.batch_hash(fleet.stored(2)), T0 + 3, 3, 3),
        [wire.Series("node_load1", (), wire.MetricType.GAUGE, (T0 + 3000,), (42.0,))],
    )
    h = wire.parse_frame(forged).header
    fleet.sql(
        "UPDATE batches SET frame = ?, hash = ?, bytes = ?, series_count = ?, sample_count = ? WHERE seq = 3",
        (forged, wire.batch_hash(forged), len(forged), h.series_count, h.sample_count),
    )
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 4, "chain_break")]
    assert "is not the hash of the stored seq 3" in found[0].detail


def test_a_truncated_ledger_file_is_reported_not_a_traceback(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.data(*range(1, 201))
    fleet.close()  # checkpoints the WAL into the file
    size = fleet.path.stat().st_size
    with open(fleet.path, "r+b") as f:
        f.truncate(size // 2)

    summary, found = run_audit(fleet.path)
    assert not summary.clean
    assert found[0].problem == "damaged" and "is truncated" in found[0].detail

    assert cli.main(["audit", "--data-dir", str(fleet.data_dir)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "ledger: damaged:" in captured.out and "audit FAILED" in captured.out


def test_a_cut_ledger_whose_header_was_made_to_agree_is_named_where_it_ends(fleet: Fleet) -> None:
    """Past the cheap size check, the audit names the node and the seq where reading failed,
    after checking every row before it, and still ends with a summary."""
    fleet.data(*range(1, 201))
    fleet.close()
    page_size = int.from_bytes(fleet.path.read_bytes()[16:18], "big")
    keep = fleet.path.stat().st_size * 9 // 10 // page_size * page_size
    with open(fleet.path, "r+b") as f:
        f.truncate(keep)
        f.seek(28)
        f.write((keep // page_size).to_bytes(4, "big"))
    summary, found = run_audit(fleet.path)
    assert [f.problem for f in found] == ["damaged"]
    assert found[0].node == NODE and "at or after seq" in found[0].detail
    assert "malformed" in found[0].detail and 0 < summary.batches < 200


def test_a_file_that_is_not_sqlite_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ledger.db").write_bytes(b"not a database at all" * 500)
    assert cli.main(["audit", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "is not a SQLite database" in out and "Traceback" not in out


def test_no_ledger_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "--data-dir", str(tmp_path)]) == 1
    assert "no ledger here" in capsys.readouterr().err


def test_a_gap_named_by_a_drop_receipt_is_clean(fleet: Fleet) -> None:
    fleet.data(1, 2)
    fleet.chain.data(3)
    fleet.chain.data(4)  # evicted from the spool: never delivered
    assert submit(fleet.ledger, fleet.record, fleet.chain.drop(5, ((3, 4),)), fleet.chain.data(6)) == [
        "accepted",
        "accepted",
    ]
    summary, found = run_audit(fleet.path)
    assert found == []
    assert summary.seqs_dropped == 2 and summary.drop_receipts == 1 and summary.links_unchecked == 1


def test_a_forged_drop_record_does_not_excuse_a_deleted_row(fleet: Fleet) -> None:
    """The drops table is what the ledger derived from signed receipts; a row added to it
    by hand names no signed receipt and covers nothing."""
    fleet.data(1, 2, 3, 4)
    fleet.sql("DELETE FROM batches WHERE seq = 2")
    fleet.sql("INSERT INTO drops VALUES (?, ?, 3, 2, 2, 0)", (SITE, NODE))
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 3, "drop_mismatch"), (NODE, 2, "missing")]
    assert "holds no drop receipt there" in found[0].detail


def test_retired_batches_are_accounted_not_missing(fleet: Fleet) -> None:
    fleet.data(*range(1, 11))
    pruned = fleet.ledger.prune(time.time() + 10, 1.0, 0, [])
    assert pruned.batches == 9  # the node's newest stays
    summary, found = run_audit(fleet.path)
    assert found == [] and summary.seqs_retired == 9 and summary.batches == 1


def test_a_rotation_mid_chain_and_a_revocation_after_recording_are_clean(fleet: Fleet) -> None:
    new = SigningKey.generate()
    fleet.data(1, 2)
    assert submit(fleet.ledger, fleet.record, fleet.chain.rotation(3, new)) == ["accepted"]
    new_record = trust.lookup(fleet.ledger.conn, wire.key_id(bytes(new.verify_key)))
    assert new_record is not None
    assert submit(fleet.ledger, new_record, fleet.chain.data(4, key=new), fleet.chain.data(5, key=new)) == [
        "accepted",
        "accepted",
    ]
    trust.revoke(fleet.ledger.conn, NODE, SITE, now=time.time() + 1)

    summary, found = run_audit(fleet.path)
    assert found == []
    assert summary.key_rotations == 1 and summary.links_checked == 5


def test_a_batch_recorded_after_its_key_was_revoked_is_named(fleet: Fleet) -> None:
    fleet.data(1, 2)
    trust.revoke(fleet.ledger.conn, NODE, SITE, now=1.0)  # long before the batches arrived
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 1, "recorded_after_revocation"), (NODE, 2, "recorded_after_revocation")]


def test_a_key_the_rotation_did_not_announce_is_named(fleet: Fleet) -> None:
    """The keys table is the collector's; the chain says which key follows a rotation."""
    new, intruder = SigningKey.generate(), SigningKey.generate()
    fleet.data(1)
    assert submit(fleet.ledger, fleet.record, fleet.chain.rotation(2, new)) == ["accepted"]
    fleet.chain.data(3, key=intruder)
    # Someone with write access enrols their own key for seqs after the rotation.
    fleet.sql("DELETE FROM keys WHERE key_id = ?", (wire.key_id(bytes(new.verify_key)),))
    record = trust.enroll(fleet.ledger.conn, SITE, NODE, bytes(intruder.verify_key))
    assert submit(fleet.ledger, record, fleet.chain.frames[3]) == ["accepted"]
    _, found = run_audit(fleet.path)
    assert problems(found) == [(NODE, 3, "key_mismatch")]


def test_site_and_node_filters(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.data(1, 2)
    other = SigningKey.generate()
    record = trust.enroll(fleet.ledger.conn, SITE, "n2", bytes(other.verify_key))
    chain2 = Chain(other, node="n2")
    assert submit(fleet.ledger, record, chain2.data(1), chain2.data(2)) == ["accepted", "accepted"]
    fleet.sql("DELETE FROM batches WHERE node = 'n2' AND seq = 1")
    assert run_audit(fleet.path, node=NODE)[1] == []
    assert problems(run_audit(fleet.path, site=SITE, node="n2")[1]) == [("n2", 1, "missing")]
    assert cli.main(["audit", "--data-dir", str(fleet.data_dir), "--node", "nope"]) == 1
    assert "the ledger has nothing for nope" in capsys.readouterr().err


def test_audit_reads_beside_an_open_writer_and_reports_progress(fleet: Fleet) -> None:
    """The ledger stays open for writing (as under `serve`), its WAL not checkpointed."""
    fleet.data(*range(1, 601))
    seen: list[audit.Progress] = []
    summary, found = run_audit(fleet.path, progress=seen.append, progress_every_s=0.0)
    assert found == [] and summary.batches == 600
    assert [p.batches for p in seen] == [256, 512]
    assert "batches checked" in str(seen[0]) and seen[-1].node == NODE
    fleet.data(601)  # the writer is not blocked by the reader that came and went


def _peak_audit_bytes(path: Path) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        summary, found = run_audit(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == [] and summary.clean
    return peak


def test_audit_memory_does_not_grow_with_the_ledger(tmp_path: Path) -> None:
    """bench/audit_ledger.py does this at a million batches; here 200 against 2,000."""
    peaks = []
    for count in (200, 2000):
        f = Fleet(tmp_path / str(count))
        for first in range(1, count + 1, 500):
            f.data(*range(first, min(first + 500, count + 1)))
        f.close()
        peaks.append(_peak_audit_bytes(f.path))
    small, large = peaks
    assert large < small * 1.5 + 64 * 1024, peaks


# ------------------------------------------------------------------------- provenance


def test_provenance_names_the_batch_that_carried_a_sample(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.data(*range(1, 21))
    at = T0 + 7 * 1000 + 500  # between seq 7's point and seq 8's: the nearest before is seq 7's
    conn = connect_readonly(fleet.path)
    try:
        search = provenance.find_sample(conn, SITE, NODE, "node_load1", (), at, 3_600_000)
    finally:
        conn.close()
    assert [(o.seq, o.timestamp_ms, o.origin, o.origin_file) for o in search.found] == [(7, T0 + 7000, "http", None)]
    o = search.found[0]
    assert o.batch_hash == wire.batch_hash(fleet.stored(7)).hex()
    assert o.key_id == fleet.record.key_id.hex()
    assert search.batches_read <= 3  # the index, not the node's whole history

    args = [
        "provenance",
        "--data-dir",
        str(fleet.data_dir),
        "--site",
        SITE,
        "--node",
        NODE,
        "--metric",
        "node_load1",
        "--at",
        provenance.format_ms(at),
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "batch:    seq 7," in out and "over HTTP" in out and o.batch_hash in out
    assert cli.main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["found"][0]["seq"] == 7 and doc["found"][0]["origin"] == "http"


def test_provenance_says_so_when_no_sample_is_near(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.data(1, 2)
    base = ["provenance", "--data-dir", str(fleet.data_dir), "--site", SITE, "--node", NODE]
    assert cli.main([*base, "--metric", "node_load1", "--at", str((T0 - 10_000) / 1000)]) == 1
    assert "no sample of node_load1{}" in capsys.readouterr().out
    assert cli.main([*base, "--metric", "node_load1", "--labels", "cpu", "--at", "1"]) == 2
    assert "label 'cpu' is not name=value" in capsys.readouterr().err
    assert cli.main([*base, "--metric", "node_load1", "--at", "yesterday"]) == 2


def test_provenance_matches_labels(fleet: Fleet) -> None:
    chain = fleet.chain
    series = [
        wire.Series(
            "node_cpu_seconds_total",
            (("cpu", str(c)), ("mode", "idle")),
            wire.MetricType.COUNTER,
            (T0 + 1000 * c,),
            (float(c),),
        )
        for c in range(3)
    ]
    chain.frames[1] = wire.encode_data_batch(chain._ctx(1), series)
    assert submit(fleet.ledger, fleet.record, chain.frames[1]) == ["accepted"]
    conn = connect_readonly(fleet.path)
    try:
        one = provenance.find_sample(
            conn, SITE, NODE, "node_cpu_seconds_total", provenance.parse_labels("cpu=1"), T0 + 5000, 60_000
        )
        every = provenance.find_sample(conn, SITE, NODE, "node_cpu_seconds_total", (), T0 + 5000, 60_000)
    finally:
        conn.close()
    assert [(o.labels, o.value) for o in one.found] == [((("cpu", "1"), ("mode", "idle")), 1.0)]
    assert [o.value for o in every.found] == [2.0, 1.0, 0.0]


def test_provenance_reads_the_window_index(fleet: Fleet) -> None:
    fleet.data(1)
    plan = " ".join(
        str(r[-1])
        for r in fleet.ledger.conn.execute(
            "EXPLAIN QUERY PLAN SELECT seq FROM batches WHERE site = ? AND node = ? AND "
            "window_end_ms BETWEEN ? AND ? AND window_start_ms <= ? AND kind = 0 "
            "ORDER BY window_end_ms DESC, seq DESC",
            (SITE, NODE, 0, 1, 1),
        )
    )
    assert "batches_by_window_end" in plan


def test_an_older_ledger_gains_the_origin_column_and_its_batches_came_over_http(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    f.data(1, 2)
    f.close()
    db = sqlite3.connect(f.path, isolation_level=None)
    db.execute("ALTER TABLE batches DROP COLUMN origin_file")
    db.execute("ALTER TABLE batches DROP COLUMN origin")  # the layout before this column
    db.close()

    conn = connect_readonly(f.path)  # not migrated: read as http
    try:
        found = provenance.find_sample(conn, SITE, NODE, "node_load1", (), T0 + 2000, 60_000).found
        assert [(o.seq, o.origin) for o in found] == [(2, "http")]
    finally:
        conn.close()

    led = Ledger(f.path)
    try:
        assert led.conn.execute("SELECT seq, origin, origin_file FROM batches ORDER BY seq").fetchall() == [
            (1, "http", None),
            (2, "http", None),
        ]
    finally:
        led.close()
    assert run_audit(f.path)[1] == []


def test_a_bundle_origin_is_recorded_with_its_file(fleet: Fleet) -> None:
    raw = fleet.chain.data(1)
    sub = Submission(
        wire.parse_frame(raw), fleet.record, time.time(), origin="bundle", origin_file="node-1-2024-05-01.wsbundle"
    )
    assert [o.result for o in fleet.ledger.commit([sub])] == ["accepted"]
    conn = connect_readonly(fleet.path)
    try:
        o = provenance.find_sample(conn, SITE, NODE, "node_load1", (), T0 + 1000, 60_000).found[0]
    finally:
        conn.close()
    assert (o.origin, o.origin_file) == ("bundle", "node-1-2024-05-01.wsbundle")
    assert "in bundle node-1-2024-05-01.wsbundle" in provenance.describe(
        provenance.Search([o], 1, 0, []), SITE, NODE, "node_load1", (), T0 + 1000, 60_000
    )


def test_sealed_batches_are_proven_for_signature_and_chain_without_the_collector_keys(fleet: Fleet) -> None:
    """The audit has no collector decryption keys yet: a sealed payload is not opened, but
    its signature and place in the chain are proven, and a flipped byte is still named."""
    from nacl.public import PrivateKey

    from wire.keys import CollectorKey

    pin = CollectorKey(bytes(SigningKey.generate().verify_key), bytes(PrivateKey.generate().public_key))
    prev = wire.ZERO_HASH
    for seq in (1, 2, 3):
        series = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (T0 + seq * 1000,), (1.0,))]
        prepared = wire.seal_prepared(wire.prepare_data(series, 3), pin)
        raw = wire.sign_batch(prepared, wire.BatchContext(fleet.key, SITE, NODE, seq, prev, T0 + seq, seq))
        prev = wire.batch_hash(raw)
        assert [o.result for o in fleet.ledger.commit([Submission(wire.parse_frame(raw), fleet.record, 1.0)])] == [
            "accepted"
        ]
    summary, found = run_audit(fleet.path)
    assert found == [] and summary.sealed_unopened == 3 and summary.links_checked == 3

    raw2 = bytearray(fleet.stored(2))
    raw2[-wire.SIGNATURE_LEN - 2] ^= 0x04
    fleet.sql("UPDATE batches SET frame = ? WHERE seq = 2", (bytes(raw2),))
    assert problems(run_audit(fleet.path)[1]) == [(NODE, 2, "bad_signature")]


def test_with_the_collector_keys_sealed_batches_are_opened_and_their_samples_found(fleet: Fleet) -> None:
    """Given the collector's sealing keys (as the CLI loads them from data_dir), the audit opens
    every sealed batch and provenance names the sealed batch that carried a sample."""
    from nacl.public import PrivateKey

    from wire.keys import CollectorKey

    sealing = PrivateKey.generate()
    pin = CollectorKey(bytes(SigningKey.generate().verify_key), bytes(sealing.public_key))
    prev = wire.ZERO_HASH
    for seq in (1, 2):
        series = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (T0 + seq * 1000,), (float(seq),))]
        prepared = wire.seal_prepared(wire.prepare_data(series, 3), pin)
        raw = wire.sign_batch(prepared, wire.BatchContext(fleet.key, SITE, NODE, seq, prev, T0 + seq, seq))
        prev = wire.batch_hash(raw)
        assert [o.result for o in fleet.ledger.commit([Submission(wire.parse_frame(raw), fleet.record, 1.0)])] == [
            "accepted"
        ]
    keys = {pin.key_id: sealing}
    summary, found = run_audit(fleet.path, sealing_keys=keys)
    assert found == [] and summary.sealed_unopened == 0 and summary.links_checked == 2
    conn = connect_readonly(fleet.path)
    try:
        without = provenance.find_sample(conn, SITE, NODE, "node_load1", (), T0 + 2500, 60_000)
        with_keys = provenance.find_sample(conn, SITE, NODE, "node_load1", (), T0 + 2500, 60_000,
                                           sealing_keys=keys)
    finally:
        conn.close()
    assert without.found == []
    (o,) = with_keys.found
    assert (o.seq, o.value, o.origin) == (2, 2.0, "http")
