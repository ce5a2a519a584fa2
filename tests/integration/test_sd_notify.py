"""The notify protocol against a real datagram socket standing in for systemd: READY,
STATUS, STOPPING and watchdog pings that stop while a loop is wedged or a watched thread
died, from the agent process itself and from real threads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import ENV, Agent, wait_for
from wire.sdnotify import Liveness, Notifier, Watchdog

pytestmark = pytest.mark.timeout(120)


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; each datagram one message."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            raw = self.sock.recv(65536)
        except TimeoutError:
            return None
        msg = dict(line.split("=", 1) for line in raw.decode().splitlines())
        self.messages.append(msg)
        return msg

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.receive(left)
            if msg is not None and key in msg:
                return msg
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages[-5:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[NotifySocket, str]]:
    path = str(tmp_path / "notify.sock")
    s = NotifySocket(path)
    yield s, path
    s.close()


def test_messages_reach_a_path_socket_and_an_abstract_one(manager: tuple[NotifySocket, str]) -> None:
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready("2 batches\nwaiting")
    assert sock.receive(5) == {"READY": "1", "STATUS": "2 batches waiting"}  # one line: no injected key
    assert n.stopping()
    assert sock.receive(5) == {"STOPPING": "1", "STATUS": "stopping"}
    name = f"waystation-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = NotifySocket("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("up")
        assert abstract.receive(5) == {"STATUS": "up"}
    finally:
        abstract.close()


def test_without_a_manager_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not Notifier({}).ready("x")
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert gone.enabled and not gone.watchdog("x")  # logged once, never raised


def test_the_watchdog_is_for_the_process_it_names(manager: tuple[NotifySocket, str]) -> None:
    _, path = manager
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"}).watchdog_interval_s == 2.0
    mine = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval_s == 2.0
    inherited = dict(mine, WATCHDOG_PID=str(os.getppid()))  # set for a parent: not for us
    assert Notifier(inherited).watchdog_interval_s is None


def test_a_wedged_step_stops_the_pings_and_says_why_until_it_returns(manager: tuple[NotifySocket, str]) -> None:
    sock, path = manager
    liveness = Liveness()
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # a ping every 0.1 s
    stop = threading.Event()
    assert Watchdog(notifier, liveness, lambda: "all well").run_thread(stop) is not None
    release = threading.Event()

    def wedged_flush() -> None:
        with liveness.step("flush", 0.5):
            release.wait(30)

    try:
        assert sock.wait_for("WATCHDOG", 5)["STATUS"] == "all well"
        worker = threading.Thread(target=wedged_flush)
        worker.start()
        stuck = sock.wait_for("STATUS", 5)
        while not stuck["STATUS"].startswith("stuck"):
            stuck = sock.wait_for("STATUS", 5)
        assert "WATCHDOG" not in stuck and "flush under way" in stuck["STATUS"], stuck
        # While stuck, no ping at all: systemd's timer runs out and it restarts the unit.
        window: list[dict[str, str]] = []
        end = time.monotonic() + 1.0
        while (left := end - time.monotonic()) > 0:
            msg = sock.receive(left)
            if msg is not None:
                window.append(msg)
        assert window and all("WATCHDOG" not in m for m in window), window
        release.set()
        worker.join(5)
        assert sock.wait_for("WATCHDOG", 5)["STATUS"] == "all well"
    finally:
        release.set()
        stop.set()


def test_a_watched_thread_that_died_stops_the_pings(manager: tuple[NotifySocket, str]) -> None:
    sock, path = manager
    liveness = Liveness()
    lane = threading.Thread(target=lambda: None, name="uplink-live")
    lane.start()
    lane.join()
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}), liveness, lambda: "ok")
    assert watchdog.tick()
    assert sock.receive(5) == {"WATCHDOG": "1", "STATUS": "ok"}
    liveness.watch_thread("uplink-live", lane)
    assert not watchdog.tick()
    assert sock.receive(5) == {"STATUS": "stuck: thread uplink-live is not running"}
    liveness.forget_thread("uplink-live")  # a stop ends it on purpose
    assert watchdog.tick()


def test_the_agent_says_ready_pings_with_its_state_and_says_stopping(
        tmp_path: Path, manager: tuple[NotifySocket, str]) -> None:
    sock, path = manager
    agent = Agent(tmp_path / "node", "http://127.0.0.1:9", extra_toml='[summary]\nwindow = "1s"\n')
    agent.keygen()
    env = dict(ENV, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    with open(agent.log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(agent.config)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = sock.wait_for("READY", 30)
        assert "lab/node-1 to http://127.0.0.1:9" in ready["STATUS"] and "no ack yet" in ready["STATUS"], ready
        pings = [sock.wait_for("WATCHDOG", 5) for _ in range(3)]
        wait_for(lambda: "batches waiting" in sock.wait_for("WATCHDOG", 5)["STATUS"], 20,
                 "the spool depth in the watchdog's STATUS")
        assert all(p["WATCHDOG"] == "1" for p in pings)
        proc.send_signal(signal.SIGTERM)
        assert sock.wait_for("STOPPING", 20)["STOPPING"] == "1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_group_commit_stuck_on_the_ledger_stops_the_collectors_pings(
        tmp_path: Path, manager: tuple[NotifySocket, str]) -> None:
    """A real Committer over a real ledger whose write lock another connection holds: the
    group commit waits (SQLite's busy timeout), the watchdog withholds its pings and says
    why, and once the lock goes the commit lands and the pings resume."""
    import asyncio
    import sqlite3

    from nacl.signing import SigningKey

    import wire
    from collector import trust
    from collector.ingest import Committer
    from collector.ledger import Ledger, Submission

    sock, path = manager
    ledger = Ledger(tmp_path / "ledger.db")
    key = SigningKey.generate()
    record = trust.enroll(ledger.conn, "lab", "n1", bytes(key.verify_key))
    series = [wire.Series("m", (), wire.MetricType.GAUGE, (1_700_000_000_000,), (1.0,))]
    frame = wire.encode_data_batch(wire.BatchContext(key, "lab", "n1", 1, wire.ZERO_HASH, 1, 1, 0), series)
    holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)

    async def scenario() -> list[bool]:
        committer = Committer(ledger, 10)
        committer.stuck_after_s = 0.5
        watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}), committer.liveness,
                            lambda: "committing")
        committer.start()
        ticks = [watchdog.tick()]
        holder.execute("BEGIN EXCLUSIVE")
        pending = asyncio.ensure_future(committer.submit(Submission(wire.parse_frame(frame), record, time.time())))
        await asyncio.sleep(1.5)
        ticks.append(watchdog.tick())
        holder.execute("COMMIT")
        outcome = await pending
        assert outcome.result == "accepted", outcome
        ticks.append(watchdog.tick())
        await committer.stop()
        return ticks

    try:
        assert asyncio.run(scenario()) == [True, False, True]
    finally:
        holder.close()
        ledger.close()
    assert sock.receive(5) == {"WATCHDOG": "1", "STATUS": "committing"}
    stuck = sock.receive(5)
    assert stuck is not None and stuck["STATUS"].startswith("stuck: ledger commit under way"), stuck
    assert sock.receive(5) == {"WATCHDOG": "1", "STATUS": "committing"}


def test_the_collector_says_ready_with_its_state_pings_and_says_stopping(
        tmp_path: Path, manager: tuple[NotifySocket, str]) -> None:
    from tests.conftest import free_port

    sock, path = manager
    port = free_port()
    env = dict(ENV, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    log = tmp_path / "collector.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "collector", "serve", "--data-dir", str(tmp_path / "d"),
                                 "--listen", f"127.0.0.1:{port}"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        ready = sock.wait_for("READY", 30)
        assert ready["STATUS"].startswith("0 nodes;") and f"listening on 127.0.0.1:{port}" in ready["STATUS"], ready
        pings = [sock.wait_for("WATCHDOG", 5) for _ in range(2)]
        assert all("batches/s accepted" in p["STATUS"] for p in pings), pings
        proc.send_signal(signal.SIGTERM)
        assert sock.wait_for("STOPPING", 20)["STOPPING"] == "1"
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _committer_fixture(tmp_path: Path) -> tuple[Any, Any, list[bytes]]:
    """A real ledger with lab/n1 enrolled, its record, and n1's chain seq 1..3."""
    from nacl.signing import SigningKey

    import wire
    from collector import trust
    from collector.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.db")
    key = SigningKey.generate()
    record = trust.enroll(ledger.conn, "lab", "n1", bytes(key.verify_key))
    frames: list[bytes] = []
    for seq in (1, 2, 3):
        prev = wire.batch_hash(frames[-1]) if frames else wire.ZERO_HASH
        series = [wire.Series("m", (), wire.MetricType.GAUGE, (1_700_000_000_000 + seq,), (1.0,))]
        frames.append(wire.encode_data_batch(wire.BatchContext(key, "lab", "n1", seq, prev, seq, seq, 0), series))
    return ledger, record, frames


def test_a_committer_task_that_died_stops_the_collectors_pings(
        tmp_path: Path, manager: tuple[NotifySocket, str]) -> None:
    """No commit under way, so no step is stuck, yet nothing will ever commit again: the
    committer task itself is watched."""
    import asyncio

    from collector.ingest import Committer

    sock, path = manager
    ledger, _, _ = _committer_fixture(tmp_path)

    async def scenario() -> list[bool]:
        committer = Committer(ledger, 10)
        watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}), committer.liveness,
                            lambda: "committing")
        committer.start()
        ticks = [watchdog.tick()]
        assert committer._task is not None
        committer._task.cancel()  # what any exception escaping _run would leave: a task that is done
        with pytest.raises(asyncio.CancelledError):
            await committer._task
        ticks.append(watchdog.tick())
        committer.executor.shutdown(wait=True)
        return ticks

    try:
        assert asyncio.run(scenario()) == [True, False]
    finally:
        ledger.close()
    assert sock.receive(5) == {"WATCHDOG": "1", "STATUS": "committing"}
    assert sock.receive(5) == {"STATUS": "stuck: ledger committer is not running"}


