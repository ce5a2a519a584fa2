"""Air-gap bundles with real processes: `waystation-agent export` / `import-receipt`,
`waystation-collector import` into a stopped ledger and into a running `serve`."""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

import wire
from agent.spool import Spool
from tests.integration.harness import ENV, Agent, Collector, data_series, wait_for
from tests.integration.test_remote_write_forwarding import Collector as ForwardingCollector
from tests.integration.test_remote_write_forwarding import Receiver
from wire import bundle
from wire.keys import public_key_text

pytestmark = pytest.mark.timeout(240)

FAST = '[summary]\nwindow = "1s"\n[sources.system]\ninterval = "1s"\n'
DEAD = "http://127.0.0.1:9"  # the uplink points at nothing: an air-gapped node


def keygen(collector: Collector) -> str:
    r = collector.cli("keygen")
    assert r.returncode == 0, r.stderr
    (line,) = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("collector_key = ")]
    return line


def spool_seqs(agent: Agent) -> list[int]:
    if not (agent.state_dir / "spool.db").exists():
        return []
    spool = Spool(agent.state_dir / "spool.db", readonly=True)
    try:
        return [seq for seq, _ in spool.unacknowledged()]
    except sqlite3.OperationalError:  # the agent is creating it
        return []
    finally:
        spool.close()


def airgapped(tmp_path: Path, collector: Collector, sealed: bool = True) -> Agent:
    uplink = keygen(collector) + "\n" if sealed else ""
    agent = Agent(tmp_path / "node", DEAD, extra_toml=FAST, uplink_toml=uplink)
    collector.enroll(agent.site, agent.node, agent.keygen())
    return agent


