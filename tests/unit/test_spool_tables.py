"""Series tables (wire v2) in the spool: stored once, with the first batch naming them,
sealed when sealing is on, kept while a batch names them; spools made before tables
migrate; an export carries each table once, ahead of the first frame naming it."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

import wire
import wire.bundle
from agent import cli, keys
from agent.config import load_agent_config
from agent.spool import Spool
from tests.integration.harness import plaintext_hits
from wire.columns import columns_table_id
from wire.keys import CollectorKey

T0 = 1_700_000_000_000
SEALING = PrivateKey(hashlib.sha256(b"spool tables sealing").digest())
PIN = CollectorKey(bytes(SigningKey(hashlib.sha256(b"spool tables signing").digest()).verify_key),
                   bytes(SEALING.public_key))
# The batches table as spools were made before series tables (git show HEAD~2:agent/spool.py).
OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE batches (
    seq INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'inflight', 'rejected')),
    created_ms INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    claimed_ms INTEGER,
    reject_reason TEXT,
    frame BLOB NOT NULL
);
CREATE INDEX batches_state ON batches (state, seq);
CREATE TABLE applied_receipts (
    collector_key_id BLOB NOT NULL,
    receipt_no INTEGER NOT NULL,
    applied_ms INTEGER NOT NULL,
    PRIMARY KEY (collector_key_id, receipt_no)
) WITHOUT ROWID;
"""


def _series(i: int, names: tuple[str, ...] = ("node_load1",), points: int = 3) -> list[wire.Series]:
    ts = tuple(T0 + i * 10_000 + j * 1000 for j in range(points))
    return [wire.Series(name, (("cpu", str(k)),), wire.MetricType.GAUGE, ts,
                        tuple(float(i + j + k) for j in range(points)))
            for name in names for k in range(3)]


def _tables(sp: Spool) -> dict[bytes, bytes]:
    return {bytes(tid): bytes(blob) for tid, blob in sp.db.execute("SELECT id, blob FROM tables")}


def _named(sp: Spool) -> dict[int, bytes | None]:
    return {int(seq): None if tid is None else bytes(tid)
            for seq, tid in sp.db.execute("SELECT seq, table_id FROM batches ORDER BY seq")}


def _payload_table(frame: bytes) -> bytes:
    """The table id an unsealed v2 frame's signed payload names."""
    f = wire.parse_frame(frame)
    assert f.header.version == wire.WIRE_VERSION_2
    return columns_table_id(wire.decompress_payload(f, 1 << 24))


def test_a_table_is_stored_once_with_the_first_batch_that_names_it(tmp_path: Path) -> None:
    key, tables = SigningKey.generate(), wire.TableBuilder()
    sp = Spool(tmp_path / "spool.db")
    try:
        assert sp.append_data(key, "s", "n", _series(0), 10**9, T0, tables=tables) == 1
        (tid,) = _tables(sp)  # committed with the batch: there as soon as the batch is
        blob = _tables(sp)[tid]
        assert tid == wire.table_id(blob) and wire.parse_table_head(blob).series_count == 3
        for i in range(1, 4):
            sp.append_data(key, "s", "n", _series(i), 10**9, T0, tables=tables)
        assert _tables(sp) == {tid: blob}
        assert set(_named(sp).values()) == {tid}
        for (frame,) in sp.db.execute("SELECT frame FROM batches"):
            assert _payload_table(bytes(frame)) == tid  # what the column says is what is signed
        claimed = sp.claim_oldest()
        assert claimed is not None and (claimed.table_id, claimed.table) == (tid, blob)
        # A batch with no series names no table: a v1 frame, as drop receipts and rotations are.
        seq = sp.append_data(key, "s", "n", [], 10**9, T0, tables=tables)
        assert _named(sp)[seq] is None
        assert wire.parse_frame(sp.db.execute("SELECT frame FROM batches WHERE seq = ?", (seq,))
                                .fetchone()[0]).header.version == wire.WIRE_VERSION
    finally:
        sp.close()