def test_an_outcome_hook_that_raises_does_not_stop_the_committer(
        tmp_path: Path, manager: tuple[NotifySocket, str], caplog: pytest.LogCaptureFixture) -> None:
    """The hook (serve's: the latest state's accounting) fails after the commit: the sender
    still gets its answer, the next submissions commit, and the pings go on."""
    import asyncio

    import wire
    from collector.ingest import Committer
    from collector.ledger import Outcome, Submission

    sock, path = manager
    ledger, record, frames = _committer_fixture(tmp_path)
    seen: list[int] = []

    def on_outcome(outcome: Outcome) -> None:
        seen.append(outcome.state.highest_seq)
        raise RuntimeError(f"hook failed after seq {outcome.state.highest_seq}")

    async def scenario() -> tuple[list[str], bool]:
        committer = Committer(ledger, 10, on_outcome)
        watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}), committer.liveness,
                            lambda: "committing")
        committer.start()
        results = []
        for raw in frames:
            sub = Submission(wire.parse_frame(raw), record, time.time())
            outcome = await asyncio.wait_for(committer.submit(sub), 30)
            results.append(outcome.result)
        ticked = watchdog.tick()
        await committer.stop()
        return results, ticked

    try:
        assert asyncio.run(scenario()) == (["accepted"] * 3, True)
        assert ledger.conn.execute("SELECT COUNT(*) FROM batches").fetchone() == (3,)
    finally:
        ledger.close()
    assert seen == [1, 2, 3]
    failures = [r for r in caplog.records if "applying its outcome failed" in r.getMessage()]
    assert len(failures) == 3 and "lab/n1 (accepted)" in failures[0].getMessage(), caplog.text
    assert failures[0].exc_info is not None and "hook failed after seq 1" in str(failures[0].exc_info[1])
    assert sock.receive(5) == {"WATCHDOG": "1", "STATUS": "committing"}