def test_export_import_receipt_round_trip_empties_the_spool(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    agent = airgapped(tmp_path, collector)
    agent.start()
    try:
        wait_for(lambda: len(spool_seqs(agent)) >= 3, 30, "three batches in the spool")
        # Export while the agent runs: a snapshot; the agent goes on sampling.
        out = tmp_path / "node-1.wsb"
        r = agent.cli("export", "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert re.search(r"wrote .*: \d+ batches, seq 1-\d+, \d+ bytes", r.stdout), r.stdout
        assert stat.S_IMODE(out.stat().st_mode) == 0o600  # like the spool it comes from
        exported = int(re.search(r"seq 1-(\d+)", r.stdout).group(1))  # type: ignore[union-attr]
        assert spool_seqs(agent)[:exported] == list(range(1, exported + 1))  # still there
        # Import with serve stopped, straight into the ledger.
        receipt = tmp_path / "receipt.wsr"
        r = collector.cli("import", str(out), "--receipt-out", str(receipt))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"lab/node-1: {exported} accepted, 0 duplicates, 0 refused" in r.stdout
        rows = collector.ledger_rows("SELECT seq, origin, origin_file FROM batches ORDER BY seq")
        assert rows == [(s, "bundle", "node-1.wsb") for s in range(1, exported + 1)]
        # The receipt, applied while the agent runs, deletes exactly what was exported.
        r = agent.cli("import-receipt", str(receipt))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"deleted {exported} batches" in r.stdout
        left = spool_seqs(agent)
        assert left and min(left) > exported
    finally:
        agent.stop()
    # Stopped agent: the rest goes the same way, and the spool is empty.
    out2 = tmp_path / "node-1b.wsb"
    assert agent.cli("export", "--out", str(out2)).returncode == 0
    receipt2 = tmp_path / "receipt2.wsr"
    r = collector.cli("import", str(out2), str(out), "--receipt-out", str(receipt2))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{exported} duplicates" in r.stdout  # the first bundle again: counted once
    assert agent.cli("import-receipt", str(receipt2)).returncode == 0
    assert spool_seqs(agent) == []
    assert agent.status()["pending_batches"] == 0
    # Audit re-proves the imported ledger; provenance names the bundle.
    r = collector.cli("audit")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_forged_foreign_or_replayed_receipt_deletes_nothing(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    agent = airgapped(tmp_path, collector)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= 2, 30, "batches in the spool")
    agent.stop()
    out, receipt = tmp_path / "b.wsb", tmp_path / "r.wsr"
    assert agent.cli("export", "--out", str(out)).returncode == 0
    assert collector.cli("import", str(out), "--receipt-out", str(receipt)).returncode == 0
    before = spool_seqs(agent)
    # Forged: one byte of the signed part changed.
    raw = bytearray(receipt.read_bytes())
    raw[40] ^= 0x01
    forged = tmp_path / "forged.wsr"
    forged.write_bytes(bytes(raw))
    r = agent.cli("import-receipt", str(forged))
    assert r.returncode == 1 and "nothing" in r.stderr, r.stderr
    assert spool_seqs(agent) == before
    # Signed by another collector key.
    other = Collector(tmp_path / "other")
    keygen(other)
    other.enroll(agent.site, agent.node, public_key_text(bytes(SigningKey.generate().verify_key)))
    from collector import keyring

    pair = keyring.current(other.data_dir)
    assert pair is not None
    fake = bundle.encode_receipt(pair.signing, pair.key_id, 99, 0, "lab", "node-1", b"", 99, [(1, 99)],
                                 [(s, b"\0" * 32) for s in before])
    (tmp_path / "fake.wsr").write_bytes(bundle.encode_receipt_file([fake]))
    r = agent.cli("import-receipt", str(tmp_path / "fake.wsr"))
    assert r.returncode == 1 and "pins" in r.stderr, r.stderr
    # Foreign: a genuine receipt for another node.
    pin = keyring.current(collector.data_dir)
    assert pin is not None
    frames = {s: f for s, f in zip(before, [b""] * len(before), strict=True)}
    foreign = bundle.encode_receipt(pin.signing, pin.key_id, 1000, 0, "lab", "node-2", b"", 5, [(1, 5)],
                                    [(s, b"\0" * 32) for s in frames])
    (tmp_path / "foreign.wsr").write_bytes(bundle.encode_receipt_file([foreign]))
    r = agent.cli("import-receipt", str(tmp_path / "foreign.wsr"))
    assert r.returncode == 1 and "no receipt for this node lab/node-1" in r.stderr and "lab/node-2" in r.stderr
    assert spool_seqs(agent) == before
    # Genuine, then replayed.
    assert agent.cli("import-receipt", str(receipt)).returncode == 0
    assert spool_seqs(agent) == []
    r = agent.cli("import-receipt", str(receipt))
    assert r.returncode == 1 and "replayed" in r.stderr
    # Without a pinned collector key the agent refuses, saying so.
    unpinned = Agent(tmp_path / "unpinned", DEAD)
    r = unpinned.cli("import-receipt", str(receipt))
    assert r.returncode == 1 and "collector_key" in r.stderr


def test_a_receipt_never_deletes_a_batch_the_collector_does_not_hold(tmp_path: Path) -> None:
    """The collector holds a different batch at the same seq: refused as a conflict, and the
    receipt does not name it. (The spool is placed first: an unplaced spool's bundle would be
    refused whole, see the reinstalled-node tests.)"""
    collector = Collector(tmp_path / "collector")
    agent = airgapped(tmp_path, collector)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= 2, 30, "batches in the spool")
    agent.stop()
    placing = tmp_path / "placing.wsr"
    assert collector.cli("receipt", "--site", "lab", "--node", "node-1", "--out", str(placing)).returncode == 0
    r = agent.cli("import-receipt", str(placing))
    assert r.returncode == 0 and "numbering from seq 1 stands" in r.stdout, r.stdout + r.stderr
    assert not resume_needed(agent)
    from agent import keys as agent_keys

    node_key = agent_keys.load(agent.state_dir / "node.key")
    series = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (int(time.time() * 1000),), (9.0,))]
    other = wire.encode_data_batch(
        wire.BatchContext(node_key, "lab", "node-1", 1, wire.ZERO_HASH, int(time.time() * 1000), 1, 3), series)
    req = urllib.request.Request(f"{collector.url}/v1/batches", data=other, method="POST")
    collector.start()
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        collector.stop()
    out, receipt = tmp_path / "b.wsb", tmp_path / "r.wsr"
    assert agent.cli("export", "--out", str(out)).returncode == 0
    r = collector.cli("import", str(out), "--receipt-out", str(receipt))
    assert r.returncode == 1 and "refused seq 1" in r.stdout and "conflict" in r.stdout, r.stdout
    before = spool_seqs(agent)
    out_import = r.stdout
    r = agent.cli("import-receipt", str(receipt))
    assert r.returncode == 0, r.stderr
    r.stdout = out_import
    refused = {int(m) for m in re.findall(r"refused seq (\d+)", r.stdout)}
    assert {1, 2} <= refused  # 1: other content at that seq; 2: its chain names that other batch
    assert set(spool_seqs(agent)) == refused, "a batch the collector does not hold must stay"
    assert before[:2] == [1, 2]


def spool_frames(agent: Agent) -> dict[int, bytes]:
    spool = Spool(agent.state_dir / "spool.db", readonly=True)
    try:
        return dict(spool.unacknowledged())
    finally:
        spool.close()


def spool_tables(agent: Agent) -> dict[int, bytes]:
    """seq -> the series table (wire v2) each unacknowledged batch names, as the spool holds it."""
    spool = Spool(agent.state_dir / "spool.db", readonly=True)
    try:
        rows = spool.unacknowledged_named()
        try:
            named = [(seq, tid) for seq, _, tid in rows if tid is not None]
            return {seq: blob for seq, tid in named if (blob := spool.table_blob(tid)) is not None}
        finally:
            rows.close()
    finally:
        spool.close()


