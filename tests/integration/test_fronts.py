"""serve with front processes (`workers = N`, collector/fronts.py), as real processes on
loopback: a front that dies is started again and nothing acknowledged is lost, fronts go
when serve goes, and serve stops them before it stops. What every request does through the
fronts is tested by the suites that run both ways (test_collector_ingest, test_series_tables,
test_import_link)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import wire
from tests.integration.harness import wait_for
from tests.integration.test_collector_ingest import (
    CONFIG,
    ENV,
    SITE,
    Node,
    Server,
    front_pids,
    run_cli,
    start_server,
)
from tests.integration.test_series_tables import V2Node
from wire.keys import parse_collector_key

pytestmark = pytest.mark.timeout(180)


def serve_with_fronts(tmp_path: Path, workers: int, *nodes: Node) -> Server:
    config = tmp_path / "collector.toml"
    config.write_text(f"workers = {workers}\n" + CONFIG)
    data_dir = tmp_path / "data"
    for n in nodes:
        r = run_cli(data_dir, config, "enroll", "--site", SITE, "--node", n.name, "--key", n.pubkey)
        assert r.returncode == 0, r.stderr
    return start_server(data_dir, config)


def post_until_answered(srv: Server, frame: bytes, deadline_s: float = 60.0) -> tuple[int, str]:
    """Posts `frame` until an answer comes that is not 503, as the agent's uplink does."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            status, body = srv.post(frame)
            if status != 503:
                return status, str(body["result"])
        except (OSError, http.client.HTTPException):
            pass  # the front holding this connection was killed: the agent sends it again
        assert time.monotonic() < deadline, "no answer but 503 or a dropped connection"
        time.sleep(0.05)


def stored_seqs(data_dir: Path, node: str) -> list[int]:
    db = sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in db.execute("SELECT seq FROM batches WHERE node = ? ORDER BY seq", (node,))]
    finally:
        db.close()


def test_serve_runs_the_fronts_it_is_told_and_they_take_the_posts(tmp_path: Path) -> None:
    node = Node("n1")
    srv = serve_with_fronts(tmp_path, 3, node)
    try:
        fronts = front_pids(srv.proc.pid)
        assert len(fronts) == 3
        # serve itself does not take the public port's connections: only the fronts listen.
        listening = {int(p) for p in _listening_pids(srv.host_port[1])}
        assert listening == set(fronts), (listening, fronts, srv.proc.pid)
        for seq in range(1, 31):  # a connection each: the kernel spreads them over the fronts
            assert post_until_answered(srv, node.data(seq)) == (200, "accepted")
        assert stored_seqs(srv.data_dir, "n1") == list(range(1, 31))
        assert srv.nodes()[(SITE, "n1")]["complete_through"] == 30
        assert srv.counter("accepted") == 30
    finally:
        assert srv.stop() == 0
    assert not _alive(fronts), "serve stopped with its fronts still running"


def test_a_killed_front_is_started_again_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    node = Node("n1")
    srv = serve_with_fronts(tmp_path, 2, node)
    try:
        first = front_pids(srv.proc.pid)
        assert len(first) == 2
        acked = []
        for seq in range(1, 41):
            if seq == 15:
                os.kill(first[0], signal.SIGKILL)
            if seq == 25:
                os.kill(first[1], signal.SIGKILL)
            status, result = post_until_answered(srv, node.data(seq))
            assert status == 200 and result in ("accepted", "duplicate"), (seq, status, result)
            acked.append(seq)
        assert stored_seqs(srv.data_dir, "n1") == acked
        assert srv.nodes()[(SITE, "n1")]["complete_through"] == 40
        wait_for(lambda: len(front_pids(srv.proc.pid)) == 2, 30, "both fronts started again")
        assert not set(front_pids(srv.proc.pid)) & set(first)
        m = srv.metrics()
        assert m[("waystation_collector_front_restarts_total", ())] == 2
        assert m[("waystation_collector_front_processes", ())] == 2
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0


def test_fronts_go_when_serve_is_killed_and_free_the_port(tmp_path: Path) -> None:
    srv = serve_with_fronts(tmp_path, 2)
    fronts = front_pids(srv.proc.pid)
    assert len(fronts) == 2
    srv.proc.kill()
    srv.proc.wait(10)
    wait_for(lambda: not _alive(fronts), 20, "the fronts to exit after serve was killed")
    with socket.create_server(srv.host_port):  # nothing holds the address any more
        pass


def _alive(pids: list[int]) -> bool:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return bool(alive)


def _listening_pids(port: int) -> set[str]:
    """Pids holding a socket that listens on `port` (from /proc/net/tcp and each fd)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    pids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.add(pid)
        except OSError:
            continue
    return pids


class SealedNode(V2Node):
    """A wire v2 node whose payloads and series tables are sealed to the collector's key."""

    def __init__(self, name: str, collector_key: Any) -> None:
        super().__init__(name)
        self.collector_key = collector_key

    def data(self, seq: int, value: float = 1.0, extra: tuple[wire.Series, ...] = ()) -> bytes:
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        table, placed = self.builder.place(self.series(seq, value, extra), seal_to=self.collector_key)
        ctx = wire.BatchContext(self.key, self.site, self.name, seq, prev, 1_700_000_000_000 + seq, seq)
        prepared = wire.seal_prepared(wire.prepare_columns(table, placed, 3), self.collector_key)
        self.frames[seq] = wire.sign_batch(prepared, ctx)
        self.tables[seq] = table.blob
        return self.frames[seq]


def test_after_a_restart_serve_asks_the_fronts_for_tables_and_never_opens_them(tmp_path: Path) -> None:
    # Sealed tables open only with the collector's keys: serve takes the table the front
    # opened rather than reading and opening it again (a restarted serve holds none).
    config = tmp_path / "collector.toml"
    config.write_text("workers = 2\n" + CONFIG)
    data_dir = tmp_path / "data"
    r = run_cli(data_dir, config, "keygen")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("collector_key = "))
    node = SealedNode("a", parse_collector_key(line.split("=", 1)[1].strip().strip('"')))
    r = run_cli(data_dir, config, "enroll", "--site", SITE, "--node", "a", "--key", node.pubkey)
    assert r.returncode == 0, r.stderr
    srv = start_server(data_dir, config)
    try:
        node.data(1)
        assert srv.post(node.body(1))[1]["result"] == "accepted"
        assert srv.post(node.data(2))[1]["result"] == "accepted"  # the table by id only
    finally:
        assert srv.stop() == 0
    srv = start_server(data_dir, config)
    try:
        for seq in range(3, 9):  # fresh fronts and serve: each front reads the table from the ledger
            status, body = srv.post(node.data(seq))
            assert (status, body["result"], body["complete_through"]) == (200, "accepted", seq), body
        assert stored_seqs(data_dir, "a") == list(range(1, 9))
    finally:
        assert srv.stop() == 0


def test_a_second_collector_on_the_same_port_is_refused(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    first = serve_with_fronts(tmp_path / "one", 1)
    try:
        port = first.host_port[1]
        config = tmp_path / "two.toml"
        config.write_text("workers = 1\n" + CONFIG)
        second = subprocess.run(
            [sys.executable, "-m", "collector", "serve", "--config", str(config), "--data-dir",
             str(tmp_path / "two"), "--listen", f"127.0.0.1:{port}"],
            env=ENV, capture_output=True, text=True, timeout=60,
        )
        assert second.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr, second.stderr
        assert first.post(b"x")[1]["result"] == "malformed"  # the first one still has the port
    finally:
        assert first.stop() == 0
