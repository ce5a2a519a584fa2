"""The uplink and series tables (wire v2), against a loopback peer that answers as the
collector does: it opens every body with wire.open_batch against the tables it holds.

A batch goes with its table while the collector is not known to hold it; 428
unknown_table sends it again at once with the table, and once more only after a backoff;
a collector older than the agent (400 unsupported_version, or malformed to a body that
starts with a table) never makes the agent set a batch aside. Also: wire_version = 1, the
config key, and the agent's footprint (no numpy)."""

from __future__ import annotations

import http.server
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

import wire
from agent import cli
from agent.config import (
    AgentConfig,
    NetworkSourceConfig,
    SourcesConfig,
    SystemSourceConfig,
    UplinkConfig,
    load_agent_config,
)
from agent.daemon import Agent
from agent.spool import Spool
from agent.uplink import Uplink, classify
from tests.conftest import REPO
from wire.config import ConfigError, Duration

T0 = 1_700_000_000_000
SITE, NODE = "s", "n"


@dataclass(frozen=True)
class Post:
    at: float  # time.monotonic()
    seq: int
    version: int
    table: bytes | None  # the id of the table sent with the frame
    size: int  # the request body's bytes
    status: int
    result: str


class Collector:
    """A loopback stand-in for the collector's POST /v1/batches and chain endpoint.

    Modes: "v2" verifies and answers as the collector (unknown_table 428 for a table it does
    not hold); "v1" is a collector that reads only wire v1 (a body starting with a table is a
    frame with a bad magic, a v2 frame unsupported_version); "no_v2" answers every v2 batch
    unsupported_version; "stubborn" answers every v2 batch unknown_table, table sent or not;
    "bad_table" refuses every table sent as malformed (the bare frame is then judged as "v2");
    "small_body" answers a body with a table too_large (table and frame pass max_body_bytes)."""

    def __init__(self, key: SigningKey, mode: str = "v2") -> None:
        self.pub = bytes(key.verify_key)
        self.mode = mode
        self.tables = wire.MemoryTables()
        self.posts: list[Post] = []
        self.lock = threading.Lock()

    def lookup(self, kid: bytes) -> Any:
        pub = self.pub

        class Enrolled:
            public_key = pub

            def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
                return None

        return Enrolled() if kid == wire.key_id(pub) else None

    def answer(self, body: bytes) -> tuple[int, dict[str, object], int, int, bytes | None]:
        """(status, reply, seq, version, id of the table sent with it)."""
        if self.mode == "v1" and body[:4] == wire.TABLE_MAGIC:
            return 400, {"result": "malformed", "error": "bad magic (not a Waystation batch)"}, 0, 0, None
        attached, frame = wire.split_body(body)
        h = wire.parse_frame(frame).header
        tid = None if attached is None else wire.table_id(attached)
        v2 = h.version == wire.WIRE_VERSION_2
        if v2 and self.mode in ("v1", "no_v2"):
            return 400, {"result": "unsupported_version", "error": "wire version 2, this side speaks 1"}, \
                h.seq, h.version, tid
        if v2 and self.mode == "stubborn":
            return 428, {"result": "unknown_table", "error": "not held", "seq": h.seq}, h.seq, h.version, tid
        if attached is not None and self.mode == "small_body":
            return 413, {"result": "too_large", "error": "body exceeds max_body_bytes"}, h.seq, h.version, tid
        if attached is not None and self.mode == "bad_table":
            return 400, {"result": "malformed", "error": "bad series table", "seq": h.seq}, h.seq, h.version, tid
        opened = wire.open_batch(frame, self.lookup, series_tables=self.tables, attached_table=attached)
        if isinstance(opened, wire.Refusal):
            status = 428 if opened.result == "unknown_table" else 400
            return status, {"result": opened.result, "error": opened.detail, "seq": h.seq}, h.seq, h.version, tid
        return 200, {"result": "accepted", "seq": h.seq, "complete_through": h.seq}, h.seq, h.version, tid

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.endswith("/chain"):
                    self._reply(404, {"result": "unknown_node", "error": "never heard of it"})
                else:
                    self._reply(200, {"result": "ok"})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with peer.lock:
                    status, reply, seq, version, tid = peer.answer(body)
                    peer.posts.append(Post(time.monotonic(), seq, version, tid, len(body), status,
                                           str(reply["result"])))
                self._reply(status, reply)

            def _reply(self, status: int, reply: dict[str, object]) -> None:
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def forget_tables(self) -> None:
        """A collector whose ledger was restored without its series tables."""
        with self.lock:
            self.tables = wire.MemoryTables()

    def seen(self) -> list[Post]:
        with self.lock:
            return list(self.posts)