def resume_needed(agent: Agent) -> bool:
    spool = Spool(agent.state_dir / "spool.db", readonly=True)
    try:
        return spool.resume_needed()
    finally:
        spool.close()


def receipts_in(path: Path) -> list[bundle.Receipt]:
    return [bundle.parse_receipt(item) for item in bundle.parse_receipt_file(path.read_bytes())]


def test_a_reinstalled_air_gapped_node_renumbers_from_a_receipt_and_delivers_everything(tmp_path: Path) -> None:
    """Spool lost, node key kept, no uplink: the new spool's seqs collide until a receipt from
    `waystation-collector receipt` places them above what the collector holds."""
    collector = Collector(tmp_path / "collector")
    agent = airgapped(tmp_path, collector)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= 6, 40, "six batches in the spool")
    agent.stop()
    first = tmp_path / "first.wsb"
    assert agent.cli("export", "--out", str(first)).returncode == 0
    k = len(spool_seqs(agent))
    r = collector.cli("import", str(first), "--receipt-out", str(tmp_path / "r1.wsr"))
    assert r.returncode == 0 and f"lab/node-1: {k} accepted" in r.stdout, r.stdout + r.stderr

    # Reinstalled: the spool is gone, the node key stays; the agent signs new batches offline.
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        (agent.state_dir / name).unlink(missing_ok=True)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= 2, 30, "new batches in the new spool")
    agent.stop()
    m = len(spool_seqs(agent))
    assert spool_seqs(agent) == list(range(1, m + 1)), (m, k)
    new = tmp_path / "new.wsb"
    r = agent.cli("export", "--out", str(new))
    assert r.returncode == 0, r.stderr
    assert "never learned where the collector's chain for lab/node-1 stands" in r.stderr, r.stderr
    assert "waystation-collector receipt --site lab --node node-1 --out FILE" in r.stderr
    r = collector.cli("import", str(new), "--receipt-out", str(tmp_path / "r2.wsr"))
    assert r.returncode == 1 and f"lab/node-1: 0 accepted, 0 duplicates, {m} refused" in r.stdout, r.stdout
    # The bundle says its spool was never placed, and it is not the chain the collector holds:
    # refused whole, none committed, each refusal naming the fix.
    hint = "run `waystation-agent import-receipt` with it on the node (it renumbers)"
    for seq in range(1, m + 1):
        assert re.search(rf"refused seq {seq} \(new.wsb, byte \d+\): unplaced_spool: .*{re.escape(hint)}",
                         r.stdout), r.stdout
    assert collector.ledger_rows("SELECT seq FROM batches ORDER BY seq") == [(s,) for s in range(1, k + 1)]

    # A forged receipt and one for another node place nothing and delete nothing.
    collector.enroll("lab", "node-2", public_key_text(bytes(SigningKey.generate().verify_key)))
    other = tmp_path / "node-2.wsr"
    r = collector.cli("receipt", "--site", "lab", "--node", "node-2", "--out", str(other))
    assert r.returncode == 0 and "no batch held yet" in r.stdout, r.stdout + r.stderr
    fresh = tmp_path / "fresh.wsr"
    r = collector.cli("receipt", "--site", "lab", "--node", "node-1", "--out", str(fresh))
    assert r.returncode == 0 and f"chain head seq {k}" in r.stdout, r.stdout + r.stderr
    raw = bytearray(fresh.read_bytes())
    raw[9 + 4 + 53] ^= 0x01  # the head hash (file header, length, then the receipt's offset 53)
    forged = tmp_path / "forged.wsr"
    forged.write_bytes(bytes(raw))
    before = spool_frames(agent)
    for bad, why in ((forged, "signature does not verify"), (other, "no receipt for this node lab/node-1")):
        r = agent.cli("import-receipt", str(bad))
        assert r.returncode == 1 and why in r.stderr and "renumbered" not in r.stdout, r.stdout + r.stderr
        assert spool_frames(agent) == before and resume_needed(agent)

    # The genuine receipt renumbers the new spool above the collector's head.
    r = agent.cli("import-receipt", str(fresh))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"renumbered {m} unsent batches to follow seq {k} that the collector holds" in r.stdout, r.stdout
    assert spool_seqs(agent) == list(range(k + 1, k + m + 1)) and not resume_needed(agent)
    again = tmp_path / "again.wsb"
    r = agent.cli("export", "--out", str(again))
    assert r.returncode == 0 and "never learned" not in r.stderr, r.stderr
    r = collector.cli("import", str(again), "--receipt-out", str(tmp_path / "r3.wsr"))
    assert r.returncode == 0 and f"lab/node-1: {m} accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout
    r = agent.cli("import-receipt", str(tmp_path / "r3.wsr"))
    assert r.returncode == 0 and f"deleted {m} batches" in r.stdout, r.stdout + r.stderr
    assert spool_seqs(agent) == []

    # One unbroken chain 1..k+m, and audit proves it from the ledger's own bytes.
    rows = collector.ledger_rows("SELECT seq, hash, prev_hash FROM batches ORDER BY seq")
    assert [row[0] for row in rows] == list(range(1, k + m + 1))
    assert rows[0][2] == wire.ZERO_HASH and all(b[2] == a[1] for a, b in zip(rows, rows[1:], strict=False))
    r = collector.cli("audit", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    # Every receipt signed is recorded, byte for byte, in the order issued.
    issued = [*receipts_in(tmp_path / "r1.wsr"), *receipts_in(tmp_path / "r2.wsr"), *receipts_in(other),
              *receipts_in(fresh), *receipts_in(tmp_path / "r3.wsr")]
    recorded = collector.ledger_rows(
        "SELECT receipt_no, site, node, head_seq, complete_through, bundles, receipt FROM receipts_issued "
        "ORDER BY receipt_no")
    assert recorded == [(x.receipt_no, x.site, x.node, x.head_seq, x.complete_through, len(x.bundles),
                         x.signed_part + x.signature) for x in issued]
    assert [x.head_seq for x in issued] == [k, k, 0, k, k + m] and [len(x.bundles) for x in issued] == [1, 1, 0, 0, 1]
    assert json.loads(r.stdout)["summary"]["receipts_issued"] == len(issued)


def test_receipt_command_errors_and_numbers_beside_a_running_serve(tmp_path: Path) -> None:
    """No ledger, no collector key, unknown node: each named. With serve running, concurrent
    `receipt` commands never share a number, and a ledger from before receipts_issued
    gains the table."""
    collector = Collector(tmp_path / "collector")
    out = tmp_path / "r.wsr"
    r = collector.cli("receipt", "--site", "lab", "--node", "n1", "--out", str(out))
    assert r.returncode == 1 and "no ledger here" in r.stderr, r.stderr
    collector.enroll("lab", "n1", public_key_text(bytes(SigningKey.generate().verify_key)))
    r = collector.cli("receipt", "--site", "lab", "--node", "n1", "--out", str(out))
    assert r.returncode == 1 and "no collector key" in r.stderr and "waystation-collector keygen" in r.stderr
    keygen(collector)
    r = collector.cli("receipt", "--site", "lab", "--node", "ghost", "--out", str(out))
    assert r.returncode == 1 and "unknown node lab/ghost" in r.stderr and "lab/n1" in r.stderr, r.stderr
    assert not out.exists()
    # A ledger written before receipts_issued existed.
    db = sqlite3.connect(collector.data_dir / "ledger.db")
    db.execute("DROP TABLE receipts_issued")
    db.close()
    collector.start()
    try:
        tables = collector.ledger_rows("SELECT name FROM sqlite_master WHERE name = 'receipts_issued'")
        assert tables == [("receipts_issued",)]  # serve's start brought the old ledger up to date
        # Dropped again under the running serve: `receipt` opens the ledger without the schema
        # step, so it must create the table itself.
        db = sqlite3.connect(collector.data_dir / "ledger.db")
        db.execute("DROP TABLE receipts_issued")
        db.close()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "collector", "receipt", "--site", "lab", "--node", "n1", "--out",
             str(tmp_path / f"r{i}.wsr"), "--data-dir", str(collector.data_dir)],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    finally:
        collector.stop()
    numbers = sorted(receipts_in(tmp_path / f"r{i}.wsr")[0].receipt_no for i in range(6))
    assert len(set(numbers)) == 6
    assert [n for (n,) in collector.ledger_rows("SELECT receipt_no FROM receipts_issued ORDER BY 1")] == numbers


