"""The collector app in-process: group commit, backpressure, body limit before aiohttp's own."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from nacl.signing import SigningKey

import wire
from collector import app as app_mod
from collector import ledger, trust
from collector.app import COMMITTER, METRICS, create_app
from collector.config import CollectorConfig, LimitsConfig

T0 = 1_700_000_000_000


def chain(key: SigningKey, count: int, node: str = "n1") -> list[bytes]:
    frames: list[bytes] = []
    for seq in range(1, count + 1):
        prev = wire.batch_hash(frames[-1]) if frames else wire.ZERO_HASH
        ctx = wire.BatchContext(key, "s1", node, seq, prev, T0 + seq, seq, 1)
        frames.append(wire.encode_data_batch(
            ctx, [wire.Series("up", (), wire.MetricType.GAUGE, (T0 + seq,), (1.0,))]
        ))
    return frames


def setup(tmp_path: Path, **limits: int) -> tuple[CollectorConfig, SigningKey]:
    config = CollectorConfig(data_dir=str(tmp_path), limits=LimitsConfig(**limits))  # type: ignore[arg-type]
    key = SigningKey.generate()
    conn = ledger.connect(config.ledger_path)
    trust.enroll(conn, "s1", "n1", bytes(key.verify_key))
    conn.close()
    return config, key


async def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_concurrent_posts_share_one_commit(tmp_path: Path) -> None:
    config, key = setup(tmp_path)
    frames = chain(key, 40)

    async def run() -> None:
        app = create_app(config)
        async with TestClient(TestServer(app)) as client:
            committer = app[COMMITTER]
            gate = threading.Event()
            held = asyncio.ensure_future(committer.call(gate.wait, 10))  # occupy the ledger thread
            posts = [asyncio.ensure_future(client.post("/v1/batches", data=f)) for f in reversed(frames)]
            await _wait_for(lambda: committer.pending == len(frames))
            groups = committer.groups
            gate.set()
            await held
            replies = await asyncio.gather(*posts)
            assert [r.status for r in replies] == [200] * len(frames)
            # 40 batches, at most two transactions: the first batch verified
            # may start a group of its own before the others are verified.
            assert committer.groups <= groups + 2
            last = await replies[-1].json()
            assert last["complete_through"] == 40

    asyncio.run(run())


def test_backpressure_answers_503_with_retry_after(tmp_path: Path) -> None:
    config, key = setup(tmp_path, max_pending_commits=2)
    frames = chain(key, 3)

    async def run() -> None:
        app = create_app(config)
        async with TestClient(TestServer(app)) as client:
            committer = app[COMMITTER]
            gate = threading.Event()
            held = asyncio.ensure_future(committer.call(gate.wait, 10))
            posts = [asyncio.ensure_future(client.post("/v1/batches", data=f)) for f in frames[:2]]
            await _wait_for(lambda: committer.pending == 2)
            reply = await client.post("/v1/batches", data=frames[2])
            assert reply.status == 503
            assert reply.headers["Retry-After"] == "1"
            assert (await reply.json())["result"] == "overloaded"
            gate.set()
            await held
            assert [r.status for r in await asyncio.gather(*posts)] == [200, 200]
            assert (await client.post("/v1/batches", data=frames[2])).status == 200
            assert app[METRICS].batches["overloaded"] == 1

    asyncio.run(run())


def test_our_413_comes_before_aiohttps_body_limit(tmp_path: Path) -> None:
    config, _ = setup(tmp_path, max_body_bytes=4096)

    async def run() -> None:
        app = create_app(config)
        async with TestClient(TestServer(app)) as client:
            reply = await client.post("/v1/batches", data=b"x" * 10_000)
            assert reply.status == 413
            assert (await reply.json())["result"] == "too_large"
            assert app[METRICS].batches["too_large"] == 1
            # A body at the limit is read and judged on its content.
            reply = await client.post("/v1/batches", data=b"x" * 4096)
            assert (reply.status, (await reply.json())["result"]) == (400, "malformed")

    asyncio.run(run())


def test_healthz_reports_an_unwritable_ledger(tmp_path: Path) -> None:
    config, _ = setup(tmp_path)

    async def run() -> None:
        app = create_app(config)
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/healthz")).status == 200
            lock = ledger.connect(config.ledger_path)
            lock.execute("PRAGMA busy_timeout=0")
            lock.execute("BEGIN IMMEDIATE")  # another writer holds the lock
            try:
                app_ledger = app[COMMITTER].ledger
                app_ledger.conn.execute("PRAGMA busy_timeout=50")
                reply = await client.get("/healthz")
                assert reply.status == 503 and "not writable" in await reply.text()
            finally:
                lock.execute("ROLLBACK")
                lock.close()

    asyncio.run(run())


def test_series_ttl_from_the_config_expires_series_over_http(tmp_path: Path) -> None:
    """limits.series_ttl reaches the exposition: a series the node stopped sending leaves
    /metrics once the node's own samples are past the TTL (120 s here)."""
    config, key = setup(tmp_path)
    config = CollectorConfig(data_dir=config.data_dir, limits=LimitsConfig(series_ttl=120.0))  # type: ignore[arg-type]
    frames: list[bytes] = []
    for seq in range(1, 6):
        ts = T0 + (seq - 1) * 60_000
        series = [wire.Series("up", (), wire.MetricType.GAUGE, (ts,), (1.0,))]
        if seq == 1:
            series.append(wire.Series("gone", (), wire.MetricType.GAUGE, (ts,), (7.0,)))
        prev = wire.batch_hash(frames[-1]) if frames else wire.ZERO_HASH
        frames.append(wire.encode_data_batch(wire.BatchContext(key, "s1", "n1", seq, prev, ts, seq, 1), series))

    async def run() -> list[str]:
        async with TestClient(TestServer(create_app(config))) as client:
            pages = []
            for frame in frames:
                assert (await client.post("/v1/batches", data=frame)).status == 200
                pages.append(await (await client.get("/metrics")).text())
            return pages

    pages = asyncio.run(run())
    # Sent at 0 s; the node's newest sample at 0, 60, 120, 180, 240 s: past the TTL from 180 s.
    assert [('gone{node="n1",site="s1"} 7.0' in page) for page in pages] == [True, True, True, False, False]
    assert 'waystation_exposition_series_expired_total{node="n1",site="s1"} 1.0' in pages[-1]