def test_without_a_builder_batches_stay_v1_and_name_no_table(tmp_path: Path) -> None:
    key = SigningKey.generate()
    sp = Spool(tmp_path / "spool.db")
    try:
        sp.append_data(key, "s", "n", _series(0), 10**9, T0)
        assert _tables(sp) == {} and _named(sp) == {1: None}
        claimed = sp.claim_oldest()
        assert claimed is not None and (claimed.table_id, claimed.table) == (None, None)
        assert wire.parse_frame(claimed.frame).header.version == wire.WIRE_VERSION
    finally:
        sp.close()


def test_new_series_make_a_new_table_and_older_batches_keep_theirs(tmp_path: Path) -> None:
    key, tables = SigningKey.generate(), wire.TableBuilder()
    sp = Spool(tmp_path / "spool.db")
    try:
        for i in range(2):
            sp.append_data(key, "s", "n", _series(i), 10**9, T0, tables=tables)
        first = _named(sp)[1]
        sp.append_data(key, "s", "n", _series(2, ("node_load1", "node_load5")), 10**9, T0, tables=tables)
        sp.append_data(key, "s", "n", _series(3), 10**9, T0, tables=tables)  # a subset: same table
        named = _named(sp)
        assert named[1] == named[2] == first
        third = named[3]
        assert third is not None and third == named[4] != first
        assert set(_tables(sp)) == {first, third}
        assert wire.parse_table_head(_tables(sp)[third]).series_count == 6  # appended, not replaced
        assert [_payload_table(bytes(f)) for (f,) in sp.db.execute("SELECT frame FROM batches ORDER BY seq")] \
            == [named[s] for s in (1, 2, 3, 4)]
    finally:
        sp.close()


