"""Sealed payloads end to end: real collector and agent processes, the remote-write child."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

import wire
from tests.integration.harness import Agent, Collector, plaintext_hits, serve_page, wait_for
from tests.integration.test_remote_write_forwarding import Collector as ForwardingCollector
from tests.integration.test_remote_write_forwarding import Receiver
from wire.keys import CollectorKey, parse_collector_key

pytestmark = pytest.mark.timeout(180)

PROBE_VALUE = "sealing-probe-7c1e"  # a label value only the scraped page carries
PAGE = f'# TYPE ws_sealing_probe gauge\nws_sealing_probe{{secret="{PROBE_VALUE}"}} 1\n'.encode()
FAST = '[summary]\nwindow = "1s"\n[sources.system]\ninterval = "1s"\n'


def keygen(collector: Collector) -> str:
    r = collector.cli("keygen")
    assert r.returncode == 0, r.stderr
    (line,) = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("collector_key = ")]
    return line


def fleet(collector: Collector) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for fam in text_string_to_metric_families(collector.metrics())
            for s in fam.samples if s.labels.get("node") == "node-1"]


def test_a_sealing_agent_is_read_by_the_collector_and_its_spool_holds_no_plaintext(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    pin_line = keygen(collector)
    with serve_page(PAGE) as url:
        agent = Agent(tmp_path, collector.url, uplink_toml=pin_line + "\n",
                      extra_toml=FAST + f'[[sources.scrape]]\nname = "probe"\nurl = "{url}"\ninterval = "1s"\n')
        collector.enroll(agent.site, agent.node, agent.keygen())
        collector.start()
        agent.start()
        try:
            def both() -> bool:
                got = fleet(collector)
                return any(n == "node_cpu_seconds_total" for n, _ in got) and any(
                    n == "ws_sealing_probe" and lb.get("secret") == PROBE_VALUE for n, lb in got)

            wait_for(both, 60, "the sealing agent's system and scraped series at the collector")
            # Every data batch the collector holds arrived sealed; control batches need not.
            frames = [wire.parse_frame(bytes(f)) for (f,) in collector.ledger_rows("SELECT frame FROM batches")]
            data = [f for f in frames if f.header.kind == wire.Kind.DATA]
            assert data and all(f.header.flags == wire.FLAG_SEALED for f in data)
            # The spool and its WAL, read while the agent runs (after batches went through them).
            spool = agent.state_dir / "spool.db"
            wait_for(lambda: agent.status()["acked_batches"] >= 3, 30, "three acks")
            blob = spool.read_bytes() + spool.with_name("spool.db-wal").read_bytes()
            assert len(blob) > 8192
            assert plaintext_hits(blob, (b"node_cpu_seconds_total", b"ws_sealing_probe", PROBE_VALUE.encode(),
                                         b"node_load1")) == set()
        finally:
            agent.stop()
    # The start-up rebuild opens the sealed batches too: the node's series are back at once.
    collector.stop()
    collector.start()
    try:
        names = {n for n, _ in fleet(collector)}
        assert {"node_cpu_seconds_total", "ws_sealing_probe"} <= names
    finally:
        collector.stop()


def test_check_config_names_a_bad_collector_key(tmp_path: Path) -> None:
    agent = Agent(tmp_path, "http://127.0.0.1:9", uplink_toml='collector_key = "wsc1:00:AAAA"\n')
    r = agent.cli("check-config")
    assert r.returncode == 2 and "collector_key" in r.stderr and "uplink" in r.stderr


# ---------------------------------------------------------------- the forwarder child

T0 = int(time.time() * 1000) - 3_600_000


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def post(url: str, frame: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"{url}/v1/batches", data=frame, method="POST",
                                 headers={"Content-Type": "application/x-waystation-batch"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_forwarder_child_forwards_sealed_batches_and_ingest_names_a_foreign_key(
    tmp_path: Path, receiver: Receiver
) -> None:
    c = ForwardingCollector(tmp_path, f'[[remote_write]]\nname = "rx"\nurl = "{receiver.url}"\n')
    pin = parse_collector_key(keygen(c).split('"')[1])
    node = SigningKey.generate()
    c.enroll("s1", "n1", wire.keys.public_key_text(bytes(node.verify_key)))
    c.start()
    try:
        prev, want = wire.ZERO_HASH, set()
        for seq in range(1, 6):
            ts = T0 + seq * 10_000
            s = [wire.Series("node_load1", (("probe", PROBE_VALUE),), wire.MetricType.GAUGE, (ts,), (seq / 4,))]
            frame = wire.sign_batch(wire.seal_prepared(wire.prepare_data(s, 3), pin),
                                    wire.BatchContext(node, "s1", "n1", seq, prev, ts, seq))
            assert post(c.url, frame)[0] == 200
            prev = wire.batch_hash(frame)
            labels = (("__name__", "node_load1"), ("node", "n1"), ("probe", PROBE_VALUE), ("site", "s1"))
            want.add((labels, ts, seq / 4))
        wait_for(lambda: receiver.points("node_load1") >= want, 30, "the sealed samples at the receiver")
        assert receiver.points("node_load1") == want
        # Sealed to a collector key this one does not hold: refused, named, counted, retryable.
        foreign = CollectorKey(bytes(SigningKey.generate().verify_key), bytes(PrivateKey.generate().public_key))
        s = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (T0 + 60_000,), (1.0,))]
        frame = wire.sign_batch(wire.seal_prepared(wire.prepare_data(s, 3), foreign),
                                wire.BatchContext(node, "s1", "n1", 6, prev, T0 + 60_000, 6))
        status, body = post(c.url, frame)
        assert (status, body["result"]) == (421, "sealed_to_unknown_key")
        assert foreign.key_id.hex() in str(body["error"]) and body["seq"] == 6
        assert c.metric("waystation_ingest_batches_total", result="sealed_to_unknown_key") == 1
    finally:
        c.stop()
