"""The collector as a real process on loopback: every ingest outcome, its status, JSON and counter."""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import zstandard
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

import wire

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SITE = "s1"
T0 = int(time.time() * 1000) - 3_600_000
MAX_BODY = 1024 * 1024
MAX_RAW = 8 * 1024 * 1024
CONFIG = f"""
listen = "127.0.0.1:9480"
log_level = "warning"

[limits]
max_body_bytes = "{MAX_BODY}"
max_decompressed_bytes = "{MAX_RAW}"
max_series_per_node = 50
"""

pytestmark = pytest.mark.timeout(120)


def run_cli(data_dir: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args, "--config", str(config), "--data-dir", str(data_dir)],
        env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    data_dir: Path
    config: Path

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname and parts.port
        return parts.hostname, parts.port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection(*self.host_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def post(self, frame: bytes) -> tuple[int, dict[str, Any]]:
        status, body, headers = self.request(
            "POST", "/v1/batches", frame, {"Content-Type": "application/x-waystation-batch"}
        )
        assert headers["content-type"].startswith("application/json"), body[:200]
        return status, json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body, _ = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def counter(self, result: str) -> float:
        return self.metrics()[("waystation_ingest_batches_total", (("result", result),))]

    def nodes(self) -> dict[tuple[str, str], dict[str, Any]]:
        status, body, _ = self.request("GET", "/v1/nodes")
        assert status == 200
        return {(n["site"], n["node"]): n for n in json.loads(body)}

    def rss_kib(self, field: str = "VmRSS") -> int:
        """serve's figure, plus its front processes' when it has them."""
        return sum(proc_kib(pid, field) for pid in [self.proc.pid, *front_pids(self.proc.pid)])

    def largest_rss_kib(self) -> int:
        """The largest RSS of serve and its front processes."""
        return max(proc_kib(pid, "VmRSS") for pid in [self.proc.pid, *front_pids(self.proc.pid)])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def front_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children
            if b"collector.fronts" in Path(f"/proc/{c}/cmdline").read_bytes()]


def start_server(data_dir: Path, config: Path) -> Server:
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--config", str(config),
         "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                url = line.split("listening on ")[1].split()[0]
                return Server(proc, url, data_dir, config)
        elif proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"collector did not start: {proc.stderr.read() if proc.stderr else ''}")


class Node:
    """A node's key and chain, signing batches the way the agent does."""

    def __init__(self, name: str, site: str = SITE) -> None:
        self.key = SigningKey.generate()
        self.site, self.name = site, name
        self.frames: dict[int, bytes] = {}

    @property
    def pubkey(self) -> str:
        return base64.b64encode(bytes(self.key.verify_key)).decode()

    def data(self, seq: int, value: float = 1.0, ts: int | None = None,
             extra: tuple[wire.Series, ...] = ()) -> bytes:
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        ts = T0 + seq * 60_000 if ts is None else ts
        series = [*extra,
            wire.Series("node_load1", (("site", self.site), ("node", self.name)),
                        wire.MetricType.GAUGE, (ts - 10_000, ts), (value / 2, value)),
            wire.Series("node_network_receive_bytes_total", (("device", "eth0"),),
                        wire.MetricType.COUNTER, (ts,), (1000.0 * seq,)),
            wire.Series("waystation_agent_spool_pending_batches", (), wire.MetricType.GAUGE, (ts,), (7.0,)),
            wire.Series("waystation_agent_spool_pending_bytes", (), wire.MetricType.GAUGE, (ts,), (7e6,)),
        ]
        ctx = wire.BatchContext(self.key, self.site, self.name, seq, prev, ts, seq, 3)
        self.frames[seq] = wire.encode_data_batch(ctx, series)
        return self.frames[seq]

    def forge(self, seq: int, payload: bytes, raw_len: int, codec: wire.Codec = wire.Codec.ZSTD) -> bytes:
        """A correctly signed frame around an arbitrary payload (what a hostile node could send)."""
        head = wire.frame._FIXED.pack(
            wire.MAGIC, wire.WIRE_VERSION, wire.Kind.DATA, codec, 0, seq, wire.ZERO_HASH,
            T0, 0, T0, T0, 1, 1, raw_len, len(payload), wire.key_id(bytes(self.key.verify_key)),
        )
        site, node = self.site.encode(), self.name.encode()
        signed = head + bytes([len(site)]) + site + bytes([len(node)]) + node + payload
        return signed + self.key.sign(signed).signature


@pytest.fixture(scope="module")
def nodes() -> dict[str, Node]:
    return {name: Node(name) for name in ("n1", "n2", "n3", "n4", "n5")}


