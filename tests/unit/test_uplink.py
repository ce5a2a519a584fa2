"""Uplink lanes against a scripted HTTP peer on loopback: Retry-After, backoff, byte-rate cap,
probes after an outage, and the grace a stop gives the last batch."""

from __future__ import annotations

import http.server
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

import wire
from agent.config import UplinkConfig
from agent.spool import Spool
from agent.uplink import (
    Backoff,
    Outcome,
    SystemClock,
    Uplink,
    classify,
    lane_rngs,
    retry_after_seconds,
)
from tests.fakes.clock import ManualClock
from tests.fakes.counting_peer import CountingPeer, serving
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


# ---------------------------------------------------------------- freshness after an outage, stop


def _wait_until(cond: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Real-time wait for something the lanes do between the test's clock steps."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _slow_backoff(url: str, initial: float, maximum: float, **kw: Any) -> UplinkConfig:
    return UplinkConfig(url=url, backoff_initial=Duration(initial), backoff_max=Duration(maximum),
                        probe_interval="500ms", **kw)


def test_after_an_outage_the_newest_goes_at_the_first_answered_probe_not_after_the_backoff(
    tmp_path: Path,
) -> None:
    _fill(tmp_path / "spool.db", 3, 5)
    clock = ManualClock()
    peer = CountingPeer(clock)
    with serving(peer) as url:
        # The first backoff is at least 4 s (full jitter over [4, 8]); probes every 0.5 s.
        up = Uplink(_slow_backoff(url, 8.0, 10.0), tmp_path / "spool.db", clock=clock,
                    rng=random.Random(7))
        up.start()
        try:
            _wait_until(lambda: len(peer.posted()) == 1, "the first send")
            clock.await_parked("uplink-live")
            failed_at = clock.monotonic()
            for k in range(1, 5):  # four probes, none answered
                while len(peer.times("GET")) < k:  # to the moment the lane waits for
                    clock.advance_to_wake("uplink-live")
                    clock.await_parked("uplink-live")
            peer.mode = "up"
            clock.advance_to_wake("uplink-live")
            _wait_until(lambda: len(peer.posted()) == 2, "the send after the answered probe")
            # The backlog follows behind it.
            for _ in range(40):
                if {seq for _, seq in peer.posted()} == {1, 2, 3}:
                    break
                clock.advance(0.5)
                time.sleep(0.01)
        finally:
            up.stop()
    posts = peer.posted()
    probes = peer.times("GET")
    assert [seq for _, seq in posts[:2]] == [3, 3], "the newest batch, both times"
    assert posts[0][0] == failed_at
    # A probe every jittered interval (the live lane's own generator, replayed).
    jitter = lane_rngs(random.Random(7))["live-probe"]
    expected, t = [], failed_at
    for _ in range(5):
        t += 0.5 * jitter.uniform(0.8, 1.2)
        expected.append(t)
    assert all(abs(a - b) < 1e-6 for a, b in zip(probes[:5], expected, strict=True)), probes
    # The send came at the very moment the fifth probe was answered, long before the
    # backoff (>= 4 s) would have let the lane try again.
    assert posts[1][0] == probes[4] < failed_at + 4.0
    assert len(probes) == 5, "probing stops once the collector answers"
    assert [seq for _, seq in posts[2:]] == [1, 2], "then the backfill, oldest first"


def test_a_down_collector_sees_one_probe_per_interval_plus_backed_off_sends(tmp_path: Path) -> None:
    _fill(tmp_path / "spool.db", 2, 5)
    clock = ManualClock()
    peer = CountingPeer(clock)
    with serving(peer) as url:
        up = Uplink(_slow_backoff(url, 1.0, 4.0), tmp_path / "spool.db", clock=clock,
                    rng=random.Random(11))
        up.start()
        try:
            _wait_until(lambda: len(peer.posted()) == 1, "the first send")
            clock.await_parked("uplink-live")
            start = clock.monotonic()
            for _ in range(240):  # one minute down, in quarter-second steps
                clock.advance(0.25)
                clock.await_parked("uplink-live")
        finally:
            up.stop()
    posts = peer.posted()
    probes = peer.times("GET")
    assert {seq for _, seq in posts} == {2}, "only the live lane tries; the backfill waits"
    # Sends: exactly the backoff's schedule (the lane's own jitter, replayed), each at the
    # first clock step at or after its delay, never sooner.
    delays = Backoff(1.0, 4.0, lane_rngs(random.Random(11))["live"])
    gaps = [b[0] - a[0] for a, b in zip(posts, posts[1:], strict=False)]
    for gap in gaps:
        expected = delays.next_delay()
        assert expected <= gap <= expected + 0.25, (gaps, expected)
    assert len(posts) >= 60 / 4.0, "the lane keeps trying at its capped backoff"
    # Probes: never more than one per jittered interval (0.4..0.6 s), and they do happen.
    assert all(b - a >= 0.4 for a, b in zip(probes, probes[1:], strict=False))
    assert 60 / 0.6 / 2 <= len(probes) <= 60 / 0.4 + 1
    assert all(start < t <= start + 60 for t in probes)
    assert up.stats.probes == len(probes)


def test_a_collector_that_answers_but_fails_is_not_probed_into_a_send_loop(tmp_path: Path) -> None:
    """Its /healthz may well say 200: a probe would end every backoff. It answered, so the
    backoff is sat out in full."""
    _fill(tmp_path / "spool.db", 1, 5)
    clock = ManualClock()
    peer = CountingPeer(clock, mode="failing")
    with serving(peer) as url:
        up = Uplink(_slow_backoff(url, 2.0, 8.0), tmp_path / "spool.db", clock=clock,
                    rng=random.Random(5))
        up.start()
        try:
            _wait_until(lambda: len(peer.posted()) == 1, "the first send")
            clock.await_parked("uplink-live")
            for _ in range(120):
                clock.advance(0.25)
                clock.await_parked("uplink-live")
        finally:
            up.stop()
    assert peer.times("GET") == []
    posts = peer.posted()
    delays = Backoff(2.0, 8.0, lane_rngs(random.Random(5))["live"])
    for a, b in zip(posts, posts[1:], strict=False):
        assert b[0] - a[0] >= delays.next_delay()
    assert 2 <= len(posts) <= 1 + 30 / 1.0


def test_probes_are_spaced_by_the_jittered_interval(tmp_path: Path) -> None:
    """+-20% around probe_interval, from the live lane's own probe generator: a fleet that
    lost the collector together does not probe it in step."""
    _fill(tmp_path / "spool.db", 1, 5)
    clock = ManualClock()
    peer = CountingPeer(clock, mode="down")
    with serving(peer) as url:
        # A first backoff of 50..100 s: the 30 probes below all fall inside it.
        up = Uplink(_slow_backoff(url, 100.0, 100.0), tmp_path / "spool.db", clock=clock,
                    rng=random.Random(13))
        up.start()
        try:
            _wait_until(lambda: len(peer.posted()) == 1, "the first send")
            clock.await_parked("uplink-live")
            while len(peer.times("GET")) < 30:  # to each moment the lane waits for, exactly
                clock.advance_to_wake("uplink-live")
                clock.await_parked("uplink-live")
        finally:
            up.stop()
    assert len(peer.posted()) == 1, "no send: the backoff is far from over"
    moments = [peer.posted()[0][0], *peer.times("GET")]
    gaps = [b - a for a, b in zip(moments, moments[1:], strict=False)]
    jitter = lane_rngs(random.Random(13))["live-probe"]
    expected = [0.5 * jitter.uniform(0.8, 1.2) for _ in gaps]
    assert all(abs(g - e) < 1e-6 for g, e in zip(gaps, expected, strict=True)), (gaps, expected)
    assert all(0.4 <= g <= 0.6 for g in gaps)
    assert max(gaps) - min(gaps) > 0.05, "jittered, not a fixed interval"


def test_a_reachable_collector_whose_uploads_reset_gets_the_backoff_schedule_not_a_send_loop(
    tmp_path: Path,
) -> None:
    """Its /healthz answers 200 while every upload is reset after it was read (a proxy that
    drops large uploads, a collector that crashes on this batch). The outage it first had
    ends at an answered probe, once; from then on a probe tells nothing new and each backoff
    is sat out in full."""
    _fill(tmp_path / "spool.db", 1, 5)
    clock = ManualClock()
    peer = CountingPeer(clock, mode="down")
    with serving(peer) as url:
        up = Uplink(_slow_backoff(url, 2.0, 8.0), tmp_path / "spool.db", clock=clock,
                    rng=random.Random(5))
        up.start()
        try:
            _wait_until(lambda: len(peer.posted()) == 1, "the first send")
            clock.await_parked("uplink-live")
            for _ in range(4):  # down for a second: its probes fail
                clock.advance(0.25)
                clock.await_parked("uplink-live")
            peer.mode = "resetting"
            for _ in range(240):  # then a minute of answered probes and reset uploads
                clock.advance(0.25)
                clock.await_parked("uplink-live")
        finally:
            up.stop()
    posts = peer.posted()
    probes = peer.times("GET")
    delays = Backoff(2.0, 8.0, lane_rngs(random.Random(5))["live"])
    first = delays.next_delay()
    assert posts[1][0] - posts[0][0] < first, "the down->up change a probe saw ends that wait"
    gaps = [b[0] - a[0] for a, b in zip(posts[1:], posts[2:], strict=False)]
    for gap in gaps:
        expected = delays.next_delay()
        assert expected <= gap <= expected + 0.25, (gaps, expected)
    assert 2 + 60 / 8.0 <= len(posts) <= 2 + 60 / 1.0, len(posts)  # not 2 a second
    # Once it answers: one probe per failed upload at most (the first answered ends probing).
    assert len([t for t in probes if t > posts[1][0]]) <= len(posts) - 1


def test_each_lane_replays_its_own_seeded_backoff_whatever_the_other_draws(tmp_path: Path) -> None:
    """The backfill lane backs off first (batch 1 fails), then the live lane (batch 4 fails):
    the live lane's schedule is still its own generator's, from the seed handed in."""
    _fill(tmp_path / "spool.db", 3, 5)
    clock = ManualClock()
    peer = CountingPeer(clock, mode="up")
    peer.modes = {1: "failing", 4: "failing"}
    with serving(peer) as url:
        up = Uplink(_slow_backoff(url, 1.0, 4.0), tmp_path / "spool.db", clock=clock,
                    rng=random.Random(17))
        up.start()
        try:
            _wait_until(lambda: [s for _, s in peer.posted()] == [3, 1], "live 3, then backfill 1")
            _wait_until(lambda: up.stats.failures == 1, "the backfill lane's failure")
            clock.await_parked("uplink-backfill")
            assert _sign_one_more(tmp_path / "spool.db") == 4
            up.notify()
            _wait_until(lambda: up.stats.failures == 2, "the live lane's failure")
            clock.await_parked("uplink-live")
            for _ in range(120):
                clock.advance(0.25)
                clock.await_parked("uplink-live")
        finally:
            up.stop()
    live = [t for t, seq in peer.posted() if seq == 4]
    assert len(live) >= 30 / 4.0
    delays = Backoff(1.0, 4.0, lane_rngs(random.Random(17))["live"])
    gaps = [b - a for a, b in zip(live, live[1:], strict=False)]
    for gap in gaps:
        expected = delays.next_delay()
        assert expected <= gap <= expected + 0.25, (gaps, expected)


def _sign_one_more(path: Path) -> int:
    key = SigningKey.generate()
    sp = Spool(path)
    try:
        series = [wire.Series("m", (("k", "last"),), wire.MetricType.GAUGE, (1_800_000_000_000,), (1.0,))]
        sp.append_data(key, "s", "n", series, 1 << 30)
        return sp.stats().next_seq - 1
    finally:
        sp.close()


def test_stop_delivers_the_batch_just_signed_within_the_grace(tmp_path: Path) -> None:
    _fill(tmp_path / "spool.db", 2, 5)
    peer = CountingPeer(SystemClock(), mode="up")
    with serving(peer) as url:
        up = Uplink(_config(url), tmp_path / "spool.db")
        up.start()
        _wait_until(lambda: up.stats.acked_batches == 2, "the first two batches")
        last = _sign_one_more(tmp_path / "spool.db")  # what the agent signs on its way out
        up.notify()
        up.stop(grace=5.0)
    assert (peer.posted() or [(0, 0)])[-1][1] == last
    sp = Spool(tmp_path / "spool.db")
    assert sp.stats().pending_batches == 0
    sp.close()
    assert not any(t.is_alive() for t in up.threads)


def test_stop_delivers_every_batch_newer_than_the_live_lane_settled(tmp_path: Path) -> None:
    """A window boundary signed a batch just before the stop signed the last one: the live
    lane, while draining, sends both (newest first), though the backfill has stopped."""
    _fill(tmp_path / "spool.db", 2, 5)
    clock = ManualClock()  # never advanced: nothing happens but what the events cause
    peer = CountingPeer(clock, mode="up")
    with serving(peer) as url:
        up = Uplink(_config(url), tmp_path / "spool.db", clock=clock)
        up.start()
        _wait_until(lambda: up.stats.acked_batches == 2, "the first two batches")
        clock.await_parked("uplink-live")
        clock.await_parked("uplink-backfill")
        boundary = _sign_one_more(tmp_path / "spool.db")
        last = _sign_one_more(tmp_path / "spool.db")
        up.notify()
        up.stop(grace=5.0)
    assert [seq for _, seq in peer.posted()][2:] == [last, boundary]
    sp = Spool(tmp_path / "spool.db")
    assert sp.stats().pending_batches == 0
    sp.close()


def test_stop_on_a_new_spool_with_the_collector_down_does_not_wait_out_the_grace(
    tmp_path: Path,
) -> None:
    """Nothing can be sent before the collector says where the node's chain stands: the
    stop has nothing to wait for."""
    _fill(tmp_path / "spool.db", 1, 5)  # a new spool: it must resume the collector's chain
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens: refused
    up = Uplink(_config(closed, probe_interval="100ms"), tmp_path / "spool.db",
                identity=(SigningKey.generate(), "s", "n"))
    up.start()
    _wait_until(lambda: up.stats.probes >= 1, "a probe while preparing")
    started = time.monotonic()
    up.stop(grace=20.0)
    assert time.monotonic() - started < 20.0 / 2, "returned long before the grace"
    assert not any(t.is_alive() for t in up.threads)
    assert not up.resumed.is_set()
    sp = Spool(tmp_path / "spool.db")
    assert sp.resume_needed() and sp.stats().pending_batches == 1, "kept for the next start"
    sp.close()


def test_stop_does_not_wait_for_the_backfill_lanes_request(tmp_path: Path) -> None:
    """The backfill's grace is zero: a request it has in flight to a collector that holds it
    does not keep the stop waiting."""
    _fill(tmp_path / "spool.db", 2, 5)
    peer = CountingPeer(SystemClock(), mode="up")
    peer.modes = {1: "hanging"}
    with serving(peer) as url:
        up = Uplink(_config(url), tmp_path / "spool.db")
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 1 and len(peer.posted()) == 2,
                        "batch 2 acked, batch 1 held by the peer")
            started = time.monotonic()
            up.stop(grace=20.0)
            took = time.monotonic() - started
        finally:
            peer.release.set()
    assert took < 20.0 / 2, "returned long before the grace"
    assert [seq for _, seq in peer.posted()] == [2, 1]