@contextmanager
def running(peer: Collector) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), peer.handler())
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _series(i: int, names: tuple[str, ...] = ("node_load1",)) -> list[wire.Series]:
    ts = (T0 + i * 10_000, T0 + i * 10_000 + 5000)
    return [wire.Series(name, (("cpu", str(k)),), wire.MetricType.GAUGE, ts, (float(i), float(k)))
            for name in names for k in range(4)]


class Producer:
    """What the agent's main loop does: sign batches into the spool with one TableBuilder."""

    def __init__(self, path: Path, key: SigningKey, version: int = 2) -> None:
        self.path, self.key = path, key
        self.tables = wire.TableBuilder() if version == 2 else None
        self.i = 0

    def sign(self, n: int = 1, names: tuple[str, ...] = ("node_load1",)) -> None:
        sp = Spool(self.path)
        try:
            for _ in range(n):
                sp.append_data(self.key, SITE, NODE, _series(self.i, names), 1 << 30, T0, tables=self.tables)
                self.i += 1
        finally:
            sp.close()


def _uplink(url: str, path: Path, key: SigningKey, initial: float = 0.2, maximum: float = 0.4) -> Uplink:
    config = UplinkConfig(url=url, backoff_initial=Duration(initial), backoff_max=Duration(maximum),
                          probe_interval="0s")
    return Uplink(config, path, identity=(key, SITE, NODE))


def _wait_until(cond: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _table_ids(path: Path) -> list[bytes]:
    sp = Spool(path)
    try:
        return [bytes(r[0]) for r in sp.db.execute(
            "SELECT DISTINCT table_id FROM batches WHERE table_id IS NOT NULL ORDER BY seq")]
    finally:
        sp.close()


def _rows(path: Path) -> list[tuple[int, int, str]]:
    """(seq, kind, state) of every batch in the spool."""
    sp = Spool(path)
    try:
        return [(int(s), int(k), str(st)) for s, k, st in sp.db.execute("SELECT seq, kind, state FROM batches")]
    finally:
        sp.close()


# ---------------------------------------------------------------- classify


def test_classify_tells_unknown_table_and_unsupported_version_apart() -> None:
    unknown = json.dumps({"result": "unknown_table", "error": "send it", "seq": 7}).encode()
    assert classify(428, {}, unknown, 0, 7).kind == "unknown_table"
    assert classify(428, {}, b'{"result": "something_else"}', 0, 7).kind == "retry"
    assert classify(428, {}, b"<html>precondition</html>", 0, 7).kind == "retry"  # not the collector's
    old = b'{"result": "unsupported_version", "error": "wire version 2, this side speaks 1"}'
    assert classify(400, {}, old, 0, 7).kind == "unsupported_version"
    malformed = classify(400, {}, b'{"result": "malformed", "error": "bad magic"}', 0, 7)
    assert (malformed.kind, malformed.result) == ("reject", "malformed")


# ---------------------------------------------------------------- delivery


def test_the_first_batch_after_a_start_carries_its_table_and_later_ones_do_not(tmp_path: Path) -> None:
    key, path = SigningKey.generate(), tmp_path / "spool.db"
    producer = Producer(path, key)
    producer.sign(4)
    (tid,) = _table_ids(path)
    peer = Collector(key)
    with running(peer) as url:
        up = _uplink(url, path, key)
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 4, "four acks")
            # New series: a new table, sent with the first batch naming it.
            producer.sign(1, ("node_load1", "node_load5"))
            up.notify()
            _wait_until(lambda: up.stats.acked_batches == 5, "the fifth ack")
            producer.sign(1, ("node_load5",))  # a subset of the same table
            up.notify()
            _wait_until(lambda: up.stats.acked_batches == 6, "the sixth ack")
        finally:
            up.stop()
        posts = peer.seen()
        assert all(p.status == 200 and p.version == 2 for p in posts)
        assert sorted(p.seq for p in posts) == [1, 2, 3, 4, 5, 6]
        assert _table_ids(path) == []  # every batch acked: no table left in the spool either
        with_table = [p for p in posts if p.table is not None]
        assert [p.seq for p in with_table] == [posts[0].seq, 5]
        assert with_table[0].table == tid and with_table[1].table != tid
        # The table's bytes are counted as sent.
        assert up.stats.sent_bytes == sum(p.size for p in posts)
        assert up.stats.sent_batches == 6

        # The next start knows nothing of what the collector holds: it sends the table again.
        producer.sign(1, ("node_load5",))
        up = _uplink(url, path, key)
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 1, "the ack after a restart")
        finally:
            up.stop()
        last = peer.seen()[-1]
        assert (last.seq, last.status) == (7, 200) and last.table == with_table[1].table
    sp = Spool(path)
    try:
        assert sp.stats().pending_batches == 0 and sp.db.execute("SELECT COUNT(*) FROM tables").fetchone()[0] == 0
    finally:
        sp.close()