# serve taking every request itself, and serve with two front processes taking them
# (collector/fronts.py): every test here holds for both.
@pytest.fixture(scope="module", params=[0, 2], ids=["serve-alone", "two-fronts"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           nodes: dict[str, Node]) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("collector")
    config = root / "collector.toml"
    config.write_text(f"workers = {request.param}\n" + CONFIG)
    data_dir = root / "data"
    r = run_cli(data_dir, config, "enroll", "--site", SITE, "--node", "n1", "--key", nodes["n1"].pubkey)
    assert r.returncode == 0 and "enrolled key" in r.stdout, r.stderr
    srv = start_server(data_dir, config)
    try:
        # Enrolled while serve runs: must take effect without a restart.
        for name in ("n2", "n3", "n4", "n5"):
            r = run_cli(data_dir, config, "enroll", "--site", SITE, "--node", name, "--key", nodes[name].pubkey)
            assert r.returncode == 0, r.stderr
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def test_accepted_then_duplicate_and_exposed(server: Server, nodes: dict[str, Node]) -> None:
    n1 = nodes["n1"]
    status, body = server.post(n1.data(1, value=0.75))
    assert status == 200
    assert body == {"result": "accepted", "site": SITE, "node": "n1", "seq": 1,
                    "complete_through": 1, "highest_seq": 1}
    status, body = server.post(n1.frames[1])
    assert (status, body["result"], body["complete_through"]) == (200, "duplicate", 1)

    m = server.metrics()
    assert m[("node_load1", (("node", "n1"), ("site", SITE)))] == 0.75
    # The counter keeps its exact name and gains site/node from the batch header.
    assert m[("node_network_receive_bytes_total", (("device", "eth0"), ("node", "n1"), ("site", SITE)))] == 1000.0
    assert m[("waystation_node_complete_through_seq", (("node", "n1"), ("site", SITE)))] == 1
    assert m[("waystation_node_reported_backlog_batches", (("node", "n1"), ("site", SITE)))] == 7
    assert m[("waystation_node_reported_backlog_bytes", (("node", "n1"), ("site", SITE)))] == 7e6
    assert m[("waystation_ingest_batches_total", (("result", "accepted"),))] >= 1
    assert m[("waystation_ingest_batches_total", (("result", "duplicate"),))] >= 1
    assert m[("waystation_ingest_samples_total", ())] >= 5
    _, text, _ = server.request("GET", "/metrics")
    assert b"\nnode_network_receive_bytes_total{" in text
    assert b"# TYPE node_network_receive_bytes_total counter" in text

    info = server.nodes()[(SITE, "n1")]
    assert (info["complete_through"], info["highest_seq"], info["gaps"]["seqs"]) == (1, 1, 0)
    assert info["reported_backlog"] == {"batches": 7.0, "bytes": 7e6}
    assert info["keys"][0]["state"] == "enrolled"


def test_conflicting_duplicate_is_409_and_counted_as_tamper(server: Server, nodes: dict[str, Node]) -> None:
    n2 = nodes["n2"]
    assert server.post(n2.data(1))[0] == 200
    before = server.counter("conflict")
    other = Node("n2")
    other.key = n2.key
    status, body = server.post(other.data(1, value=99.0))
    assert (status, body["result"], body["complete_through"], body["highest_seq"]) == (409, "conflict", 1, 1)
    assert "different content" in body["error"]
    assert server.counter("conflict") == before + 1
    tamper = server.metrics()[("waystation_node_tamper_events_total", (("node", "n2"), ("site", SITE)))]
    assert tamper == 1


def test_chain_mismatch_is_409(server: Server, nodes: dict[str, Node]) -> None:
    n2 = nodes["n2"]
    forked = Node("n2")
    forked.key = n2.key
    forked.frames[1] = Node("n2").data(1)  # not the seq 1 the collector holds
    before = server.counter("chain_mismatch")
    status, body = server.post(forked.data(2))
    assert (status, body["result"]) == (409, "chain_mismatch")
    assert server.counter("chain_mismatch") == before + 1


def test_tampered_byte_is_bad_signature(server: Server, nodes: dict[str, Node]) -> None:
    frame = bytearray(nodes["n1"].data(2))
    frame[-wire.SIGNATURE_LEN - 1] ^= 0x01  # last payload byte
    before = server.counter("bad_signature")
    status, body = server.post(bytes(frame))
    assert (status, body["result"]) == (400, "bad_signature")
    assert "complete_through" not in body  # not proven to be the node: tells it nothing
    assert server.counter("bad_signature") == before + 1


def test_unknown_key_and_foreign_node_are_401(server: Server, nodes: dict[str, Node]) -> None:
    before = server.counter("unknown_key")
    status, body = server.post(Node("n1").data(1))
    assert (status, body["result"]) == (401, "unknown_key")
    impostor = Node("n3")
    impostor.key = nodes["n1"].key  # n1's key claiming to be n3
    status, body = server.post(impostor.data(1))
    assert (status, body["result"]) == (401, "unknown_key")
    assert "enrolled for s1/n1" in body["error"]
    assert server.counter("unknown_key") == before + 2


def test_revoked_key_is_403_while_serving(server: Server, nodes: dict[str, Node]) -> None:
    n4 = nodes["n4"]
    assert server.post(n4.data(1))[0] == 200
    r = run_cli(server.data_dir, server.config, "revoke", "--node", "n4")
    assert r.returncode == 0 and "revoked key" in r.stdout, r.stderr
    before = server.counter("revoked")
    status, body = server.post(n4.data(2))
    assert (status, body["result"]) == (403, "revoked")
    assert server.counter("revoked") == before + 1


def test_oversized_body_is_413_json(server: Server) -> None:
    before = server.counter("too_large")
    status, body = server.post(os.urandom(MAX_BODY + 1))
    assert (status, body["result"]) == (413, "too_large")
    # Without a Content-Length the cap applies while reading.
    conn = http.client.HTTPConnection(*server.host_port, timeout=30)
    try:
        chunks = (b"\0" * 65536 for _ in range(MAX_BODY // 65536 + 2))
        conn.request("POST", "/v1/batches", body=chunks, encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["result"] == "too_large"
    finally:
        conn.close()
    assert server.counter("too_large") == before + 2


def _zeros_bomb(size: int) -> bytes:
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    chunk = bytes(1 << 20)
    parts = [cobj.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(cobj.flush())
    return b"".join(parts)


def test_zstd_bomb_costs_nothing(server: Server, nodes: dict[str, Node]) -> None:
    bomb = _zeros_bomb(1 << 30)  # 1 GiB of zeros
    assert len(bomb) < MAX_BODY
    n5 = nodes["n5"]
    hwm_before = server.rss_kib("VmHWM")
    before = server.counter("too_large"), server.counter("malformed")
    started = time.monotonic()
    # Honest about its size: refused before decompressing anything.
    status, body = server.post(n5.forge(1, bomb, raw_len=1 << 30))
    assert (status, body["result"]) == (413, "too_large")
    # Lying about its size: decompression stops at the declared length.
    status, body = server.post(n5.forge(1, bomb, raw_len=MAX_RAW // 2))
    assert (status, body["result"]) == (400, "malformed")
    assert time.monotonic() - started < 5
    assert (server.counter("too_large"), server.counter("malformed")) == (before[0] + 1, before[1] + 1)
    assert server.rss_kib("VmHWM") - hwm_before < 64 * 1024, "a bomb must not cost memory"
    assert server.largest_rss_kib() < 200 * 1024


@pytest.mark.parametrize(
    "frame",
    [b"", b"garbage", os.urandom(300), b"WSB1\x01" + bytes(200)],
    ids=["empty", "text", "random", "zero-header"],
)
def test_junk_is_400_malformed(server: Server, frame: bytes) -> None:
    before = server.counter("malformed")
    status, body = server.post(frame)
    assert (status, body["result"]) == (400, "malformed")
    assert body["error"]
    assert server.counter("malformed") == before + 1


def test_truncated_and_future_version(server: Server, nodes: dict[str, Node]) -> None:
    frame = nodes["n1"].data(3)
    status, body = server.post(frame[:-10])
    assert (status, body["result"]) == (400, "malformed")
    future = bytearray(frame)
    future[4] = max(wire.WIRE_VERSIONS) + 1  # 2 is wire v2 now: a version no collector speaks yet
    status, body = server.post(bytes(future))
    assert (status, body["result"]) == (400, "unsupported_version")


def test_schema_violations_are_400(server: Server, nodes: dict[str, Node]) -> None:
    n5 = nodes["n5"]
    bad_name = wire.encode_series([wire.Series("bad name{}", (), wire.MetricType.GAUGE, (T0,), (1.0,))])
    status, body = server.post(n5.forge(1, bad_name, len(bad_name), wire.Codec.NONE))
    assert (status, body["result"]) == (400, "schema")
    wrong_counts = wire.encode_series([wire.Series("up", (), wire.MetricType.GAUGE, (T0, T0 + 1), (1.0, 1.0))])
    status, body = server.post(n5.forge(1, wrong_counts, len(wrong_counts), wire.Codec.NONE))
    assert (status, body["result"]) == (400, "schema")


def test_no_input_yields_5xx(server: Server, nodes: dict[str, Node]) -> None:
    rng = random.Random(7)
    n1 = nodes["n1"]
    base = n1.data(3)
    seen = set()
    for _ in range(150):
        frame = bytearray(base)
        op = rng.randrange(4)
        if op == 0:
            for _ in range(rng.randint(1, 4)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        elif op == 1:
            del frame[rng.randrange(len(frame)):]
        elif op == 2:
            frame += os.urandom(rng.randint(1, 64))
        else:
            pos = rng.randrange(wire.FIXED_HEADER_LEN)
            frame[pos] = rng.randrange(256)
        status, body = server.post(bytes(frame))
        assert status < 500, body
        seen.add(body["result"])
    # A mutation that rewrites a byte with its own value leaves the batch intact: duplicate.
    assert seen <= {"malformed", "bad_signature", "unknown_key", "unsupported_version", "too_large", "accepted",
                    "duplicate"}


def test_out_of_order_watermark_and_nodes_cli(server: Server, nodes: dict[str, Node]) -> None:
    n3 = nodes["n3"]
    for seq in range(1, 6):
        n3.data(seq, value=float(seq))
    status, body = server.post(n3.frames[5])  # the live lane sends the newest first
    assert (status, body["complete_through"], body["highest_seq"]) == (200, 0, 5)
    info = server.nodes()[(SITE, "n3")]
    assert info["gaps"] == {"seqs": 4, "ranges": [[1, 4]]}
    for seq in (1, 2, 4):
        assert server.post(n3.frames[seq])[0] == 200
    # Backfilled older windows must not overwrite the fresher latest value.
    assert server.metrics()[("node_load1", (("node", "n3"), ("site", SITE)))] == 5.0
    assert server.metrics()[("waystation_node_gap_seqs", (("node", "n3"), ("site", SITE)))] == 1
    r = run_cli(server.data_dir, server.config, "nodes", "--json")
    assert r.returncode == 0, r.stderr
    listed = {(n["site"], n["node"]): n for n in json.loads(r.stdout)}
    assert listed[(SITE, "n3")]["complete_through"] == 2
    assert listed[(SITE, "n3")]["gaps"]["ranges"] == [[3, 3]]
    status, body = server.post(n3.frames[3])
    assert (status, body["complete_through"]) == (200, 5)
    table = run_cli(server.data_dir, server.config, "nodes")
    assert table.returncode == 0 and "COMPLETE" in table.stdout
    line = next(ln for ln in table.stdout.splitlines() if ln.split()[:2] == [SITE, "n3"])
    assert " 5 " in line and "7 batches" in line


def test_healthz(server: Server) -> None:
    status, body, _ = server.request("GET", "/healthz")
    assert (status, body) == (200, b"ok\n")


def test_restart_keeps_watermark_and_latest_state(tmp_path: Path) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(CONFIG)
    node = Node("r1")
    enrolled = run_cli(tmp_path / "d", config, "enroll", "--site", SITE, "--node", "r1", "--key", node.pubkey)
    assert enrolled.returncode == 0, enrolled.stderr
    srv = start_server(tmp_path / "d", config)
    try:
        assert srv.post(node.data(1, value=3.0))[0] == 200
        assert srv.post(node.data(2, value=4.0))[0] == 200
    finally:
        assert srv.stop() == 0  # SIGTERM is a clean stop
    srv = start_server(tmp_path / "d", config)
    try:
        assert srv.metrics()[("node_load1", (("node", "r1"), ("site", SITE)))] == 4.0
        assert srv.nodes()[(SITE, "r1")]["complete_through"] == 2
        status, body = srv.post(node.frames[2])
        assert (status, body["result"], body["complete_through"]) == (200, "duplicate", 2)
    finally:
        assert srv.stop() == 0


def test_series_sent_now_and_then_survive_a_clean_restart(tmp_path: Path) -> None:
    """A SMART read every 10 minutes is not in the node's newest batch: a clean stop saves
    the latest state and the next start restores it. The save is not used up by that start:
    a crash after it restores it again (tests/integration/test_latest_state_crash.py covers
    a crash with no clean stop before it)."""
    config = tmp_path / "collector.toml"
    config.write_text(CONFIG)
    node = Node("r2")
    assert run_cli(tmp_path / "d", config, "enroll", "--site", SITE, "--node", "r2",
                   "--key", node.pubkey).returncode == 0
    smart = wire.Series("smartctl_device_temperature", (("device", "sda"), ("temperature_type", "current")),
                        wire.MetricType.GAUGE, (T0 + 60_000,), (41.0,))
    temp = ("smartctl_device_temperature",
            (("device", "sda"), ("node", "r2"), ("site", SITE), ("temperature_type", "current")))
    srv = start_server(tmp_path / "d", config)
    try:
        assert srv.post(node.data(1, value=3.0, extra=(smart,)))[0] == 200
        assert srv.post(node.data(2, value=4.0))[0] == 200
        assert srv.metrics()[temp] == 41.0
    finally:
        assert srv.stop() == 0
    srv = start_server(tmp_path / "d", config)
    try:
        m = srv.metrics()
        assert m[temp] == 41.0
        assert m[("node_load1", (("node", "r2"), ("site", SITE)))] == 4.0
    finally:
        srv.proc.kill()
        srv.proc.wait(20)
    srv = start_server(tmp_path / "d", config)
    try:
        m = srv.metrics()
        assert m[temp] == 41.0
        assert m[("node_load1", (("node", "r2"), ("site", SITE)))] == 4.0
    finally:
        assert srv.stop() == 0


def test_config_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('listen = "127.0.0.1:9480"\nlimts = {}\n')
    r = run_cli(tmp_path / "d", config, "nodes")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'limits'" in r.stderr
    config.write_text('listen = "nohost"\n')
    r = run_cli(tmp_path / "d", config, "serve")
    assert r.returncode == 2 and "listen" in r.stderr


def test_tls_on_ipv6_loopback(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
         "-out", str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:::1"],
        check=True, capture_output=True, timeout=60,
    )
    config = tmp_path / "collector.toml"
    config.write_text(f'tls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
         "--listen", "[::1]:0"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("waystation-collector listening on https://[::1]:"), line + proc.stderr.read()
        parts = urlsplit(line.split("listening on ")[1].split()[0])
        ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        conn = http.client.HTTPSConnection("::1", parts.port, context=ctx, timeout=10)
        conn.request("POST", "/v1/batches", body=b"hello")
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["result"]) == (400, "malformed")
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_a_trickling_body_gets_408_and_an_aborted_upload_one_log_line(tmp_path: Path) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(CONFIG.replace('log_level = "warning"', 'log_level = "info"')
                      + 'body_read_timeout = "1s"\n')
    srv = start_server(tmp_path / "data", config)
    try:
        # A sender that announces 1000 bytes and sends 10 cannot hold a slot for ever.
        sock = socket.create_connection(srv.host_port, timeout=10)
        try:
            sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-waystation-batch\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b"\0" * 10)
            started = time.monotonic()
            reply = sock.recv(65536)
            assert time.monotonic() - started < 8
        finally:
            sock.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(body)["result"] == "timeout"
        # A sender whose uplink drops mid-upload.
        sock = socket.create_connection(srv.host_port, timeout=10)
        sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"\1" * 100)
        time.sleep(0.2)
        sock.close()
        assert wait_until(lambda: srv.counter("aborted") == 1, 10)
        assert srv.counter("timeout") == 1
        node = Node("n9")
        r = run_cli(tmp_path / "data", config, "enroll", "--site", SITE, "--node", "n9", "--key", node.pubkey)
        assert r.returncode == 0, r.stderr
        assert srv.post(node.data(1))[0] == 200  # and batches go on being taken
    finally:
        srv.stop()
    assert srv.proc.stderr is not None
    log = srv.proc.stderr.read()
    assert "aborted after 100 bytes" in log
    assert "Traceback" not in log


def test_a_seq_beyond_int64_is_refused_before_the_ledger_and_fails_no_other_node(
    server: Server, nodes: dict[str, Node]
) -> None:
    n4 = Node("n-big-seq")
    r = run_cli(server.data_dir, server.config, "enroll", "--site", SITE, "--node", n4.name, "--key", n4.pubkey)
    assert r.returncode == 0, r.stderr
    forged = n4.forge(2**63, b"x", 1, codec=wire.Codec.NONE)
    before = server.counter("malformed")
    status, body = server.post(forged)
    assert status == 400 and body["result"] == "malformed" and "2^63" in body["error"].replace("**", "^")
    assert server.counter("malformed") == before + 1
    status, body = server.post(n4.data(1))  # the same node, within range: taken (or a duplicate)
    assert status == 200, body


def wait_until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())