def test_the_collector_extends_its_start_while_an_import_holds_the_data_dir(
        tmp_path: Path, manager: tuple[NotifySocket, str]) -> None:
    """A start that waits (for an import here; for a long ledger replay likewise) keeps
    asking systemd for more time (EXTEND_TIMEOUT_USEC) and says what it waits for; READY
    comes once the import let go."""
    from collector import serve_link
    from tests.conftest import free_port

    sock, path = manager
    port = free_port()
    data_dir = tmp_path / "d"
    env = dict(ENV, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    log = tmp_path / "collector.log"
    lock = serve_link.DataDirLock(data_dir)
    assert lock.try_acquire("import")  # labelled `import <pid> <nonce>`, as an import's
    released = False
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "collector", "serve", "--data-dir", str(data_dir),
                                 "--listen", f"127.0.0.1:{port}"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        waiting = f"starting: waiting for `waystation-collector import` (pid {os.getpid()}) to finish with {data_dir}"
        deadline = time.monotonic() + 30
        extend = sock.wait_for("EXTEND_TIMEOUT_USEC", 30)
        while extend["STATUS"] != waiting:
            assert time.monotonic() < deadline, sock.messages
            extend = sock.wait_for("EXTEND_TIMEOUT_USEC", 30)
        assert int(extend["EXTEND_TIMEOUT_USEC"]) >= 30_000_000, extend
        time.sleep(1.0)
        assert proc.poll() is None
        assert not any("READY" in m for m in sock.messages), sock.messages
        lock.close()
        released = True
        ready = sock.wait_for("READY", 30)
        assert ready["STATUS"].startswith("0 nodes;"), ready
        between = sock.messages[sock.messages.index(extend) + 1 : sock.messages.index(ready)]
        replaying = f"starting: replaying the ledger {data_dir / 'ledger.db'}"
        statuses = [m["STATUS"] for m in between if "EXTEND_TIMEOUT_USEC" in m]
        assert statuses[-1:] == [replaying] and set(statuses) <= {waiting, replaying}, between
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if not released:
            lock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