def test_import_into_a_running_serve_shows_on_metrics_and_goes_to_remote_write(tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        c = ForwardingCollector(tmp_path, f'[[remote_write]]\nname = "rx"\nurl = "{receiver.url}"\n')
        agent = airgapped(tmp_path, c, sealed=True)
        agent.start()
        wait_for(lambda: len(spool_seqs(agent)) >= 3, 30, "batches in the spool")
        agent.stop()
        out, receipt = tmp_path / "b.wsb", tmp_path / "r.wsr"
        assert agent.cli("export", "--out", str(out)).returncode == 0
        seqs = spool_seqs(agent)
        c.start()
        try:
            # One batch also came over HTTP: a duplicate at import, counted once.
            spool = Spool(agent.state_dir / "spool.db", readonly=True)
            first = next(f for s, f in spool.unacknowledged() if s == 1)
            spool.close()
            assert c.post(wire.with_table(spool_tables(agent).get(1), first)) == 200
            r = c.cli("import", str(out), "--receipt-out", str(receipt))
            assert r.returncode == 0, r.stdout + r.stderr
            assert "imported through serve at http://127.0.0.1:" in r.stdout, r.stdout
            assert f"lab/node-1: {len(seqs) - 1} accepted, 1 duplicates, 0 refused" in r.stdout, r.stdout
            names = {s.name for fam in text_string_to_metric_families(c.metrics()) for s in fam.samples
                     if s.labels.get("node") == "node-1"}
            assert "node_load1" in names
            accepted = [s.value for fam in text_string_to_metric_families(c.metrics()) for s in fam.samples
                        if s.name == "waystation_ingest_batches_total" and s.labels.get("result") == "accepted"]
            assert accepted == [float(len(seqs))]
            wait_for(lambda: receiver.points("node_load1"), 60, "node_load1 at the remote-write receiver")
            # Every node_load1 sample the bundle carried arrives, at its original timestamp.
            from collector import keyring

            sealing = keyring.load_sealing_keys(keyring.sealing_key_files(c.data_dir))
            tables = {wire.table_id(t): t for t in spool_tables(agent).values()}
            want = set()
            for frame in spool_frames(agent).values():
                if wire.parse_frame(frame).header.kind != wire.Kind.DATA:
                    continue
                for series in data_series(frame, tables.get, sealing):
                    if series.name == "node_load1":
                        want.update(zip(series.timestamps_ms, series.values, strict=True))
            assert want
            wait_for(lambda: {(ts, v) for _, ts, v in receiver.points("node_load1")} >= want, 60,
                     "every node_load1 sample at the receiver")
            rows = c.ledger_rows("SELECT origin, COUNT(*) FROM batches GROUP BY origin ORDER BY origin")
            assert rows == [("bundle", len(seqs) - 1), ("http", 1)]
        finally:
            c.stop()
        assert agent.cli("import-receipt", str(receipt)).returncode == 0
        assert spool_seqs(agent) == []
    finally:
        receiver.close()


def test_hostile_bundles_keep_the_frames_that_verify_and_name_the_rest(tmp_path: Path) -> None:
    """Through the CLI, serve stopped: a bit-flipped payload, a cut length, a bundle of
    another node spliced in, and a frame over max_body_bytes."""
    config = tmp_path / "collector.toml"
    config.write_text('[limits]\nmax_body_bytes = "1KiB"\n')
    collector = Collector(tmp_path / "collector", config=config)
    key = SigningKey.generate()
    collector.enroll("lab", "n1", public_key_text(bytes(key.verify_key)))
    keygen(collector)
    fs, prev = [], wire.ZERO_HASH
    for seq in range(1, 7):
        n = 200 if seq == 4 else 1  # seq 4 is over 1 KiB
        ts = (1_700_000_000_000 + seq,)
        series = [wire.Series(f"m{i}", (("k", os.urandom(16).hex()),), wire.MetricType.GAUGE, ts, (float(seq),))
                  for i in range(n)]
        fs.append(wire.encode_data_batch(wire.BatchContext(key, "lab", "n1", seq, prev, 1, seq, 0), series))
        prev = wire.batch_hash(fs[-1])
    import io

    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    for f in fs:
        w.add(f)
    w.finish(key, "lab", "n1", 1)
    raw = bytearray(buf.getvalue())
    raw[raw.index(fs[1]) + len(fs[1]) - 70] ^= 0x01  # seq 2: a payload bit
    raw[raw.index(fs[4]) - 4] ^= 0x20  # seq 5: its record length
    path = tmp_path / "hostile.wsb"
    path.write_bytes(bytes(raw))
    receipt = tmp_path / "r.wsr"
    r = collector.cli("import", str(path), "--receipt-out", str(receipt), "--config", str(config))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "lab/n1: 3 accepted, 0 duplicates, 1 refused" in r.stdout, r.stdout  # 1, 3, 6
    assert "refused seq 2 (hostile.wsb, byte" in r.stdout and "bad_signature" in r.stdout
    assert "too_large" in r.stdout and "exceeds max_body_bytes 1024" in r.stdout
    assert "seq 4-5 listed in the manifest but not in the bundle" in r.stdout
    assert "seq 2 differs from what the manifest lists" in r.stdout
    assert collector.ledger_rows("SELECT seq FROM batches ORDER BY seq") == [(1,), (3,), (6,)]
    # The receipt names exactly what is held.
    (item,) = bundle.parse_receipt_file(receipt.read_bytes())
    rc = bundle.parse_receipt(item)
    assert [s for s, _ in rc.batches] == [1, 3, 6] and rc.complete_through == 1 and rc.held == ((1, 1), (3, 3), (6, 6))


def _bundle_of(frames: list[bytes], key: SigningKey, site: str, node: str, path: Path, unplaced: bool = False,
               tables: Sequence[bytes | None] = ()) -> Path:
    """A bundle of these frames; tables[i], the series table frame i names (wire v2), goes in
    ahead of the first frame naming it, as export writes it."""
    import io

    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    written: set[bytes] = set()
    for f, table in itertools.zip_longest(frames, tables[:len(frames)]):
        if table is not None and table not in written:
            w.add_table(table)
            written.add(table)
        w.add(f)
    w.finish(key, site, node, 1, unplaced=unplaced)
    path.write_bytes(buf.getvalue())
    return path


def test_a_key_rotation_inside_a_bundle_admits_the_frames_signed_with_the_new_key(tmp_path: Path) -> None:
    """data, data, rotation, data (new key), data (new key): all five, serve stopped and running."""
    from tests.unit.test_ledger import Chain

    collector = Collector(tmp_path / "collector")
    keygen(collector)
    paths = []
    for node in ("n1", "n2"):
        old, new = SigningKey.generate(), SigningKey.generate()
        collector.enroll("lab", node, public_key_text(bytes(old.verify_key)))
        chain = Chain(old, "lab", node)
        fs = [chain.data(1), chain.data(2), chain.rotation(3, new), chain.data(4, key=new), chain.data(5, key=new)]
        paths.append(_bundle_of(fs, new, "lab", node, tmp_path / f"{node}.wsb"))
    r = collector.cli("import", str(paths[0]), "--receipt-out", str(tmp_path / "r1.wsr"))
    assert r.returncode == 0 and "lab/n1: 5 accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout + r.stderr
    collector.start()
    try:
        r = collector.cli("import", str(paths[1]), "--receipt-out", str(tmp_path / "r2.wsr"))
    finally:
        collector.stop()
    assert "imported through serve" in r.stdout, r.stdout
    assert r.returncode == 0 and "lab/n2: 5 accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout + r.stderr


def test_a_seq_pruned_by_retention_is_not_named_held_in_the_receipt(tmp_path: Path) -> None:
    """A reinstalled node reuses seqs 1..K; where the collector's batch at that seq left the
    archive it cannot tell whether it held these bytes, so the receipt must not say it did."""
    from collector.ledger import Ledger
    from tests.unit.test_ledger import Chain

    collector = Collector(tmp_path / "collector")
    keygen(collector)
    key = SigningKey.generate()
    collector.enroll("lab", "n1", public_key_text(bytes(key.verify_key)))
    first = Chain(key, "lab", "n1")
    old = _bundle_of([first.data(s) for s in (1, 2, 3)], key, "lab", "n1", tmp_path / "old.wsb")
    assert collector.cli("import", str(old), "--receipt-out", str(tmp_path / "r0.wsr")).returncode == 0
    ledger = Ledger(collector.data_dir / "ledger.db")
    try:
        assert ledger.prune(time.time() + 10, 1.0, 0, []).batches == 2  # seqs 1-2; the newest stays
    finally:
        ledger.close()
    fresh = Chain(key, "lab", "n1")  # the reinstalled node's own chain: other bytes at seqs 1-2
    new = _bundle_of([fresh.data(s, value=7.0) for s in (1, 2)], key, "lab", "n1", tmp_path / "new.wsb")
    receipt = tmp_path / "r.wsr"
    r = collector.cli("import", str(new), "--receipt-out", str(receipt))
    assert "lab/n1: 0 accepted, 0 duplicates, 0 refused, 2 recorded before and since pruned" in r.stdout, r.stdout
    (item,) = bundle.parse_receipt_file(receipt.read_bytes())
    assert bundle.parse_receipt(item).batches == ()


# ---------------------------------------------------------------------------- unplaced spools


def bundle_size(frames: list[bytes], site: str, node: str, tables: Sequence[bytes | None] = ()) -> int:
    """The size of a bundle of exactly these frames (and the series tables they name, each
    once): as --max-bytes, export writes them and no more."""
    distinct = {t for t in tables if t is not None}
    return (len(bundle.BUNDLE_HEADER) + sum(bundle.RECORD_OVERHEAD + len(f) for f in frames)
            + sum(bundle.RECORD_OVERHEAD + len(t) for t in distinct)
            + bundle.RECORD_OVERHEAD + bundle.manifest_len(len(frames), site, node))


def node_key(agent: Agent) -> SigningKey:
    from agent import keys as agent_keys

    return agent_keys.load(agent.state_dir / "node.key")


def refusals(stdout: str) -> list[tuple[int, str]]:
    return [(int(seq), result) for seq, result in re.findall(r"refused seq (\d+) \([^)]*\): (\w+): ", stdout)]


def reinstalled_offline(tmp_path: Path, past_head: int) -> tuple[Collector, Agent, int]:
    """A node delivered seqs 1..K by bundle, then lost its spool (its key kept) and signed
    at least K + past_head new batches offline, numbered from 1 again. Returns the stopped
    agent and K."""
    collector = Collector(tmp_path / "collector")
    agent = airgapped(tmp_path, collector)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= 3, 30, "three batches in the spool")
    agent.stop()
    first = tmp_path / "old.wsb"
    assert agent.cli("export", "--out", str(first)).returncode == 0
    k = len(spool_seqs(agent))
    r = collector.cli("import", str(first))
    assert r.returncode == 0 and f"lab/node-1: {k} accepted" in r.stdout, r.stdout + r.stderr
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        (agent.state_dir / name).unlink(missing_ok=True)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= k + past_head, 40, f"{k + past_head} batches in the new spool")
    agent.stop()
    assert resume_needed(agent) and spool_seqs(agent) == list(range(1, len(spool_seqs(agent)) + 1))
    return collector, agent, k


