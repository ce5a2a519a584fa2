"""The signed store-and-forward spine end to end: real agent and collector processes."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import wire
from tests.integration.harness import Agent, Collector, serve_page, wait_for

FAST = """
[summary]
window = "1s"
[sources.system]
interval = "1s"
"""


def _scrape(name: str, url: str, interval: str = "1s") -> str:
    return f'[[sources.scrape]]\nname = "{name}"\nurl = "{url}"\ninterval = "{interval}"\n'


def _pair(tmp_path: Path, extra: str) -> tuple[Collector, Agent]:
    collector = Collector(tmp_path / "collector")
    agent = Agent(tmp_path, collector.url, extra_toml=extra)
    collector.enroll(agent.site, agent.node, agent.keygen())
    return collector, agent


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def _node(collector: Collector) -> dict[str, object]:
    nodes = collector.nodes()
    return nodes[0] if nodes else {}


def _ledger(collector: Collector) -> list[tuple[int, int, int, bytes]]:
    """(seq, kind, sample_count, frame) of every batch the collector holds, by seq."""
    return [
        (r[0], r[1], r[2], r[3])
        for r in collector.ledger_rows(
            "SELECT seq, kind, sample_count, frame FROM batches ORDER BY seq"
        )
    ]


def _receipts(rows: list[tuple[int, int, int, bytes]]) -> list[wire.DropReceipt]:
    out = []
    for _, kind, _, frame in rows:
        if kind == wire.Kind.DROP_RECEIPT:
            f = wire.parse_frame(frame)
            out.append(wire.decode_drop_receipt(wire.decompress_payload(f, 1 << 20)))
    return out


def _assert_accounted(rows: list[tuple[int, int, int, bytes]]) -> set[int]:
    """Every seq up to the highest is either held or covered by a drop receipt, never both."""
    held = {r[0] for r in rows}
    dropped = {s for rc in _receipts(rows) for a, b in rc.ranges for s in range(a, b + 1)}
    assert not held & dropped, f"seqs both delivered and reported dropped: {sorted(held & dropped)}"
    missing = set(range(1, max(held) + 1)) - held - dropped
    assert not missing, f"seq gap without a drop receipt: {sorted(missing)[:20]}"
    return dropped


def test_node_metrics_appear_with_site_and_node(tmp_path: Path, shared_fixtures: Path) -> None:
    page = (shared_fixtures / "metrics" / "vllm.prom").read_bytes()
    with serve_page(page) as url:
        collector, agent = _pair(tmp_path, FAST + _scrape("vllm", url))
        collector.start()
        agent.start()
        try:
            def fleet() -> list[tuple[str, dict[str, str], float]]:
                return [s for s in _samples(collector.metrics())
                        if s[1].get("site") == "lab" and s[1].get("node") == "node-1"]

            def has_both() -> bool:
                names = {(n, lb.get("job")) for n, lb, _ in fleet()}
                return ("node_load1", None) in names and any(
                    n.startswith("vllm:") and job == "vllm" for n, job in names
                )

            wait_for(has_both, 30, "system and scraped series at the collector")
            load = [v for n, lb, v in fleet() if n == "node_load1"]
            assert len(load) == 1 and load[0] >= 0
            with open("/proc/loadavg") as fh:
                assert abs(load[0] - float(fh.read().split()[0])) < 5
            # The scraped page's own series keep their names and labels, plus job.
            scraped = {(n, lb.get("model_name")) for n, lb, _ in fleet() if lb.get("job") == "vllm"}
            page_names = {(n, lb.get("model_name")) for n, lb, _ in _samples(page.decode())
                          if not n.endswith("_created")}
            assert page_names & scraped
            node = _node(collector)
            assert node["site"] == "lab" and node["node"] == "node-1"
            last_seen = [v for n, lb, v in _samples(collector.metrics())
                         if n == "waystation_node_last_seen_timestamp_seconds"
                         and lb.get("node") == "node-1"]
            assert last_seen and abs(last_seen[0] - time.time()) < 30
        finally:
            agent.stop()
            collector.stop()


def test_outage_then_newest_first_and_every_window_once(tmp_path: Path) -> None:
    collector, agent = _pair(tmp_path, FAST + '[spool]\nmax_bytes = "64MiB"\n')
    collector.start()
    agent.start()
    try:
        wait_for(lambda: (_node(collector).get("complete_through") or 0) >= 2, 30, "first acks")
        collector.stop()
        outage_started = time.time()
        wait_for(lambda: agent.status()["pending_batches"] >= 8, 60, "a backlog during the outage")
        backlog = agent.status()
        assert backlog["last_error"], "the outage is reported in status"
        restarted = time.time()
        collector.start()
        first = wait_for(
            lambda: collector.ledger_rows(
                "SELECT seq, created_wall_ms, received_at FROM batches "
                "WHERE created_wall_ms >= ? ORDER BY received_at, seq LIMIT 1",
                (int(outage_started * 1000),),
            ),
            30, "a batch after the restart",
        )[0]
        # The newest window arrives first (or at worst one signed while it was in flight),
        # a few seconds after the collector came back, whatever the backlog.
        made_before = collector.ledger_rows(
            "SELECT MAX(seq) FROM batches WHERE created_wall_ms < ?", (int(restarted * 1000),)
        )[0][0]
        assert first[0] >= made_before - 1, (first, made_before)
        assert first[0] > backlog["collector_complete_through"] + 4
        wait_for(lambda: agent.status()["pending_batches"] <= 1, 60, "the backlog to drain")
        node = wait_for(lambda: (n := _node(collector)) and
                        n["complete_through"] == n["highest_seq"] and n, 30, "no gaps")
        rows = _ledger(collector)
        dropped = _assert_accounted(rows)
        assert not dropped
        assert [r[0] for r in rows] == list(range(1, int(node["highest_seq"]) + 1))
        text = collector.metrics()
        conflicts = [v for n, lb, v in _samples(text)
                     if n == "waystation_ingest_batches_total" and lb["result"] == "conflict"]
        assert sum(conflicts) == 0
    finally:
        agent.stop()
        collector.stop()


def test_sigkill_storm_leaves_no_unexplained_gap_or_conflict(tmp_path: Path,
                                                             shared_fixtures: Path) -> None:
    page = (shared_fixtures / "metrics" / "triton.prom").read_bytes()
    with serve_page(page) as url:
        extra = ('[summary]\nwindow = "300ms"\n[sources.system]\ninterval = "300ms"\n'
                 + _scrape("triton", url, "300ms"))
        collector, agent = _pair(tmp_path, extra)
        collector.start()
        rng = random.Random(20261123)
        try:
            for _ in range(22):
                agent.start()
                time.sleep(rng.uniform(0.6, 2.0))
                agent.kill()
            agent.start()
            signed = agent.status()["next_seq"] - 1
            wait_for(lambda: (_node(collector).get("complete_through") or 0) >= signed, 60,
                     f"collector complete through seq {signed}")
        finally:
            agent.stop()
        try:
            rows = _ledger(collector)
            assert len(rows) >= signed
            _assert_accounted(rows)
            for seq, _, _, frame in rows:
                prev = rows[seq - 2][3] if seq > 1 and rows[seq - 2][0] == seq - 1 else None
                if prev is not None:
                    assert wire.parse_frame(frame).header.prev_hash == wire.batch_hash(prev)
            results = {lb["result"]: v for n, lb, v in _samples(collector.metrics())
                       if n == "waystation_ingest_batches_total"}
            assert results.get("conflict", 0) == 0 and results.get("chain_mismatch", 0) == 0
            assert results.get("accepted", 0) >= signed
        finally:
            collector.stop()


def test_tiny_quota_outage_is_accounted_exactly(tmp_path: Path, shared_fixtures: Path) -> None:
    page = (shared_fixtures / "metrics" / "node_exporter.prom").read_bytes()
    with serve_page(page) as url:
        extra = ('[spool]\nmax_bytes = "64KiB"\n[summary]\nwindow = "500ms"\n'
                 '[sources.system]\nenabled = false\n' + _scrape("node", url, "500ms"))
        collector, agent = _pair(tmp_path, extra)
        agent.start()  # the collector is down from the start
        try:
            wait_for(lambda: agent.status().get("dropped_batches", 0) >= 5, 90,
                     "the spool quota to evict batches")
            collector.start()
            wait_for(lambda: any(r[1] == wire.Kind.DROP_RECEIPT for r in _ledger(collector)), 30,
                     "a drop receipt at the collector")
        finally:
            agent.stop()
        # Drain what is left with every source off, then stop: the spool keeps its counters.
        drain = Agent(tmp_path, collector.url, extra_toml=(
            '[spool]\nmax_bytes = "64KiB"\n[summary]\nwindow = "500ms"\n'
            '[sources.system]\nenabled = false\n'))
        drain.start()
        try:
            wait_for(lambda: drain.status()["pending_batches"] == 0, 60, "the spool to drain")
        finally:
            drain.stop()
        metrics = _samples(collector.metrics())
        collector.stop()
        spool = sqlite3.connect(drain.state_dir / "spool.db")
        produced = dict(spool.execute("SELECT key, value FROM meta").fetchall())["produced_samples"]
        unsent = spool.execute("SELECT COALESCE(SUM(samples), 0) FROM batches").fetchone()[0]
        spool.close()
        rows = _ledger(collector)
        dropped_seqs = _assert_accounted(rows)
        receipts = _receipts(rows)
        assert dropped_seqs and sum(rc.batches for rc in receipts) == len(dropped_seqs)
        delivered = sum(r[2] for r in rows if r[1] == wire.Kind.DATA)
        dropped = sum(rc.samples for rc in receipts)
        assert delivered + dropped + unsent == produced
        reported = [v for n, lb, v in metrics
                    if n == "waystation_node_dropped_samples_total" and lb.get("node") == "node-1"]
        assert reported == [dropped]


def test_reinstalled_spool_never_reuses_a_seq(tmp_path: Path) -> None:
    """The node's spool is wiped (reinstall, lost disk): the new one continues the chain."""
    collector, agent = _pair(tmp_path, FAST)
    collector.start()
    try:
        agent.start()
        wait_for(lambda: (_node(collector).get("complete_through") or 0) >= 3, 30, "first acks")
        agent.stop()
        before = _node(collector)["highest_seq"]
        for leftover in agent.state_dir.glob("spool.db*"):
            leftover.unlink()
        collector.stop()  # the new spool starts offline and signs batches from seq 1 meanwhile
        agent.start()
        wait_for(lambda: agent.status().get("next_seq", 0) >= 4, 30, "batches in the new spool")
        collector.start()
        wait_for(lambda: (n := _node(collector)) and n["highest_seq"] >= before + 3
                 and n["complete_through"] == n["highest_seq"], 30, "the resumed chain")
        rows = _ledger(collector)
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
        for prev, cur in zip(rows, rows[1:], strict=False):
            assert wire.parse_frame(cur[3]).header.prev_hash == wire.batch_hash(prev[3])
        results = {lb["result"]: v for n, lb, v in _samples(collector.metrics())
                   if n == "waystation_ingest_batches_total"}
        assert results.get("conflict", 0) == 0 and results.get("chain_mismatch", 0) == 0
    finally:
        agent.stop()
        collector.stop()