def test_unknown_table_sends_the_batch_again_at_once_with_its_table(tmp_path: Path) -> None:
    key, path = SigningKey.generate(), tmp_path / "spool.db"
    producer = Producer(path, key)
    producer.sign(1)
    peer = Collector(key)
    with running(peer) as url:
        up = _uplink(url, path, key, initial=2.0, maximum=4.0)  # a backoff would show
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 1, "the first ack")
            peer.forget_tables()  # the agent still believes the collector holds the table
            producer.sign(1)
            up.notify()
            _wait_until(lambda: up.stats.acked_batches == 2, "the second ack")
        finally:
            up.stop()
    posts = peer.seen()
    assert [(p.seq, p.table is not None, p.status) for p in posts] == [
        (1, True, 200), (2, False, 428), (2, True, 200)]
    assert posts[2].at - posts[1].at < 1.0  # at once, not after a backoff of at least 1s
    assert up.stats.failures == 0 and up.stats.rejected_batches == 0
    assert _rows(path) == []


def test_a_second_unknown_table_with_the_table_sent_backs_off_and_keeps_the_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, path = SigningKey.generate(), tmp_path / "spool.db"
    Producer(path, key).sign(1)
    (tid,) = _table_ids(path)
    peer = Collector(key, mode="stubborn")
    caplog.set_level(logging.WARNING, logger="waystation.uplink")
    with running(peer) as url:
        up = _uplink(url, path, key, initial=0.4, maximum=0.4)
        up.known_tables.add(tid)  # believed held: the first try goes without it
        up.start()
        try:
            _wait_until(lambda: len(peer.seen()) >= 4, "four tries")
            with peer.lock:
                peer.mode = "v2"
            _wait_until(lambda: up.stats.acked_batches == 1, "the ack once the collector keeps tables")
        finally:
            up.stop()
    posts = peer.seen()
    assert [(p.table is not None, p.status) for p in posts[:4]] == [
        (False, 428), (True, 428), (True, 428), (True, 428)]
    assert posts[1].at - posts[0].at < 0.15  # the one resend at once
    assert posts[2].at - posts[1].at >= 0.15  # then backoff (0.2..0.4s)
    assert posts[-1].status == 200 and posts[-1].table == tid
    assert up.stats.rejected_batches == 0 and up.stats.failures >= 2
    assert any("was sent with it" in r.getMessage() for r in caplog.records)
    assert _rows(path) == []  # delivered; no batch set aside, no drop receipt signed
    sp = Spool(path)
    try:
        assert sp.stats().counters["rejected_batches"] == 0 and sp.stats().counters["dropped_batches"] == 0
    finally:
        sp.close()


