"""Wire v2 series tables at a real collector on loopback: a batch that names a table the
collector does not hold is answered 428 unknown_table, the table sent with it is stored in
the ledger with the batch, and every reader of the ledger (the start-up rebuild, the
remote-write forwarder, audit, bundle import) opens v2 frames through it."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

import wire
from collector import trust
from collector.ingest import STATUS
from collector.ledger import Ledger, Submission
from collector.tables import LedgerTables, named_table_id
from tests.integration import harness
from tests.integration.harness import wait_for
from tests.integration.test_collector_ingest import CONFIG, Server, run_cli, start_server
from tests.integration.test_collector_ingest import Node as V1Node
from tests.integration.test_remote_write_forwarding import Collector as ForwardingCollector
from tests.integration.test_remote_write_forwarding import Receiver
from wire import bundle

pytestmark = pytest.mark.timeout(180)

SITE = "s1"
T0 = int(time.time() * 1000) - 3_600_000
LIMITS = wire.OpenLimits()


class V2Node:
    """A node's key, chain and current series table, signing v2 batches as the agent does."""

    def __init__(self, name: str, site: str = SITE) -> None:
        self.key = SigningKey.generate()
        self.site, self.name = site, name
        self.builder = wire.TableBuilder(zstd_level=3)
        self.frames: dict[int, bytes] = {}
        self.tables: dict[int, bytes] = {}  # seq -> the table blob its frame names

    @property
    def pubkey(self) -> str:
        return base64.b64encode(bytes(self.key.verify_key)).decode()

    def series(self, seq: int, value: float, extra: tuple[wire.Series, ...] = ()) -> list[wire.Series]:
        ts = T0 + seq * 60_000
        return [
            wire.Series("node_load1", (), wire.MetricType.GAUGE, (ts - 10_000, ts), (value / 2, value)),
            wire.Series("node_network_receive_bytes_total", (("device", "eth0"),), wire.MetricType.COUNTER,
                        (ts,), (1000.0 * seq,)),
            *extra,
        ]

    def data(self, seq: int, value: float = 1.0, extra: tuple[wire.Series, ...] = ()) -> bytes:
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        table, placed = self.builder.place(self.series(seq, value, extra))
        ctx = wire.BatchContext(self.key, self.site, self.name, seq, prev, T0 + seq * 60_000, seq)
        self.frames[seq] = wire.sign_batch(wire.prepare_columns(table, placed, 3), ctx)
        self.tables[seq] = table.blob
        return self.frames[seq]

    def body(self, seq: int) -> bytes:
        """The frame at seq with its table before it."""
        return wire.with_table(self.tables[seq], self.frames[seq])

    def table_id(self, seq: int) -> bytes:
        return wire.table_id(self.tables[seq])


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "collector.toml"
    config.write_text(CONFIG)
    return config


def _enroll(data_dir: Path, config: Path, *nodes: V2Node | V1Node) -> None:
    for n in nodes:
        name = n.name
        r = run_cli(data_dir, config, "enroll", "--site", n.site, "--node", name, "--key", n.pubkey)
        assert r.returncode == 0, r.stderr


