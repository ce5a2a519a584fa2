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
import time
from pathlib import Path

import pytest

from tests.integration.harness import wait_for
from tests.integration.test_collector_ingest import (
    CONFIG,
    SITE,
    Node,
    Server,
    front_pids,
    run_cli,
    start_server,
)

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
