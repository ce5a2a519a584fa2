"""remote_write forwarding by a real collector process, against a loopback receiver whose
answers each test scripts (the real Prometheus and VictoriaMetrics are in tests/e2e)."""

from __future__ import annotations

import asyncio
import base64
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from nacl.signing import SigningKey

import wire
from collector import remote_write_proto as proto
from tests.conftest import free_port
from tests.integration import harness
from tests.integration.harness import wait_for

pytestmark = pytest.mark.timeout(180)

SITE = "s1"
T0 = int(time.time() * 1000) - 3_600_000
Samples = dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]


class Receiver:
    """A remote-write endpoint on loopback: answers from a script, records what it accepted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/write"
        self.script: list[tuple[int, str, dict[str, str]]] = []
        self.accepted: Samples = {}
        self.refused: list[Samples] = []
        self.statuses: list[int] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/api/v1/write", self._write)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _write(self, request: web.Request) -> web.Response:
        body = await request.read()
        decoded = proto.decode_write_request(proto.decompress(body))
        samples: Samples = {}
        for labels, points in decoded:
            samples.setdefault(labels, []).extend(points)
        with self.lock:
            status, text, headers = self.script.pop(0) if self.script else (204, "", {})
            self.statuses.append(status)
            self.headers.append(dict(request.headers))
            if status < 300:
                for labels, points in samples.items():
                    self.accepted.setdefault(labels, []).extend(points)
            else:
                self.refused.append(samples)
        return web.Response(status=status, text=text, headers=headers)

    def points(self, name: str) -> set[tuple[tuple[tuple[str, str], ...], int, float]]:
        with self.lock:
            return {(labels, ts, v) for labels, pts in self.accepted.items() if dict(labels)["__name__"] == name
                    for ts, v in pts}

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Node:
    def __init__(self, name: str) -> None:
        self.key = SigningKey.generate()
        self.name = name
        self.frames: dict[int, bytes] = {}

    def data(self, seq: int) -> bytes:
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        ts = T0 + seq * 10_000
        series = [
            wire.Series("node_load1", (), wire.MetricType.GAUGE, (ts - 5000, ts), (seq / 2, seq + 0.25)),
            wire.Series("node_network_receive_bytes_total", (("device", "eth0"),), wire.MetricType.COUNTER,
                        (ts,), (1000.0 * seq,)),
            # A node cannot choose which site/node its series land under: the header's win.
            wire.Series("vllm:num_requests_running", (("job", "vllm"), ("node", "forged")),
                        wire.MetricType.GAUGE, (ts,), (float(seq % 3),)),
        ]
        ctx = wire.BatchContext(self.key, SITE, self.name, seq, prev, ts, seq, 3)
        self.frames[seq] = wire.encode_data_batch(ctx, series)
        return self.frames[seq]

    def expected(self, seqs: range, name: str) -> set[tuple[tuple[tuple[str, str], ...], int, float]]:
        out = set()
        for seq in seqs:
            frame = wire.parse_frame(self.frames[seq])
            for s in wire.decode_series(wire.decompress_payload(frame, 1 << 20)):
                if s.name != name:
                    continue
                labels = {**dict(s.labels), "__name__": s.name, "site": SITE, "node": self.name}
                out.update((tuple(sorted(labels.items())), ts, v) for ts, v in zip(s.timestamps_ms, s.values,
                                                                                   strict=True))
        return out


class Collector(harness.Collector):
    """harness.Collector with remote_write targets in its config, SIGKILL, posts, figures."""

    def __init__(self, root: Path, targets: str) -> None:
        config = root / "collector.toml"
        config.write_text(f'log_level = "info"\n{targets}')
        super().__init__(root / "data", config=config)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if sig == signal.SIGTERM or self.proc is None:
            super().stop()
            return
        self.proc.send_signal(sig)
        self.proc.wait(30)
        self.proc = None

    def post(self, frame: bytes) -> int:
        req = urllib.request.Request(f"{self.url}/v1/batches", data=frame, method="POST",
                                     headers={"Content-Type": "application/x-waystation-batch"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _target(name: str, url: str, extra: str = "", per_request: int = 8) -> str:
    return f'[[remote_write]]\nname = "{name}"\nurl = "{url}"\nsamples_per_request = {per_request}\n{extra}\n'


@pytest.fixture
def node() -> Node:
    return Node("n1")


def _setup(tmp_path: Path, node: Node, targets: str) -> Collector:
    c = Collector(tmp_path, targets)
    c.enroll(SITE, node.name, base64.b64encode(bytes(node.key.verify_key)).decode())
    c.start()
    return c


def test_every_sample_reaches_the_receiver_with_its_original_timestamp_and_proven_labels(
    tmp_path: Path, receiver: Receiver, node: Node
) -> None:
    c = _setup(tmp_path, node, _target("rx", receiver.url))
    try:
        for seq in range(1, 21):
            assert c.post(node.data(seq)) == 200
        for name in ("node_load1", "node_network_receive_bytes_total", "vllm:num_requests_running"):
            want = node.expected(range(1, 21), name)
            wait_for(lambda n=name, w=want: receiver.points(n) >= w, 30, f"{name} at the receiver")  # type: ignore[misc]
            assert receiver.points(name) == want
        assert all(dict(labels)["node"] == "n1" for labels, _, _ in receiver.points("vllm:num_requests_running"))
        h = receiver.headers[0]
        assert (h["Content-Encoding"], h["Content-Type"], h["X-Prometheus-Remote-Write-Version"]) == (
            "snappy", "application/x-protobuf", "0.1.0")
        wait_for(lambda: c.metric("waystation_remote_write_samples_total", target="rx") == 20 * 4, 10,
                 "samples counted")
        wait_for(lambda: c.metric("waystation_remote_write_pending_batches", target="rx") == 0, 10, "nothing pending")
        assert c.metric("waystation_remote_write_lag_seconds", target="rx") == 0
        assert c.metric("waystation_remote_write_last_success_timestamp_seconds", target="rx") > time.time() - 60
    finally:
        c.stop()


def test_a_receiver_that_fails_for_a_while_loses_nothing(tmp_path: Path, receiver: Receiver, node: Node) -> None:
    receiver.script = [(503, "overloaded", {"Retry-After": "1"}), (500, "storage busy", {}), (429, "", {})]
    c = _setup(tmp_path, node, _target("rx", receiver.url))
    try:
        for seq in range(1, 11):
            assert c.post(node.data(seq)) == 200
        want = node.expected(range(1, 11), "node_load1")
        wait_for(lambda: receiver.points("node_load1") >= want, 60, "everything after the failures")
        assert receiver.statuses[:3] == [503, 500, 429]
        wait_for(lambda: c.metric("waystation_remote_write_retries_total", target="rx", reason="http_5xx") == 2, 10,
                 "retries counted")
        assert c.metric("waystation_remote_write_retries_total", target="rx", reason="http_429") == 1
        assert c.metric("waystation_remote_write_samples_refused_total", target="rx", reason="bad_request") == 0
    finally:
        c.stop()


def test_a_refused_batch_costs_only_itself_and_the_position_moves_on(
    tmp_path: Path, receiver: Receiver, node: Node
) -> None:
    c = _setup(tmp_path, node, "")  # no target yet: twelve batches wait in the ledger
    try:
        for seq in range(1, 13):
            assert c.post(node.data(seq)) == 200
        c.stop()
        c.config.write_text(c.config.read_text() + _target("rx", receiver.url, per_request=100))
        # The first request carries all twelve batches (newest first). Refused as a whole, it
        # is resent batch by batch; of those the first (seq 12) is refused for good.
        receiver.script = [(400, "out of order sample", {}), (500, "too old sample", {})]
        c.start()
        want = node.expected(range(1, 12), "node_load1")
        wait_for(lambda: receiver.points("node_load1") >= want, 30, "every batch but the refused one")
        assert receiver.statuses[:2] == [400, 500]
        assert len(receiver.statuses) == 2 + 11
        assert receiver.points("node_load1") == want  # exactly seq 12 is missing
        wait_for(lambda: c.metric("waystation_remote_write_samples_refused_total", target="rx", reason="too_old") == 4,
                 10, "the refused batch counted")
        assert c.metric("waystation_remote_write_samples_refused_total", target="rx", reason="out_of_order") == 0
        assert c.metric("waystation_remote_write_samples_total", target="rx") == 11 * 4
        assert c.post(node.data(13)) == 200
        wait_for(lambda: receiver.points("node_load1") >= node.expected(range(13, 14), "node_load1"), 30,
                 "a later batch")
        assert "refused 4 samples (too_old)" in c.log.read_text()
    finally:
        c.stop()


def test_forwarding_resumes_after_a_restart_and_after_sigkill(tmp_path: Path, receiver: Receiver, node: Node) -> None:
    c = _setup(tmp_path, node, _target("rx", receiver.url))
    try:
        for seq in range(1, 11):
            assert c.post(node.data(seq)) == 200
        want = node.expected(range(1, 11), "node_load1")
        wait_for(lambda: receiver.points("node_load1") >= want, 30, "first ten batches")
        c.stop(signal.SIGTERM)
        with receiver.lock:
            sent_before = len(receiver.statuses)
        c.start()
        time.sleep(2)
        with receiver.lock:
            assert len(receiver.statuses) == sent_before, "a clean restart resends nothing"
        receiver.script = [(503, "", {})] * 3  # hold the next batches back, then kill mid-way
        for seq in range(11, 21):
            assert c.post(node.data(seq)) == 200
        c.stop(signal.SIGKILL)
        time.sleep(1)
        c.start()
        want = node.expected(range(1, 21), "node_load1")
        wait_for(lambda: receiver.points("node_load1") >= want, 60, "everything after SIGKILL")
        assert receiver.points("node_load1") == want
    finally:
        c.stop()


def test_filters_headers_and_bearer_token_reach_the_receiver(tmp_path: Path, receiver: Receiver, node: Node) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    extra = (f'include = ["node_.*"]\nexclude = ["node_network_.*"]\nbearer_token_file = "{token}"\n'
             '[remote_write.headers]\nX-Scope-OrgID = "fleet-a"\n')
    c = _setup(tmp_path, node, _target("rx", receiver.url, extra))
    try:
        for seq in range(1, 6):
            assert c.post(node.data(seq)) == 200
        wait_for(lambda: receiver.points("node_load1") >= node.expected(range(1, 6), "node_load1"), 30, "load")
        time.sleep(1)
        with receiver.lock:
            names = {dict(labels)["__name__"] for labels in receiver.accepted}
            headers: dict[str, Any] = receiver.headers[0]
        assert names == {"node_load1"}
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["X-Scope-OrgID"] == "fleet-a"
    finally:
        c.stop()


def test_a_broken_target_holds_back_only_itself(tmp_path: Path, receiver: Receiver, node: Node) -> None:
    broken = _target("broken", "https://127.0.0.1:9/api/v1/write", f'tls_ca_file = "{tmp_path / "missing-ca.pem"}"')
    c = _setup(tmp_path, node, broken + _target("rx", receiver.url))
    try:
        for seq in range(1, 6):
            assert c.post(node.data(seq)) == 200
        wait_for(lambda: receiver.points("node_load1") >= node.expected(range(1, 6), "node_load1"), 30,
                 "the healthy target's samples")
        wait_for(lambda: c.metric("waystation_remote_write_retries_total", target="broken", reason="config") >= 1, 20,
                 "the broken target's problem counted")
        wait_for(lambda: c.metric("waystation_remote_write_pending_batches", target="broken") == 5, 20,
                 "the broken target's backlog shown")
        assert c.metric("waystation_remote_write_forwarder_restarts_total") == 0
        assert "missing-ca.pem" in c.log.read_text()
    finally:
        c.stop()