def _rows(data_dir: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(query, params).fetchall()
    finally:
        db.close()


def _write(data_dir: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    db = sqlite3.connect(data_dir / "ledger.db", timeout=10)
    try:
        with db:
            for query, params in statements:
                db.execute(query, params)
    finally:
        db.close()


def _load(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], node: str) -> float | None:
    return m.get(("node_load1", (("node", node), ("site", SITE))))


@pytest.fixture(params=[0, 2], ids=["serve-alone", "two-fronts"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, dict[str, V2Node]]]:
    config = _config(tmp_path)
    config.write_text(f"workers = {request.param}\n" + config.read_text())
    nodes = {name: V2Node(name) for name in ("a", "b")}
    _enroll(tmp_path / "d", config, *nodes.values())
    srv = start_server(tmp_path / "d", config)
    try:
        yield srv, nodes
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def test_unknown_table_is_428_then_the_table_sent_once_serves_later_batches(
    served: tuple[Server, dict[str, V2Node]],
) -> None:
    srv, nodes = served
    a = nodes["a"]
    assert STATUS["unknown_table"] == 428
    before = srv.counter("unknown_table")
    status, body = srv.post(a.data(1, value=0.5))
    assert status == 428
    assert body["result"] == "unknown_table"
    assert (body["site"], body["node"], body["seq"]) == (SITE, "a", 1)
    assert a.table_id(1).hex()[:16] in body["error"]
    assert "complete_through" not in body  # nothing of the node recorded yet
    assert srv.counter("unknown_table") == before + 1
    assert _rows(srv.data_dir, "SELECT COUNT(*) FROM batches WHERE node = 'a'") == [(0,)]

    status, body = srv.post(a.body(1))
    assert (status, body["result"], body["seq"], body["complete_through"]) == (200, "accepted", 1, 1)
    assert _rows(srv.data_dir, "SELECT table_id, blob FROM series_tables WHERE site = ? AND node = 'a'",
                 (SITE,)) == [(a.table_id(1), a.tables[1])]
    assert _rows(srv.data_dir, "SELECT table_id FROM batches WHERE node = 'a' AND seq = 1") == [(a.table_id(1),)]

    # The same table serves the next batches: columns only.
    for seq in (2, 3):
        status, body = srv.post(a.data(seq, value=float(seq)))
        assert (status, body["result"], body["complete_through"]) == (200, "accepted", seq)
        assert a.table_id(seq) == a.table_id(1)
    assert _load(srv.metrics(), "a") == 3.0
    # A resend with its table is a duplicate (the table is held already).
    assert srv.post(a.body(3))[1]["result"] == "duplicate"

    # A new series: a new table, unknown until sent. A signed refusal tells the watermarks.
    extra = (wire.Series("node_load5", (), wire.MetricType.GAUGE, (T0,), (2.0,)),)
    status, body = srv.post(a.data(4, value=4.0, extra=extra))
    assert (status, body["result"], body["complete_through"], body["highest_seq"]) == (428, "unknown_table", 3, 3)
    assert a.table_id(4) != a.table_id(3)
    assert srv.post(a.body(4))[1]["result"] == "accepted"
    m = srv.metrics()
    assert m[("node_load5", (("node", "a"), ("site", SITE)))] == 2.0
    assert m[("waystation_ingest_batches_total", (("result", "unknown_table"),))] == before + 2
    assert len(_rows(srv.data_dir, "SELECT 1 FROM series_tables WHERE node = 'a'")) == 2


def test_a_table_that_is_not_the_one_named_is_malformed_and_nothing_is_stored(
    served: tuple[Server, dict[str, V2Node]],
) -> None:
    srv, nodes = served
    a = nodes["a"]
    frame = a.data(1)
    other = V2Node("a")
    other.data(1, extra=(wire.Series("node_load5", (), wire.MetricType.GAUGE, (T0,), (2.0,)),))
    status, body = srv.post(wire.with_table(other.tables[1], frame))
    assert (status, body["result"], body["seq"]) == (400, "malformed", 1)
    assert "not the one it names" in body["error"]
    # A body that starts as a table but holds no whole table and frame.
    for broken in (a.tables[1], a.tables[1][:30], a.tables[1][:-1] + frame[:10]):
        status, body = srv.post(broken)
        assert (status, body["result"]) == (400, "malformed"), body
    assert _rows(srv.data_dir, "SELECT COUNT(*) FROM batches") == [(0,)]
    assert _rows(srv.data_dir, "SELECT COUNT(*) FROM series_tables") == [(0,)]
    # Nothing held: the batch alone is still unknown_table; the right table takes it.
    assert srv.post(frame)[0] == 428
    assert srv.post(a.body(1))[1]["result"] == "accepted"


def test_a_table_held_for_another_node_is_unknown_to_this_one(served: tuple[Server, dict[str, V2Node]]) -> None:
    srv, nodes = served
    a, b = nodes["a"], nodes["b"]
    a.data(1)
    assert srv.post(a.body(1))[1]["result"] == "accepted"
    b.data(1)
    assert b.table_id(1) == a.table_id(1)  # the same series: byte for byte the same table
    status, body = srv.post(b.frames[1])
    assert (status, body["result"], body["node"]) == (428, "unknown_table", "b")
    assert srv.post(b.body(1))[1]["result"] == "accepted"
    assert sorted(_rows(srv.data_dir, "SELECT node FROM series_tables")) == [("a",), ("b",)]


def test_tables_come_back_from_the_ledger_after_a_restart(tmp_path: Path) -> None:
    config = _config(tmp_path)
    a = V2Node("a")
    _enroll(tmp_path / "d", config, a)
    srv = start_server(tmp_path / "d", config)
    try:
        a.data(1)
        assert srv.post(a.body(1))[1]["result"] == "accepted"
        assert srv.post(a.data(2, value=2.0))[1]["result"] == "accepted"
    finally:
        assert srv.stop() == 0
    srv = start_server(tmp_path / "d", config)
    try:
        assert _load(srv.metrics(), "a") == 2.0
        status, body = srv.post(a.data(3, value=3.0))
        assert (status, body["result"]) == (200, "accepted")
        # Killed before any save: the next start replays the v2 batches (tables from the ledger).
        srv.proc.kill()
        srv.proc.wait(20)
    finally:
        if srv.proc.poll() is None:
            srv.stop()
    srv = start_server(tmp_path / "d", config)
    try:
        assert _load(srv.metrics(), "a") == 3.0
        assert srv.post(a.data(4, value=4.0))[1]["result"] == "accepted"
        assert srv.counter("unknown_table") == 0
    finally:
        assert srv.stop() == 0


def test_a_collector_that_lost_its_tables_asks_for_them_again(tmp_path: Path) -> None:
    config = _config(tmp_path)
    a = V2Node("a")
    _enroll(tmp_path / "d", config, a)
    srv = start_server(tmp_path / "d", config)
    try:
        a.data(1)
        assert srv.post(a.body(1))[1]["result"] == "accepted"
    finally:
        assert srv.stop() == 0
    _write(tmp_path / "d", ("DELETE FROM series_tables", ()))
    srv = start_server(tmp_path / "d", config)
    try:
        status, body = srv.post(a.data(2, value=2.0))
        assert (status, body["result"], body["complete_through"]) == (428, "unknown_table", 1)
        assert srv.post(a.body(2))[1]["result"] == "accepted"
        assert _rows(srv.data_dir, "SELECT table_id FROM series_tables") == [(a.table_id(2),)]
        assert srv.post(a.data(3, value=3.0))[1]["result"] == "accepted"
        assert _load(srv.metrics(), "a") == 3.0
    finally:
        assert srv.stop() == 0


def test_v1_and_v2_nodes_interleaved_are_all_taken_and_exposed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    old, new = V1Node("old"), V2Node("new")
    _enroll(tmp_path / "d", config, old, new)
    srv = start_server(tmp_path / "d", config)
    try:
        for seq in range(1, 6):
            assert srv.post(old.data(seq, value=float(seq)))[1]["result"] == "accepted"
            frame = new.data(seq, value=10.0 + seq)
            assert srv.post(new.body(1) if seq == 1 else frame)[1]["result"] == "accepted"
        # A table sent with a v1 batch is refused: a v1 batch names none.
        status, body_json = srv.post(wire.with_table(new.tables[1], old.data(6)))
        assert (status, body_json["result"]) == (400, "malformed")
        m = srv.metrics()
        assert _load(m, "old") == 5.0 and _load(m, "new") == 15.0
        assert m[("node_network_receive_bytes_total", (("device", "eth0"), ("node", "new"), ("site", SITE)))] == 5000
        nodes = srv.nodes()
        assert nodes[(SITE, "old")]["complete_through"] == 5 and nodes[(SITE, "new")]["complete_through"] == 5
        assert _rows(srv.data_dir, "SELECT COUNT(*) FROM batches WHERE table_id IS NOT NULL") == [(5,)]
    finally:
        assert srv.stop() == 0
    r = run_cli(tmp_path / "d", config, "audit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 series tables" in r.stdout


def test_the_forwarder_sends_v2_batches_with_their_original_timestamps(tmp_path: Path) -> None:
    receiver = Receiver()
    node = V2Node("n1")
    target = f'[[remote_write]]\nname = "rx"\nurl = "{receiver.url}"\nsamples_per_request = 8\n'
    c = ForwardingCollector(tmp_path, target)
    try:
        c.enroll(SITE, node.name, node.pubkey)
        c.start()
        for seq in range(1, 11):
            node.data(seq, value=float(seq))
            assert c.post(node.body(seq) if seq == 1 else node.frames[seq]) == 200
        want = set()
        for seq in range(1, 11):
            for s in node.series(seq, float(seq)):
                if s.name == "node_load1":
                    labels = tuple(sorted({"__name__": s.name, "site": SITE, "node": "n1"}.items()))
                    want.update((labels, ts, v) for ts, v in zip(s.timestamps_ms, s.values, strict=True))
        wait_for(lambda: receiver.points("node_load1") >= want, 30, "node_load1 at the receiver")
        assert receiver.points("node_load1") == want
        wait_for(lambda: c.metric("waystation_remote_write_samples_total", target="rx") == 10 * 3, 10,
                 "samples counted")
    finally:
        c.stop()
        receiver.close()


def test_audit_proves_a_v2_ledger_and_names_a_missing_or_altered_table(tmp_path: Path) -> None:
    config = _config(tmp_path)
    a = V2Node("a")
    _enroll(tmp_path / "d", config, a)
    srv = start_server(tmp_path / "d", config)
    try:
        a.data(1)
        assert srv.post(a.body(1))[1]["result"] == "accepted"
        assert srv.post(a.data(2))[1]["result"] == "accepted"
        a.builder = wire.TableBuilder(zstd_level=3)
        a.data(3, extra=(wire.Series("node_load5", (), wire.MetricType.GAUGE, (T0,), (2.0,)),))
        assert srv.post(a.body(3))[1]["result"] == "accepted"
    finally:
        assert srv.stop() == 0
    r = run_cli(tmp_path / "d", config, "audit", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["tables"] == 2 and summary["data_batches"] == 3 and summary["clean"]

    _write(tmp_path / "d", ("DELETE FROM series_tables WHERE table_id = ?", (a.table_id(1),)))
    r = run_cli(tmp_path / "d", config, "audit")
    assert r.returncode != 0
    assert f"{SITE}/a seq 1: missing_table:" in r.stdout and f"{SITE}/a seq 2: missing_table:" in r.stdout, r.stdout
    assert "seq 3: missing_table" not in r.stdout
    assert "chain_break" not in r.stdout  # signatures and links are still proven

    altered = bytearray(a.tables[3])
    altered[-1] ^= 0x01
    _write(tmp_path / "d", ("UPDATE series_tables SET blob = ? WHERE table_id = ?", (bytes(altered), a.table_id(3))))
    r = run_cli(tmp_path / "d", config, "audit")
    assert r.returncode != 0
    assert f"{SITE}/a: table_mismatch:" in r.stdout, r.stdout
    assert f"{SITE}/a seq 3: missing_table:" in r.stdout


def _bundle(node: V2Node, items: list[tuple[str, int]], path: Path) -> Path:
    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    for what, seq in items:
        if what == "table":
            w.add_table(node.tables[seq])
        else:
            w.add(node.frames[seq])
    w.finish(node.key, node.site, node.name, T0)
    path.write_bytes(buf.getvalue())
    return path


def test_a_bundle_with_table_records_imports_directly_and_through_serve(tmp_path: Path) -> None:
    collector = harness.Collector(tmp_path / "collector")
    a, b = V2Node("a", site="lab"), V2Node("b", site="lab")
    for n in (a, b):
        collector.enroll(n.site, n.name, n.pubkey)
        n.data(1)
        n.data(2)
        n.builder = wire.TableBuilder(zstd_level=3)  # a fresh table from seq 3 on
        n.data(3, extra=(wire.Series("node_load5", (), wire.MetricType.GAUGE, (T0,), (2.0,)),))
        n.data(4)
    assert a.table_id(3) != a.table_id(1)
    # The second table lies after a frame that names it: the first pass finds it all the same.
    path = _bundle(a, [("table", 1), ("frame", 1), ("frame", 2), ("frame", 3), ("table", 3), ("frame", 4)],
                   tmp_path / "a.wsb")
    r = collector.cli("import", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lab/a: 4 accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout
    assert "a.wsb: 4 frames, intact (2 series tables)" in r.stdout, r.stdout
    assert sorted(collector.ledger_rows("SELECT table_id FROM series_tables WHERE node = 'a'")) == sorted(
        [(a.table_id(1),), (a.table_id(3),)])
    # Again: all duplicates, nothing refused.
    r = collector.cli("import", str(path))
    assert "lab/a: 0 accepted, 4 duplicates, 0 refused" in r.stdout, r.stdout

    # Through a running serve; seq 3-4's table is missing from the bundle and the ledger.
    path = _bundle(b, [("table", 1), ("frame", 1), ("frame", 2), ("frame", 3), ("frame", 4)], tmp_path / "b.wsb")
    collector.start()
    try:
        r = collector.cli("import", str(path))
        assert "imported through serve" in r.stdout, r.stdout
        assert r.returncode != 0
        assert "lab/b: 2 accepted, 0 duplicates, 2 refused" in r.stdout, r.stdout
        assert "refused seq 3 (b.wsb" in r.stdout and ": unknown_table: " in r.stdout, r.stdout
        # The table in a later bundle admits them.
        fix = _bundle(b, [("table", 3), ("frame", 3), ("frame", 4)], tmp_path / "b2.wsb")
        r = collector.cli("import", str(fix))
        assert r.returncode == 0 and "lab/b: 2 accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout
        metrics = collector.metrics()
        assert 'node_load5{node="b",site="lab"} 2.0' in metrics, metrics
    finally:
        collector.stop()
    r = collector.cli("audit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 series tables" in r.stdout


def test_named_table_id_reads_the_id_a_v2_frame_names(tmp_path: Path) -> None:
    a = V2Node("a")
    a.data(1)
    assert named_table_id(a.frames[1], None) == a.table_id(1)
    assert named_table_id(V1Node("x").data(1), None) is None
    assert named_table_id(b"junk", None) is None


def test_pruning_deletes_a_table_only_when_no_stored_batch_names_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        a = V2Node("a")
        record = trust.enroll(ledger.conn, SITE, "a", bytes(a.key.verify_key))
        store = LedgerTables(ledger.conn, LIMITS)

        def commit(seq: int, attach: bool) -> str:
            opened = wire.open_batch(a.frames[seq], lambda k: trust.lookup(ledger.conn, k), LIMITS,
                                     series_tables=store, attached_table=a.tables[seq] if attach else None)
            assert isinstance(opened, wire.VerifiedBatch), opened
            (outcome,) = ledger.commit([Submission(opened.frame, record, 1.0, table=opened.table)])
            return outcome.result

        a.data(1)
        a.data(2)
        assert commit(1, True) == "accepted"
        assert commit(2, False) == "accepted"
        first = store.get(SITE, "a", a.table_id(1))
        assert first is not None and first.durable
        a.builder = wire.TableBuilder(zstd_level=3)
        a.data(3, extra=(wire.Series("node_load5", (), wire.MetricType.GAUGE, (T0,), (2.0,)),))
        assert commit(3, True) == "accepted"

        def tables() -> list[bytes]:
            return sorted(bytes(r[0]) for r in ledger.conn.execute("SELECT table_id FROM series_tables"))

        assert tables() == sorted([a.table_id(1), a.table_id(3)])
        pruned = ledger.prune(time.time() + 10, 1.0, 0, [])
        assert (pruned.batches, pruned.tables) == (2, 1)  # seqs 1-2 and their table; seq 3 is the newest
        assert tables() == [a.table_id(3)]
        # A batch that names the deleted table, verified against the durable object still in
        # the cache (a backlog that arrives late): the table goes into the ledger with it.
        late = V2Node("a")
        late.key, late.frames, late.builder = a.key, {3: a.frames[3]}, wire.TableBuilder(zstd_level=3)
        late.data(4)
        assert late.table_id(4) == a.table_id(1)
        opened = wire.open_batch(late.frames[4], lambda k: trust.lookup(ledger.conn, k), LIMITS,
                                 series_tables=store)
        assert isinstance(opened, wire.VerifiedBatch) and opened.table is first and first.durable
        (outcome,) = ledger.commit([Submission(opened.frame, record, 2.0, table=opened.table)])
        assert outcome.result == "accepted"
        assert tables() == sorted([a.table_id(1), a.table_id(3)])
        # A v2 data batch without its table is never recorded.
        late.data(5)
        frame5 = wire.parse_frame(late.frames[5])
        (outcome,) = ledger.commit([Submission(frame5, record, 3.0)])
        assert outcome.result == "malformed" and "series table" in outcome.detail
    finally:
        ledger.close()


def test_a_ledger_from_before_series_tables_is_audited_as_it_is_and_migrated_on_open(tmp_path: Path) -> None:
    from collector import audit
    from tests.unit.test_ledger import Chain

    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    try:
        key = SigningKey.generate()
        record = trust.enroll(ledger.conn, SITE, "old", bytes(key.verify_key))
        chain = Chain(key, SITE, "old")
        subs = [Submission(wire.parse_frame(chain.data(seq)), record, 1.0) for seq in (1, 2)]
        assert [o.result for o in ledger.commit(subs)] == ["accepted", "accepted"]
    finally:
        ledger.close()
    # The layout before this change: no series_tables, no table_id column, no index on it.
    _write(tmp_path, ("DROP INDEX batches_by_table", ()), ("ALTER TABLE batches DROP COLUMN table_id", ()),
           ("DROP TABLE series_tables", ()))
    found: list[audit.Finding] = []
    summary = audit.audit(path, on_finding=found.append)
    assert (found, summary.batches, summary.tables, summary.clean) == ([], 2, 0, True)
    ledger = Ledger(path)
    try:
        columns = {str(r[1]) for r in ledger.conn.execute("PRAGMA table_info(batches)")}
        assert "table_id" in columns
        names = {str(r[0]) for r in ledger.conn.execute("SELECT name FROM sqlite_master")}
        assert {"series_tables", "batches_by_table"} <= names
        assert ledger.conn.execute("SELECT COUNT(*) FROM batches WHERE table_id IS NULL").fetchone() == (2,)
    finally:
        ledger.close()
