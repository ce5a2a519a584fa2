"""Air-gap bundles with real processes: `waystation-agent export` / `import-receipt`,
`waystation-collector import` into a stopped ledger and into a running `serve`."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import time
import urllib.request
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

import wire
from agent.spool import Spool
from tests.integration.harness import Agent, Collector, wait_for
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
    """The collector holds a different batch at the same seq (a reinstalled node): refused
    as a conflict, and the receipt does not name it."""
    collector = Collector(tmp_path / "collector")
    agent = airgapped(tmp_path, collector)
    agent.start()
    wait_for(lambda: len(spool_seqs(agent)) >= 2, 30, "batches in the spool")
    agent.stop()
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
            assert c.post(first) == 200
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
            spool = Spool(agent.state_dir / "spool.db", readonly=True)
            frames = [wire.parse_frame(f) for _, f in spool.unacknowledged()]
            spool.close()
            want = set()
            for f in frames:
                if f.header.kind != wire.Kind.DATA:
                    continue
                raw = wire.decompress_payload(f, 1 << 26, wire.unseal(f.payload, sealing))
                for series in wire.decode_series(raw):
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


def _bundle_of(frames: list[bytes], key: SigningKey, site: str, node: str, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    for f in frames:
        w.add(f)
    w.finish(key, site, node, 1)
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