def test_the_chain_head_answers_for_every_name_enroll_takes(tmp_path: Path) -> None:
    """A node that lost its state asks GET /v1/nodes/{site}/{node}/chain with both names
    percent-encoded (agent/uplink.py): every name enroll accepts (braces, slashes, spaces,
    a literal percent sign, non-ASCII) must reach the handler and get the API's JSON."""
    from urllib.parse import quote

    config = CollectorConfig(data_dir=str(tmp_path))
    names = ["a{b}", "a/b", "x y", "ü-1", "%41", "{}"]
    key = SigningKey.generate()
    conn = ledger.connect(config.ledger_path)
    keys = {}
    for name in names:
        keys[name] = SigningKey.generate()
        trust.enroll(conn, "s1", name, bytes(keys[name].verify_key))
    conn.close()
    del key

    async def run() -> None:
        async with TestClient(TestServer(create_app(config))) as client:
            for name in names:
                for frame in chain(keys[name], 2, node=name):
                    assert (await client.post("/v1/batches", data=frame)).status == 200
                reply = await client.get(f"/v1/nodes/{quote('s1', safe='')}/{quote(name, safe='')}/chain")
                assert reply.status == 200, name
                assert (await reply.json())["node"] == name
                assert (await reply.json())["next_seq"] == 3
            unknown = await client.get(f"/v1/nodes/s1/{quote('no{such}/node', safe='')}/chain")
            assert unknown.status == 404 and (await unknown.json())["result"] == "unknown_node"

    asyncio.run(run())