@pytest.mark.parametrize("mode", ["v1", "no_v2"])
def test_a_collector_older_than_the_agent_never_makes_it_set_a_batch_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """v1: the collector reads a body that starts with a table as a frame with a bad magic
    (malformed), and the frame alone as unsupported_version; no_v2: unsupported_version to
    everything. Either way the batch stays, nothing is signed in its place, and the
    warning (once) names the fix."""
    key, path = SigningKey.generate(), tmp_path / "spool.db"
    Producer(path, key).sign(1)
    peer = Collector(key, mode=mode)
    caplog.set_level(logging.WARNING, logger="waystation.uplink")
    with running(peer) as url:
        up = _uplink(url, path, key, initial=0.1, maximum=0.2)
        up.start()
        try:
            _wait_until(lambda: len([p for p in peer.seen() if p.result == "unsupported_version"]) >= 3,
                        "three refusals of the version")
        finally:
            up.stop()
    posts = peer.seen()
    if mode == "v1":
        assert [(p.table is not None, p.result) for p in posts[:2]] == [
            (False, "malformed"), (False, "unsupported_version")]
        assert posts[0].size > posts[1].size  # the first carried the table
    # Known to predate v2 now: later tries go without the table (one request each).
    assert len({p.size for p in posts[-2:]}) == 1 and all(p.result == "unsupported_version" for p in posts[-2:])
    assert posts[-1].size == min(p.size for p in posts)
    assert up.stats.rejected_batches == 0 and up.stats.acked_batches == 0
    assert _rows(path) == [(1, int(wire.Kind.DATA), "pending")]  # kept, and no drop receipt
    warnings = [r.getMessage() for r in caplog.records if "wire_version = 1" in r.getMessage()]
    assert len(warnings) == 1 and "upgrade the collector" in warnings[0]
    sp = Spool(path)
    try:
        st = sp.stats()
        assert st.last_error is not None and "wire_version = 1" in st.last_error
        assert st.counters["rejected_batches"] == 0 and st.counters["dropped_batches"] == 0
    finally:
        sp.close()
    # The collector is upgraded: the batch kept goes through.
    peer.mode = "v2"
    with running(peer) as url:
        up = _uplink(url, path, key)
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 1, "the ack after the upgrade")
        finally:
            up.stop()
    assert _rows(path) == []


def test_a_table_the_collector_refuses_sets_the_batch_aside_with_a_drop_receipt(tmp_path: Path) -> None:
    """A collector that reads v2 (it answers the frame alone unknown_table) but refuses the
    table sent with it: no resend can help, the batch is set aside and accounted for."""
    key, path = SigningKey.generate(), tmp_path / "spool.db"
    Producer(path, key).sign(1)
    peer = Collector(key, mode="bad_table")
    with running(peer) as url:
        up = _uplink(url, path, key)
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 1, "the drop receipt's ack")
        finally:
            up.stop()
    posts = peer.seen()
    assert [(p.seq, p.table is not None, p.result) for p in posts] == [
        (1, True, "malformed"), (1, False, "unknown_table"), (2, False, "accepted")]
    assert posts[2].version == wire.WIRE_VERSION  # a drop receipt is v1
    assert _rows(path) == [(1, int(wire.Kind.DATA), "rejected")]