def test_a_sealed_table_is_stored_sealed(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    key, tables = SigningKey.generate(), wire.TableBuilder()
    names = (b"ws_spool_tables_probe_metric", b"spool-tables-probe-label-value")
    series = [wire.Series(names[0].decode(), (("where", names[1].decode()),), wire.MetricType.GAUGE,
                          (T0,), (1.0,))]
    sp = Spool(path)
    try:
        for _ in range(3):
            sp.append_data(key, "s", "n", series, 10**9, T0, seal_to=PIN, tables=tables)
        (blob,) = _tables(sp).values()
        assert wire.parse_table_head(blob).flags & 0x01  # TABLE_FLAG_SEALED
        assert all(wire.parse_frame(bytes(f)).header.flags == wire.FLAG_SEALED
                   for (f,) in sp.db.execute("SELECT frame FROM batches"))
        opened = wire.open_table(blob, wire.DEFAULT_OPEN_LIMITS.payload, 1 << 20, {PIN.key_id: SEALING})
        assert opened.names == [names[0].decode()]
        wal = path.with_name("spool.db-wal")
        assert wal.stat().st_size > 0
        assert plaintext_hits(path.read_bytes() + wal.read_bytes(), names) == set()
    finally:
        sp.close()
    # The same series unsealed: the check does find them (in the compressed table).
    clear = tmp_path / "clear.db"
    sp = Spool(clear)
    try:
        sp.append_data(key, "s", "n", series, 10**9, T0, tables=wire.TableBuilder())
        blob_bytes = clear.read_bytes() + clear.with_name("clear.db-wal").read_bytes()
        assert plaintext_hits(blob_bytes, names) == set(names)
    finally:
        sp.close()


def test_tables_go_with_the_last_batch_that_names_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, tables = SigningKey.generate(), wire.TableBuilder()
    sp = Spool(tmp_path / "spool.db")
    try:
        for i in range(3):
            sp.append_data(key, "s", "n", _series(i), 10**9, T0, tables=tables)
        sp.append_data(key, "s", "n", _series(3, ("a", "b")), 10**9, T0, tables=tables)
        named = _named(sp)
        old, new = named[1], named[4]
        assert old is not None and new is not None and old != new
        sp.ack(1, None)
        sp.ack(2, None)
        assert set(_tables(sp)) == {old, new}  # batch 3 still names it
        # Rejected batches are kept for audit, and so is the table they name.
        sp.reject(3, "test", (key, "s", "n"))  # signs a drop receipt (seq 5, no table)
        assert set(_tables(sp)) == {old, new}
        sp.ack(5, None)
        # Trimmed from the audit trail: the tables go with the last rejected batches naming them.
        monkeypatch.setattr("agent.spool.MAX_REJECTED_KEPT", 0)
        sp.reject(4, "test")
        assert _named(sp) == {}
        assert _tables(sp) == {}
    finally:
        sp.close()


def test_eviction_and_receipts_delete_tables_no_batch_names(tmp_path: Path) -> None:
    key, tables = SigningKey.generate(), wire.TableBuilder()
    sp = Spool(tmp_path / "spool.db")
    try:
        for i in range(3):
            sp.append_data(key, "s", "n", _series(i, points=40), 10**9, T0, tables=tables)
        first = _named(sp)[1]
        for i in range(3, 6):
            sp.append_data(key, "s", "n", _series(i, ("x", "y"), points=40), 10**9, T0, tables=tables)
        second = _named(sp)[4]
        assert set(_tables(sp)) == {first, second}
        # A receipt for batches 1-2: batch 3 still names the first table.
        frames = {int(s): bytes(f) for s, f in sp.db.execute("SELECT seq, frame FROM batches")}
        sp.apply_receipt(b"\xc0" * 8, 1, [(s, wire.batch_hash(frames[s])) for s in (1, 2)], 2)
        assert set(_tables(sp)) == {first, second}
        # The quota evicts batch 3 (and 4): the first table goes with its last batch.
        used = sum(r[0] for r in sp.db.execute("SELECT bytes FROM batches")) + sum(
            len(b) for b in _tables(sp).values())
        sp.append_data(key, "s", "n", _series(6, ("x", "y"), points=40), used - 1, T0, tables=tables)
        named = _named(sp)
        assert 3 not in named and first not in named.values()
        assert set(_tables(sp)) == {second}
        receipts = [wire.decode_drop_receipt(wire.parse_frame(bytes(f)).payload) for (f,) in
                    sp.db.execute("SELECT frame FROM batches WHERE kind = ?", (int(wire.Kind.DROP_RECEIPT),))]
        assert receipts and receipts[0].reason == "spool_quota"
    finally:
        sp.close()


def test_table_bytes_count_towards_the_quota(tmp_path: Path) -> None:
    """A table's bytes are the spool's too: a batch evicted as the last one naming a big
    table frees them, so the spool stays under its quota."""
    key, tables = SigningKey.generate(), wire.TableBuilder()
    sp = Spool(tmp_path / "spool.db")
    wide = tuple(f"metric_with_a_long_name_{i:04d}" for i in range(200))
    try:
        sp.append_data(key, "s", "n", _series(0, wide, points=1), 10**9, T0, tables=tables)
        big = len(next(iter(_tables(sp).values())))
        for i in range(1, 4):
            sp.append_data(key, "s", "n", _series(i, ("other",), points=1), 10**9, T0, tables=wire.TableBuilder())
        sizes = sum(r[0] for r in sp.db.execute("SELECT bytes FROM batches"))
        total = sizes + sum(len(b) for b in _tables(sp).values())
        # Over the quota by less than the first batch plus its table: evicting it is enough.
        sp.append_data(key, "s", "n", _series(4, ("other",), points=1), total + 1, T0, tables=wire.TableBuilder())
        assert 1 not in _named(sp) and big > 1000
        held = sum(r[0] for r in sp.db.execute("SELECT bytes FROM batches WHERE state != 'rejected'")) + sum(
            len(b) for b in _tables(sp).values())
        assert held <= total + 1
        assert 2 in _named(sp)  # and only it went
    finally:
        sp.close()


def test_renumbering_keeps_each_batch_and_its_table(tmp_path: Path) -> None:
    key, tables = SigningKey.generate(), wire.TableBuilder()
    sp = Spool(tmp_path / "spool.db")
    try:
        for i in range(3):
            sp.append_data(key, "s", "n", _series(i), 10**9, T0, seal_to=PIN if i == 2 else None, tables=tables)
        before = _named(sp)
        payloads = {s: wire.parse_frame(bytes(f)).payload for s, f in sp.db.execute("SELECT seq, frame FROM batches")}
        head = b"\x33" * 32
        assert sp.resume(key, "s", "n", 101, head) == 3
        after = _named(sp)
        assert after == {s + 100: tid for s, tid in before.items()}
        prev = head
        for seq, frame in sp.db.execute("SELECT seq, frame FROM batches ORDER BY seq"):
            f = wire.parse_frame(bytes(frame))
            wire.verify_signature(f, bytes(key.verify_key))
            assert (f.header.seq, f.header.prev_hash, f.header.version) == (seq, prev, wire.WIRE_VERSION_2)
            assert f.payload == payloads[seq - 100]
            prev = wire.batch_hash(bytes(frame))
        assert set(_tables(sp)) == {t for t in after.values() if t is not None}
        claimed = sp.claim_oldest()
        assert claimed is not None and claimed.seq == 101 and claimed.table == _tables(sp)[before[1] or b""]
    finally:
        sp.close()


def _old_spool(path: Path, key: SigningKey) -> bytes:
    """A spool as the previous schema made it, holding one v1 batch; returns the frame."""
    frame = wire.sign_batch(wire.prepare_data(_series(0)),
                            wire.BatchContext(key, "s", "n", 1, wire.ZERO_HASH, T0, 1))
    h = wire.parse_frame(frame).header
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO batches (seq, kind, state, created_ms, window_start_ms, window_end_ms, samples, "
               "bytes, frame) VALUES (1, 0, 'pending', ?, ?, ?, ?, ?, ?)",
               (T0, h.window_start_ms, h.window_end_ms, h.sample_count, len(frame), frame))
    db.executemany("INSERT INTO meta VALUES (?, ?)",
                   [("next_seq", 2), ("last_hash", wire.batch_hash(frame)), ("resume_needed", 0)])
    db.commit()
    db.close()
    return frame


def test_a_spool_made_before_tables_migrates(tmp_path: Path) -> None:
    key, tables = SigningKey.generate(), wire.TableBuilder()
    path = tmp_path / "spool.db"
    frame = _old_spool(path, key)
    # Read-only first (`status`, `export` beside an agent not yet restarted): nothing names a table.
    ro = Spool(path, readonly=True)
    try:
        assert list(ro.unacknowledged_named()) == [(1, frame, None)]
        assert ro.stats().pending_batches == 1
    finally:
        ro.close()
    sp = Spool(path)
    try:
        assert sp.append_data(key, "s", "n", _series(1), 10**9, T0, tables=tables) == 2
        named = _named(sp)
        assert named[1] is None and named[2] is not None
        claimed = sp.claim_oldest()
        assert claimed is not None and (claimed.seq, claimed.frame, claimed.table_id) == (1, frame, None)
        sp.ack(1, None)
        claimed = sp.claim_oldest()
        assert claimed is not None and claimed.table_id == named[2] and claimed.table is not None
        index = sp.db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'batches'")
        assert "batches_table" in {r[0] for r in index}
    finally:
        sp.close()
    Spool(path).close()  # opening it again changes nothing


# ---------------------------------------------------------------- export


def _export(state: Path, out: Path, *extra: str) -> int:
    return cli.main(["export", "--state-dir", str(state), "--out", str(out), *extra])


def test_an_export_carries_each_table_once_before_the_first_frame_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert cli.main(["keygen", "--state-dir", str(state)]) == 0
    cfg = load_agent_config(None)
    key, tables = keys.load(state / "node.key"), wire.TableBuilder()
    sp = Spool(state / "spool.db")
    try:
        for i in range(2):
            sp.append_data(key, cfg.site, cfg.node, _series(i), 10**9, T0, tables=tables)
        sp.reject(2, "test", (key, cfg.site, cfg.node))  # a drop receipt (v1) in between
        sp.append_data(key, cfg.site, cfg.node, _series(3, ("p", "q")), 10**9, T0, tables=tables)
        sp.append_data(key, cfg.site, cfg.node, _series(4), 10**9, T0, tables=tables)
        named = _named(sp)
        stored = _tables(sp)
    finally:
        sp.close()
    out = tmp_path / "b.wsb"
    capsys.readouterr()
    assert _export(state, out) == 0
    assert re.search(r"4 batches, seq 1, 3-5, \d+ bytes with 2 series tables \(bundle", capsys.readouterr().out)
    records = list(wire.bundle.read_bundle(out.read_bytes(), 1 << 24, 1 << 24))
    order: list[tuple[str, int | bytes]] = []
    for r in records:
        if isinstance(r, wire.bundle.TableRecord):
            order.append(("table", wire.table_id(r.raw)))
            assert stored[wire.table_id(r.raw)] == r.raw
        elif isinstance(r, wire.bundle.FrameRecord):
            order.append(("frame", wire.parse_frame(r.raw).header.seq))
        else:
            assert isinstance(r, wire.bundle.ManifestRecord)
    first, second = named[1], named[4]
    assert first is not None and second is not None
    # 1 names the first table; 4 and 5 the second (5's series are a subset of it); 3 is the drop receipt.
    assert named[5] == second and named[3] is None
    assert order == [("table", first), ("frame", 1), ("frame", 3), ("table", second), ("frame", 4), ("frame", 5)]


def test_export_max_bytes_counts_the_table_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert cli.main(["keygen", "--state-dir", str(state)]) == 0
    cfg = load_agent_config(None)
    key, tables = keys.load(state / "node.key"), wire.TableBuilder()
    wide = tuple(f"metric_{i:03d}" for i in range(50))
    sp = Spool(state / "spool.db")
    try:
        sp.append_data(key, cfg.site, cfg.node, _series(0, wide), 10**9, T0, tables=tables)
        sp.append_data(key, cfg.site, cfg.node, _series(1, wide), 10**9, T0, tables=tables)
    finally:
        sp.close()
    one, both = tmp_path / "one.wsb", tmp_path / "both.wsb"
    assert _export(state, both) == 0
    whole = both.stat().st_size
    # One byte short of the whole bundle: the second frame is left for a later bundle.
    assert _export(state, one, "--max-bytes", str(whole - 1)) == 0
    assert "1 newer unacknowledged batches did not fit" in capsys.readouterr().out
    single = one.stat().st_size
    assert single <= whole - 1
    kinds = [type(r).__name__ for r in wire.bundle.read_bundle(one.read_bytes(), 1 << 24, 1 << 24)]
    assert kinds == ["TableRecord", "FrameRecord", "ManifestRecord"]
    # The first frame fits only with its table: one byte less and nothing can be written.
    capsys.readouterr()
    assert _export(state, tmp_path / "none.wsb", "--max-bytes", str(single - 1)) == 1
    assert "alone makes a bundle larger than --max-bytes" in capsys.readouterr().err
    assert _export(state, tmp_path / "exact.wsb", "--max-bytes", str(single)) == 0
    assert (tmp_path / "exact.wsb").stat().st_size == single


def test_the_agent_drops_only_a_series_the_collector_would_refuse_and_its_table_stays_good(tmp_path: Path) -> None:
    """A scraped label such as `__x` passes the text parser; in a v2 series table it would
    get every later batch naming the table refused. The agent drops that series alone
    (counted as unencodable) and signs the rest against a table the collector opens."""
    from nacl.signing import SigningKey

    from agent.config import AgentConfig, NetworkSourceConfig, SourcesConfig, SystemSourceConfig
    from agent.daemon import Agent

    config = AgentConfig(node="n1", state_dir=str(tmp_path),
                         sources=SourcesConfig(system=SystemSourceConfig(enabled=False),
                                               network=NetworkSourceConfig(enabled=False)))
    agent = Agent(config, SigningKey.generate())
    good = wire.Series("up", (("job", "x"),), wire.MetricType.GAUGE, (1_700_000_000_000,), (1.0,))
    bad = wire.Series("up", (("__x", "1"),), wire.MetricType.GAUGE, (1_700_000_000_000,), (2.0,))
    agent.store([good, bad])
    agent.store([good._replace(timestamps_ms=(1_700_000_060_000,))])
    spool = agent.spool
    assert spool is not None
    try:
        assert agent.unencodable_samples == 1
        opened = []
        while (claimed := spool.claim_oldest()) is not None:
            assert claimed.table is not None
            table = wire.open_table(claimed.table, wire.Limits(), 1 << 20)
            assert table.names == ["up"] and table.labels == [(("job", "x"),)]
            opened.append(claimed.seq)
            spool.ack(claimed.seq, None)
        assert opened == [1, 2]
    finally:
        spool.close()