def test_a_reinstalled_nodes_bundle_past_the_collectors_head_is_refused_whole_until_it_renumbers(
        tmp_path: Path) -> None:
    """The new spool's seqs 1..K collide with the old chain, K + 1 names another prev_hash, and
    K + 2 on have nothing recorded next to them: without the manifest's UNPLACED flag those
    were accepted, splicing the new chain onto the old one. Refused whole, through a running
    serve; the import's own receipt renumbers the node, and everything then arrives."""
    collector, agent, k = reinstalled_offline(tmp_path, 3)
    m = len(spool_seqs(agent))
    before = collector.ledger_rows("SELECT seq, hash, prev_hash, origin_file FROM batches ORDER BY seq")
    assert [row[0] for row in before] == list(range(1, k + 1))
    new = tmp_path / "new.wsb"
    r = agent.cli("export", "--out", str(new))
    assert r.returncode == 0 and "refuses this whole bundle (unplaced_spool)" in r.stderr, r.stderr
    receipt = tmp_path / "r-new.wsr"
    collector.start()
    try:
        r = collector.cli("import", str(new), "--receipt-out", str(receipt))
    finally:
        collector.stop()
    assert r.returncode == 1 and "imported through serve" in r.stdout, r.stdout + r.stderr
    assert f"lab/node-1: 0 accepted, 0 duplicates, {m} refused" in r.stdout, r.stdout
    assert refusals(r.stdout) == [(s, "unplaced_spool") for s in range(1, m + 1)], r.stdout
    assert f"the collector holds seq 1-{k} of an earlier one" in r.stdout
    assert "new.wsb: " + str(m) + " frames, intact" in r.stdout  # the manifest itself is fine
    assert collector.ledger_rows("SELECT seq, hash, prev_hash, origin_file FROM batches ORDER BY seq") == before
    # The node proved itself with its manifest: a receipt naming no batch, carrying the head.
    (answer,) = receipts_in(receipt)
    assert (answer.head_seq, answer.head_hash, answer.batches, len(answer.bundles)) == (k, before[-1][1], (), 1)

    r = agent.cli("import-receipt", str(receipt))
    assert r.returncode == 0 and f"renumbered {m} unsent batches to follow seq {k}" in r.stdout, r.stdout + r.stderr
    assert "deleted 0 batches" in r.stdout
    assert spool_seqs(agent) == list(range(k + 1, k + m + 1)) and not resume_needed(agent)
    again = tmp_path / "again.wsb"
    r = agent.cli("export", "--out", str(again))
    assert r.returncode == 0 and "never learned" not in r.stderr, r.stderr
    r = collector.cli("import", str(again), "--receipt-out", str(tmp_path / "r-again.wsr"))
    assert r.returncode == 0 and f"lab/node-1: {m} accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout
    r = agent.cli("import-receipt", str(tmp_path / "r-again.wsr"))
    assert r.returncode == 0 and f"deleted {m} batches" in r.stdout, r.stdout + r.stderr
    assert spool_seqs(agent) == []
    rows = collector.ledger_rows("SELECT seq, hash, prev_hash FROM batches ORDER BY seq")
    assert [row[0] for row in rows] == list(range(1, k + m + 1))
    assert rows[0][2] == wire.ZERO_HASH and all(b[2] == a[1] for a, b in zip(rows, rows[1:], strict=False))
    r = collector.cli("audit")
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_unplaced_spools_later_bundle_imported_alone_commits_nothing(tmp_path: Path) -> None:
    """The reinstalled node's batches in two bundles (export --max-bytes): the second alone
    starts above the collector's head + 1, where nothing recorded tells whether it continues
    that chain (`unplaced_gap`); the first collides with it (`unplaced_spool`). Neither
    commits a frame; the receipt still places the node."""
    collector, agent, k = reinstalled_offline(tmp_path, 4)
    frames, tables = spool_frames(agent), spool_tables(agent)
    m, j = len(frames), k + 2  # the first bundle ends at K + 2; the second starts at K + 3
    first = tmp_path / "first.wsb"
    size = bundle_size([frames[s] for s in range(1, j + 1)], "lab", "node-1", [tables.get(s) for s in range(1, j + 1)])
    r = agent.cli("export", "--out", str(first), "--max-bytes", str(size))
    assert r.returncode == 0 and f"seq 1-{j}," in r.stdout, r.stdout + r.stderr
    assert f"{m - j} newer unacknowledged batches did not fit" in r.stdout, r.stdout
    # What the node's next bundle holds once these left its spool: export writes the oldest
    # first, so only a bundle built here can carry the rest alone.
    second = _bundle_of([frames[s] for s in range(j + 1, m + 1)], node_key(agent), "lab", "node-1",
                        tmp_path / "second.wsb", unplaced=True, tables=[tables.get(s) for s in range(j + 1, m + 1)])
    before = collector.ledger_rows("SELECT seq, hash FROM batches ORDER BY seq")
    receipt = tmp_path / "r.wsr"
    r = collector.cli("import", str(second), "--receipt-out", str(receipt))
    assert r.returncode == 1 and f"lab/node-1: 0 accepted, 0 duplicates, {m - j} refused" in r.stdout, r.stdout
    assert refusals(r.stdout) == [(s, "unplaced_gap") for s in range(j + 1, m + 1)], r.stdout
    assert f"this bundle starts at seq {j + 1}, past the collector's head seq {k}" in r.stdout
    assert "Import the node's earlier bundle first" in r.stdout
    assert collector.ledger_rows("SELECT seq, hash FROM batches ORDER BY seq") == before
    r = collector.cli("import", str(first))
    assert r.returncode == 1 and refusals(r.stdout) == [(s, "unplaced_spool") for s in range(1, j + 1)], r.stdout
    assert collector.ledger_rows("SELECT seq, hash FROM batches ORDER BY seq") == before
    (answer,) = receipts_in(receipt)
    assert (answer.head_seq, answer.batches) == (k, ())
    r = agent.cli("import-receipt", str(receipt))
    assert r.returncode == 0 and f"renumbered {m} unsent batches to follow seq {k}" in r.stdout, r.stdout + r.stderr