def test_requests_that_are_not_http_cost_one_log_line_per_interval(tmp_path: Path, caplog: object) -> None:
    """Lies at the HTTP level (two Content-Lengths, a negative one, a bad chunk size) are
    refused 400 by aiohttp, which would log each as an error with a traceback: a client
    could flood the journal. One warning per interval says how many; other errors keep
    their traceback."""
    import logging

    import pytest

    from collector.app import MalformedHttpLog, quiet_malformed_http

    assert isinstance(caplog, pytest.LogCaptureFixture)
    config = CollectorConfig(data_dir=str(tmp_path))
    quiet_malformed_http()
    quiet_malformed_http()  # once per process, however often serve sets up
    assert sum(isinstance(f, MalformedHttpLog) for f in logging.getLogger("aiohttp.server").filters) == 1
    lies = [
        b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ]

    async def run() -> None:
        async with TestClient(TestServer(create_app(config))) as client:
            port = client.port
            assert port is not None
            for i in range(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(lies[i % len(lies)])
                await writer.drain()
                status = await asyncio.wait_for(reader.readline(), 5)
                assert status.split()[1:2] == [b"400"], status
                writer.close()
            assert (await client.get("/healthz")).status == 200

    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    asyncio.run(run())
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.exc_info for r in server] == [None]
    assert server[0].levelname == "WARNING"
    assert "refused 1 request(s) that were not valid HTTP" in server[0].getMessage()

    quiet = MalformedHttpLog(every_s=60.0, clock=lambda: 0.0)
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                              ("127.0.0.1",), (ValueError, ValueError("a bug"), None))
    assert quiet.filter(other) and other.exc_info is not None and other.levelname == "ERROR"


def test_the_state_restored_at_start_is_kept_out_of_later_garbage_collections(tmp_path: Path) -> None:
    """A full collection walks every tracked object: with a million restored series that is
    seconds with every ack waiting, for nothing freed. What the start restored is frozen
    while the app runs."""
    import gc

    config, key = setup(tmp_path)
    frames = chain(key, 3)

    async def run(post: bool) -> None:
        async with TestClient(TestServer(create_app(config))) as client:
            if post:
                for f in frames:
                    assert (await client.post("/v1/batches", data=f)).status == 200
            else:
                assert gc.get_freeze_count() > 0

    asyncio.run(run(True))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        asyncio.run(run(False))  # the start replays the three batches, then freezes
        # Stopped: what it froze is collectable again (a test process runs many apps).
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_a_big_scrape_is_taken_and_sent_in_pieces_the_event_loop_serves_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above app.RENDER_STEP fleet series, /metrics shows the fleet a few nodes per step and
    sends its text in pieces: other handlers run between them (an ack waits for one piece,
    not the whole fleet), and the body is what one piece would have been."""
    monkeypatch.setattr(app_mod, "SCRAPE_STEP", 3)
    monkeypatch.setattr(app_mod, "RENDER_STEP", 4)
    config, _ = setup(tmp_path)
    app = create_app(config)
    fleet = app[app_mod.FLEET]
    for n in range(8):
        fleet.apply("s1", f"n{n}", [wire.Series(f"m_{i}", (("k", str(i)),), wire.MetricType.GAUGE, (T0,), (float(n),))
                                    for i in range(5)], now_ms=T0)

    async def run() -> tuple[str, int]:
        ticks = 0

        async def other_handlers() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        async with TestClient(TestServer(app)) as client:
            ticker = asyncio.ensure_future(other_handlers())
            await asyncio.sleep(0)
            before = ticks
            response = await client.get("/metrics")
            body = await response.text()
            ticker.cancel()
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            return body, ticks - before

    body, ticks = asyncio.run(run())
    fleet_lines = [line for line in body.splitlines() if line.startswith("m_")]
    assert len(fleet_lines) == 40 and len(set(fleet_lines)) == 40
    assert sum(line.startswith("# TYPE m_") for line in body.splitlines()) == 5  # each family once, grouped
    assert "waystation_exposition_fleet_series 40.0" in body  # the collector's own families follow
    assert ticks >= 8 + 10  # at least a tick per step (8 nodes, 3 series a step) and per piece (40 / 4)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; scripts/test.sh does)")
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # the pieces make one valid exposition
    whole = fleet.exposition(T0 + 10**9).render().decode()
    assert sorted(line.rsplit(" ", 1)[0] for line in fleet_lines) == sorted(
        line.rsplit(" ", 1)[0] for line in whole.splitlines() if line.startswith("m_"))