def test_a_stop_during_a_long_backoff_tries_once_more_at_once(tmp_path: Path) -> None:
    """The collector came back while the live lane sat out a minute's backoff (probing off):
    the stop's grace is spent on a try now, not on the rest of the backoff."""
    _fill(tmp_path / "spool.db", 1, 5)
    peer = CountingPeer(SystemClock(), mode="down")
    with serving(peer) as url:
        config = UplinkConfig(url=url, backoff_initial=Duration(60.0), backoff_max=Duration(60.0),
                              probe_interval="0s")
        up = Uplink(config, tmp_path / "spool.db")
        up.start()
        _wait_until(lambda: up.stats.failures >= 1, "the first send to fail")
        peer.mode = "up"
        last = _sign_one_more(tmp_path / "spool.db")
        up.notify()
        up.stop(grace=5.0)
    seqs = [seq for _, seq in peer.posted()]
    assert seqs[:2] == [1, last], "the newest, right after the stop began"
    # The lane never settled a batch before the stop: all it holds is its to deliver.
    assert seqs[2:] == [1]
    assert peer.times("GET") == [], "probing was off"


def test_stop_with_the_collector_down_gives_up_after_the_grace_and_keeps_the_batch(
    tmp_path: Path,
) -> None:
    _fill(tmp_path / "spool.db", 1, 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens: refused
    up = Uplink(_config(closed, probe_interval="100ms"), tmp_path / "spool.db")
    up.start()
    _wait_until(lambda: up.stats.failures >= 1 and up.stats.probes >= 1, "a failed send and a probe")
    started = time.monotonic()
    up.stop(grace=1.0)
    assert time.monotonic() - started < 1.0 + 10, "stop returns after the grace, not never"
    assert not any(t.is_alive() for t in up.threads)
    sp = Spool(tmp_path / "spool.db")
    assert sp.stats().pending_batches == 1, "the batch stays in the spool"
    sp.close()
    # The next start delivers it.
    peer = CountingPeer(SystemClock(), mode="up")
    with serving(peer) as url:
        again = Uplink(_config(url), tmp_path / "spool.db")
        again.start()
        try:
            _wait_until(lambda: again.stats.acked_batches == 1, "delivery at the next start")
        finally:
            again.stop()
    assert [seq for _, seq in peer.posted()] == [1]