def test_a_brand_new_nodes_unplaced_bundles_import_before_any_receipt_comes_back(tmp_path: Path) -> None:
    """A node that never sent before: its spool is unplaced too, and its bundles are taken.
    The first (nothing held yet), a second export (it repeats what the collector holds), and
    a later bundle that starts at the collector's head + 1 and names that head's hash."""
    collector = Collector(tmp_path / "collector")
    agent = airgapped(tmp_path, collector)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= 4, 30, "four batches in the spool")
    agent.stop()
    frames, tables = spool_frames(agent), spool_tables(agent)
    n = len(frames)
    assert resume_needed(agent)
    first, whole = tmp_path / "first.wsb", tmp_path / "whole.wsb"
    size = bundle_size([frames[1], frames[2]], "lab", "node-1", [tables.get(1), tables.get(2)])
    r = agent.cli("export", "--out", str(first), "--max-bytes", str(size))
    assert r.returncode == 0 and "seq 1-2," in r.stdout, r.stdout + r.stderr
    assert agent.cli("export", "--out", str(whole)).returncode == 0  # no receipt back yet: 1..n again
    later = _bundle_of([frames[s] for s in range(3, n + 1)], node_key(agent), "lab", "node-1",
                       tmp_path / "later.wsb", unplaced=True, tables=[tables.get(s) for s in range(3, n + 1)])
    r = collector.cli("import", str(first), "--receipt-out", str(tmp_path / "r1.wsr"))
    assert r.returncode == 0 and "lab/node-1: 2 accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout
    # The first bundle's receipt is not applied: the later bundle follows the head it left.
    collector.start()
    try:
        r = collector.cli("import", str(later), "--receipt-out", str(tmp_path / "r2.wsr"))
    finally:
        collector.stop()
    assert "imported through serve" in r.stdout, r.stdout
    assert r.returncode == 0 and f"lab/node-1: {n - 2} accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout
    # The second export repeats batches the collector holds.
    r = collector.cli("import", str(whole), "--receipt-out", str(tmp_path / "r3.wsr"))
    assert r.returncode == 0 and f"lab/node-1: 0 accepted, {n} duplicates, 0 refused" in r.stdout, r.stdout
    assert collector.ledger_rows("SELECT seq FROM batches ORDER BY seq") == [(s,) for s in range(1, n + 1)]
    r = agent.cli("import-receipt", str(tmp_path / "r1.wsr"))
    assert r.returncode == 0 and "is this spool's own: nothing to renumber" in r.stdout, r.stdout + r.stderr
    assert "deleted 2 batches" in r.stdout and not resume_needed(agent)
    r = agent.cli("import-receipt", str(tmp_path / "r3.wsr"))
    assert r.returncode == 0 and f"deleted {n - 2} batches" in r.stdout and spool_seqs(agent) == [], r.stdout
    assert collector.cli("audit").returncode == 0