def test_agent_delivers_over_tls_with_its_ca_file(tmp_path: Path) -> None:
    """An https collector with a private CA: the agent verifies it through uplink.ca_file."""
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem"), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    config = tls / "collector.toml"
    config.write_text(f'tls_cert = "{tls / "cert.pem"}"\ntls_key = "{tls / "key.pem"}"\n')
    collector = Collector(tmp_path / "collector", config=config, scheme="https", host="localhost")
    agent = Agent(tmp_path, collector.url, extra_toml=FAST,
                  uplink_toml=f'ca_file = "{tls / "cert.pem"}"\n')
    collector.enroll(agent.site, agent.node, agent.keygen())
    collector.start()
    agent.start()
    try:
        wait_for(lambda: (_node(collector).get("complete_through") or 0) >= 2, 30, "acks over TLS")
    finally:
        agent.stop()
    # Without the CA the agent refuses the collector's certificate and keeps its data.
    stranger = Agent(tmp_path / "stranger", collector.url, extra_toml=FAST, node="node-2")
    collector.enroll(stranger.site, stranger.node, stranger.keygen())
    stranger.start()
    try:
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in stranger.log.read_text(), 30, "a TLS refusal")
        wait_for(lambda: stranger.status()["pending_batches"] >= 2, 30, "data kept in the spool")
        assert not [n for n in collector.nodes() if n["node"] == "node-2" and n["highest_seq"]]
    finally:
        stranger.stop()
        collector.stop()


