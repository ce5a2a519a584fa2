"""Uplink lanes against a scripted HTTP peer on loopback: Retry-After, backoff, byte-rate cap."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

import wire
from agent.config import UplinkConfig
from agent.spool import Spool
from agent.uplink import Backoff, Outcome, Uplink, classify, retry_after_seconds
from wire.config import Duration, Size


def test_retry_after_forms() -> None:
    now = 1_000_000.0
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds("999999", now) == 3600.0  # capped
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert abs((retry_after_seconds(when, now) or 0) - 30) < 1.01
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


def test_classify_maps_statuses() -> None:
    ok = json.dumps({"result": "accepted", "seq": 7, "complete_through": 41}).encode()
    assert classify(200, {}, ok, 0, 7) == Outcome("acked", complete_through=41)
    dup = json.dumps({"result": "duplicate", "seq": 7}).encode()
    assert classify(200, {}, dup, 0, 7).kind == "acked"
    # Only the collector's own acknowledgement of this very batch deletes it.
    assert classify(200, {}, ok, 0, 8).kind == "retry"
    assert classify(200, {}, b"<html>captive portal</html>", 0, 7).kind == "retry"
    assert classify(200, {}, b'{"status": "ok"}', 0, 7).kind == "retry"
    assert classify(503, {"retry-after": "3"}, b"", 0, 7).delay_s == 3.0
    assert classify(503, {"retry-after": "0"}, b"", 0, 7).delay_s == 0.0
    assert classify(429, {}, b"", 0, 7).delay_s < 0  # no header: the lane's own backoff
    for status in (400, 413):
        assert classify(status, {}, b'{"result":"malformed"}', 0, 7).kind == "reject"
    assert classify(409, {}, b'{"result":"conflict"}', 0, 7).kind == "conflict"
    # A proxy's error page is not the collector refusing the batch: keep it and retry.
    assert classify(400, {}, b"<html>Bad Request</html>", 0, 7).kind == "retry"
    for status in (401, 403, 500, 502):
        assert classify(status, {}, b'{"result":"unknown_key"}', 0, 7).kind == "retry"


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(1.0, 8.0, random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    assert all(0.5 <= d <= 1.0 for d in delays[:1])
    assert all(4.0 <= d <= 8.0 for d in delays[4:])
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    b.reset()
    assert b.next_delay() <= 1.0


class Peer:
    """Answers POSTs from a script of (status, headers) and records when each arrived."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.arrivals: list[tuple[float, int, int]] = []  # (time, seq, bytes)
        self.lock = threading.Lock()

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seq = wire.parse_frame(body).header.seq
                with peer.lock:
                    peer.arrivals.append((time.monotonic(), seq, len(body)))
                    status, headers = peer.script.pop(0) if peer.script else (200, {})
                reply = json.dumps({"result": "accepted" if status == 200 else "busy",
                                    "seq": seq, "complete_through": seq}).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def running(peer: Peer) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), peer.handler())
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _fill(path: Path, batches: int, points: int) -> None:
    key = SigningKey.generate()
    sp = Spool(path)
    rng = random.Random(3)
    for i in range(batches):
        ts = tuple(1_700_000_000_000 + i * 100_000 + j * 1000 for j in range(points))
        series = [wire.Series("m", (("k", str(k)),), wire.MetricType.GAUGE, ts,
                              tuple(rng.random() for _ in ts)) for k in range(20)]
        sp.append_data(key, "s", "n", series, 1 << 30)
    sp.close()


def _config(url: str, **kw: Any) -> UplinkConfig:
    return UplinkConfig(url=url, backoff_initial=Duration(0.1), backoff_max=Duration(0.5), **kw)


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    _fill(tmp_path / "spool.db", 1, 5)
    peer = Peer([(503, {"Retry-After": "2"}), (429, {"Retry-After": "1"})])
    with running(peer) as url:
        up = Uplink(_config(url), tmp_path / "spool.db")
        up.start()
        deadline = time.monotonic() + 15
        while len(peer.arrivals) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        up.stop()
    times = [a[0] for a in peer.arrivals]
    assert len(times) >= 3
    # Neither lane tries again before the time the server asked for.
    assert times[1] - times[0] >= 2.0
    assert times[2] - times[1] >= 1.0
    sp = Spool(tmp_path / "spool.db")
    assert sp.stats().pending_batches == 0


def test_backfill_respects_byte_rate_cap_and_live_goes_first(tmp_path: Path) -> None:
    _fill(tmp_path / "spool.db", 12, 60)
    sp = Spool(tmp_path / "spool.db")
    sizes = [r[0] for r in sp.db.execute("SELECT bytes FROM batches ORDER BY seq")]
    sp.close()
    cap = max(1024, sum(sizes) // 4)  # the whole backlog should take about four seconds
    peer = Peer([])
    with running(peer) as url:
        up = Uplink(_config(url, max_bytes_per_second=Size(cap)), tmp_path / "spool.db")
        up.start()
        deadline = time.monotonic() + 30
        while len(peer.arrivals) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        up.stop()
    seqs = [a[1] for a in peer.arrivals]
    assert sorted(seqs) == list(range(1, 13))
    assert 12 in seqs[:2], "the newest batch goes out at once on the live lane"
    backfill = [a for a in peer.arrivals if a[1] != 12]
    assert [a[1] for a in backfill] == sorted(a[1] for a in backfill), "backfill is oldest-first"
    span = backfill[-1][0] - backfill[0][0]
    sent_before_last = sum(a[2] for a in backfill[:-1])
    assert span >= 0.8 * sent_before_last / cap, (span, sent_before_last, cap)