def test_a_body_too_large_only_with_its_table_is_sent_again_alone_and_kept(tmp_path: Path) -> None:
    """After a start the agent sends a table the collector may already hold; if table and
    frame together pass max_body_bytes (413) the frame alone is tried before anything is set
    aside, and a collector that holds the table takes it."""
    key, path = SigningKey.generate(), tmp_path / "spool.db"
    producer = Producer(path, key)
    producer.sign(1)
    peer = Collector(key)
    with running(peer) as url:
        up = _uplink(url, path, key)
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 1, "the first batch's ack")
        finally:
            up.stop()
        producer.sign(1)  # the same table: the collector holds it, a new uplink does not know
        peer.mode = "small_body"
        up = _uplink(url, path, key)
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 1, "the second batch's ack")
        finally:
            up.stop()
    assert [(p.seq, p.table is not None, p.result) for p in peer.seen()] == [
        (1, True, "accepted"), (2, True, "too_large"), (2, False, "accepted")]
    assert _rows(path) == []


# ---------------------------------------------------------------- wire_version, config, footprint


def _agent(tmp_path: Path, url: str = "http://127.0.0.1:9", **uplink: Any) -> Agent:
    config = AgentConfig(node=NODE, site=SITE, state_dir=str(tmp_path),
                         uplink=UplinkConfig(url=url, **uplink),
                         sources=SourcesConfig(system=SystemSourceConfig(enabled=False),
                                               network=NetworkSourceConfig(enabled=False)))
    return Agent(config, SigningKey.generate())


@pytest.mark.parametrize("version", [1, 2])
def test_the_agent_signs_the_wire_version_configured(tmp_path: Path, version: int) -> None:
    agent = _agent(tmp_path, wire_version=version)
    try:
        assert agent._open_spool() is not None
        for i in range(3):
            agent.store(_series(i))
        spool = agent.spool
        assert spool is not None
        rows = [(wire.parse_frame(bytes(f)).header.version, tid)
                for f, tid in spool.db.execute("SELECT frame, table_id FROM batches WHERE kind = 0")]
        tables = spool.db.execute("SELECT COUNT(*) FROM tables").fetchone()[0]
    finally:
        if agent.spool is not None:
            agent.spool.close()
    assert len(rows) == 3 and {v for v, _ in rows} == {version}
    if version == 1:
        assert all(tid is None for _, tid in rows) and tables == 0
    else:  # the same series each time: one table, stored once, named by all three
        assert len({tid for _, tid in rows}) == 1 and rows[0][1] is not None and tables == 1


def test_with_wire_version_1_the_uplink_sends_v1_frames_and_no_table(tmp_path: Path) -> None:
    key, path = SigningKey.generate(), tmp_path / "spool.db"
    Producer(path, key, version=1).sign(3)
    peer = Collector(key)
    with running(peer) as url:
        up = _uplink(url, path, key)
        up.start()
        try:
            _wait_until(lambda: up.stats.acked_batches == 3, "three acks")
        finally:
            up.stop()
    posts = peer.seen()
    assert [(p.version, p.table) for p in posts] == [(1, None)] * 3
    assert up.stats.sent_bytes == sum(p.size for p in posts)


def test_wire_version_is_validated_and_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert AgentConfig().uplink.wire_version == 2
    cfg = tmp_path / "agent.toml"
    for bad in ("3", "0", '"2"'):
        cfg.write_text(f"[uplink]\nwire_version = {bad}\n")
        with pytest.raises(ConfigError, match="wire_version") as exc:
            load_agent_config(cfg)
        assert "uplink" in str(exc.value)
    cfg.write_text("[uplink]\nwire_version = 1\n")
    assert load_agent_config(cfg).uplink.wire_version == 1
    capsys.readouterr()
    assert cli.main(["check-config", "--config", str(cfg), "--state-dir", str(tmp_path)]) == 0
    assert "wire version 1" in capsys.readouterr().out
    cfg.write_text("")
    assert cli.main(["check-config", "--config", str(cfg), "--state-dir", str(tmp_path)]) == 0
    assert "wire version 2" in capsys.readouterr().out


def test_the_agent_never_imports_numpy() -> None:
    """wire.columns (pure Python) encodes v2 on the agent; numpy is for readers only
    (wire.columns_np), and would cost the agent's RSS budget many megabytes."""
    code = ("import agent.daemon, agent.cli, agent.uplink, agent.spool, agent.config; import wire; "
            "import sys; print('numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