def test_one_rotation_is_pending_at_a_time(tmp_path: Path) -> None:
    """Checked with no agent running: a running one may take the first rotation at any moment."""
    agent = Agent(tmp_path, "http://127.0.0.1:9", extra_toml=FAST)
    agent.keygen()
    assert agent.cli("rotate-key").returncode == 0
    second = agent.cli("rotate-key")
    assert second.returncode == 1 and "already pending" in second.stderr and "node.key.next" in second.stderr


def test_key_rotation_while_running(tmp_path: Path) -> None:
    """rotate-key: the running agent announces the new key in its chain, signed by the old one,
    switches to it, and the collector takes it from that batch without an enroll step."""
    collector, agent = _pair(tmp_path, FAST)
    collector.start()
    agent.start()
    try:
        wait_for(lambda: (_node(collector).get("complete_through") or 0) >= 2, 30, "first acks")
        old_key = agent.state_dir.joinpath("node.key").read_bytes()
        r = agent.cli("rotate-key")
        assert r.returncode == 0, r.stderr
        new_id = r.stdout.split()[2]

        def rotated() -> dict[str, object] | None:
            node = _node(collector)
            states = {k["key_id"]: k for k in node.get("keys", [])}  # type: ignore[union-attr]
            return node if new_id in states and len(states) == 2 else None

        node = wait_for(rotated, 30, "the collector to learn the new key")
        assert agent.state_dir.joinpath("node.key").read_bytes() != old_key
        assert not agent.state_dir.joinpath("node.key.next").exists()
        after = int(node["highest_seq"])  # type: ignore[call-overload]
        wait_for(lambda: (n := _node(collector)) and n["complete_through"] >= after + 3
                 and n["complete_through"] == n["highest_seq"], 30, "batches signed by the new key")
        rows = _ledger(collector)
        rotation = [r for r in rows if r[1] == wire.Kind.KEY_ROTATION]
        assert len(rotation) == 1
        later = [wire.parse_frame(r[3]).header.key_id.hex() for r in rows if r[0] > rotation[0][0]]
        assert later and set(later) == {new_id}
        results = {lb["result"]: v for n, lb, v in _samples(collector.metrics())
                   if n == "waystation_ingest_batches_total"}
        assert results.get("revoked", 0) == 0 and results.get("conflict", 0) == 0
    finally:
        agent.stop()
        collector.stop()
