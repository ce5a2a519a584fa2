"""The exposed latest state across stops and crashes, over a real SQLite ledger: periodic saves
of what changed with the batch position they cover, and the start-up rebuild from them."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry, generate_latest

import wire
from collector import app as app_mod
from collector import ledger as ledger_mod
from collector import trust
from collector.app import StateSaves, _save_latest_forever, rebuild_latest_state, save_latest_state
from collector.exposition import HOLD_MS, FleetCollector, FleetState
from collector.ingest import Committer
from collector.ledger import Ledger, Submission

SITE, NODE = "s1", "n1"
T0 = int(time.time() * 1000) - 3_600_000
LIMITS = wire.OpenLimits(1 << 24, wire.Limits(1000, 100_000, 32))
G = wire.MetricType.GAUGE
SMART = ("smartctl_device_temperature", (("device", "sda"),))


class Node:
    """A node's signed batches, committed to the ledger and applied to the state as ingest does."""

    def __init__(self, ledger: Ledger, fleet: FleetState) -> None:
        self.key = SigningKey.generate()
        self.ledger, self.fleet = ledger, fleet
        self.record = trust.enroll(ledger.conn, SITE, NODE, bytes(self.key.verify_key))
        self.frames: dict[int, bytes] = {}

    def batch(
        self, seq: int, received_at: float | None = None, **values: float
    ) -> tuple[Submission, list[wire.Series]]:
        """Batch `seq` at T0 + seq × 30 s carrying the named series (smart=… for SMART),
        received a second after its newest sample unless `received_at` says otherwise."""
        ts = T0 + seq * 30_000  # 4 batches stay within HOLD_MS: own timestamps shown
        series = [
            wire.Series(*SMART, G, (ts,), (v,)) if name == "smart" else wire.Series(name, (), G, (ts,), (v,))
            for name, v in values.items()
        ]
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        raw = wire.encode_data_batch(wire.BatchContext(self.key, SITE, NODE, seq, prev, ts, seq, 1), series)
        self.frames[seq] = raw
        at = (ts + 1000) / 1000 if received_at is None else received_at
        return Submission(wire.parse_frame(raw), self.record, at), series

    def send(self, seq: int, received_at: float | None = None, **values: float) -> None:
        sub, series = self.batch(seq, received_at, **values)
        [outcome] = self.ledger.commit([sub])
        assert outcome.result == "accepted", outcome
        self.fleet.apply(SITE, NODE, series, now_ms=int(sub.received_at * 1000))


def exposed(fleet: FleetState) -> dict[str, tuple[float, int]]:
    """Fleet series by name: (value, timestamp ms) as /metrics shows them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    out = {}
    body = fleet.exposition(int(time.time() * 1000)).render() + generate_latest(registry)  # as /metrics
    for line in body.decode().splitlines():
        if line.startswith(("#", "waystation_")):
            continue
        name = line.split("{", 1)[0]
        _, value, ts = line.rsplit(" ", 2)
        out[name] = (float(value), int(ts))
    return out


def direct(ledger: Ledger) -> Callable[..., Any]:
    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    return call


def save(ledger: Ledger, fleet: FleetState, keep: int = 1) -> int:
    return asyncio.run(save_latest_state(ledger, fleet, direct(ledger), keep))


def restart(path: Path, ledger: Ledger, ttl_s: float = 3600.0) -> tuple[Ledger, FleetState, tuple[int, int]]:
    """What a start does after a crash: a fresh process, the same ledger file."""
    ledger.close()
    ledger = Ledger(path)
    fleet = FleetState(1000, series_ttl_s=ttl_s)
    return ledger, fleet, rebuild_latest_state(ledger, fleet, LIMITS)


def saved_rows(ledger: Ledger) -> dict[str, tuple[int, float]]:
    return {r[2]: (r[5], r[6]) for r in ledger.load_latest()[0]}


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    ledger = Ledger(tmp_path / "ledger.db")
    fleet = FleetState(1000)
    yield tmp_path / "ledger.db", ledger, fleet, Node(ledger, fleet)
    ledger.close()


def test_after_a_crash_the_state_is_the_saved_one_plus_every_batch_after_it(setup: Any) -> None:
    path, ledger, fleet, node = setup
    node.send(1, smart=41.0, node_load1=1.0)  # SMART: read once, not in any later batch
    assert save(ledger, fleet) == 0  # the replay from 0 brings seq 1 back
    node.send(2, node_load1=2.0)
    assert save(ledger, fleet) == 1  # SMART changed before the kept epoch: written, position seq 1
    node.send(3, node_load1=3.0, node_memory_MemFree_bytes=5e9)
    node.send(4, node_load1=4.0)
    before = exposed(fleet)
    # No save after seq 2: a crash here.
    ledger, restored, (series, replayed) = restart(path, ledger)
    try:
        assert (series, replayed) == (1, 3)  # the save, then seq 2, 3 and 4
        assert exposed(restored) == before
        assert before["smartctl_device_temperature"] == (41.0, T0 + 30_000)
        assert before["node_load1"] == (4.0, T0 + 4 * 30_000)
        # The restart did not use up the save: a second crash restores the same.
        ledger, again, _ = restart(path, ledger)
        assert exposed(again) == before
    finally:
        ledger.close()


def test_a_save_writes_only_what_the_replay_would_not_bring_back(tmp_path: Path) -> None:
    """A series the node sends with every batch changes in every save interval: the batches
    after the saved position restore it, so it is never written. SMART (sent once) is
    written once it is older than the kept epochs; expired series are deleted."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    fleet = FleetState(1000, series_ttl_s=600)
    node = Node(ledger, fleet)
    try:
        node.send(1, smart=41.0, node_load1=1.0, up=1.0)
        written = [save(ledger, fleet, keep=2)]
        for seq in range(2, 12):  # a batch per save interval, without SMART and `up`
            node.send(seq, node_load1=float(seq))
            written.append(save(ledger, fleet, keep=2))
        assert written == [0, 0, 2] + [0] * 8  # SMART and `up` once, node_load1 never
        assert set(saved_rows(ledger)) == {"smartctl_device_temperature", "up"}
        assert ledger.load_latest()[1] == 9  # two epochs (seq 10 and 11) left to the replay
        before = exposed(fleet)
        ledger, restored, (series, replayed) = restart(path, ledger, ttl_s=600)
        assert (series, replayed) == (2, 2)
        assert exposed(restored) == before
        node.ledger, node.fleet = ledger, restored
        for seq in range(12, 40):  # on without SMART and `up`: both expire and are deleted
            node.send(seq, node_load1=float(seq))
        fleet = restored
        assert fleet.series_count(SITE, NODE) == 1
        save(ledger, fleet, keep=2)
        assert saved_rows(ledger) == {}
    finally:
        ledger.close()


def test_a_batch_pruned_after_the_saved_position_is_missing_not_fatal(setup: Any) -> None:
    path, ledger, fleet, node = setup
    old = time.time() - 7200
    node.send(1, smart=41.0, received_at=old)
    save(ledger, fleet)
    save(ledger, fleet)  # SMART written, position seq 1
    node.send(2, node_memory_MemFree_bytes=5e9, received_at=old)
    node.send(3, node_load1=3.0)
    pruned = ledger.prune(time.time(), 3600, 0, [])
    assert pruned.batches == 2  # seq 1 and 2 (seq 3 is the node's newest: kept)
    ledger, restored, (_, replayed) = restart(path, ledger)
    try:
        assert replayed == 1
        m = exposed(restored)
        assert m["smartctl_device_temperature"] == (41.0, T0 + 30_000)
        assert m["node_load1"] == (3.0, T0 + 3 * 30_000)
        assert "node_memory_MemFree_bytes" not in m  # its batch left before anything saved it
    finally:
        ledger.close()


def disk_full(*args: Any) -> int:
    raise sqlite3.OperationalError("database or disk is full")


def test_a_failed_save_records_no_position_and_the_next_writes_what_it_did_not(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, ledger, fleet, node = setup
    node.send(1, smart=41.0, node_load1=1.0)
    save(ledger, fleet)
    node.send(2, node_load1=2.0)
    with monkeypatch.context() as m:
        m.setattr(ledger, "save_latest", disk_full)
        with pytest.raises(sqlite3.OperationalError):
            save(ledger, fleet)  # SMART was due
    assert ledger.load_latest() == ([], 0)  # still the first save's position
    assert save(ledger, fleet) == 2  # SMART, requeued, and node_load1 of seq 2 (older than the kept epoch now)
    assert ledger.load_latest()[1] == 2
    node.send(3, node_load1=3.0)
    before = exposed(fleet)
    ledger, restored, (_, replayed) = restart(path, ledger)
    try:
        assert (exposed(restored), replayed) == (before, 1)
    finally:
        ledger.close()


def test_a_failed_save_keeps_the_expired_keys_for_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    fleet = FleetState(1000, series_ttl_s=600)
    node = Node(ledger, fleet)
    try:
        node.send(1, smart=41.0, node_load1=1.0)
        node.send(2, node_load1=2.0)
        save(ledger, fleet)
        save(ledger, fleet)
        assert set(saved_rows(ledger)) == {"smartctl_device_temperature", "node_load1"}
        for seq in range(3, 30):  # SMART is not read again: it expires
            node.send(seq, node_load1=float(seq))
        assert fleet.series_count(SITE, NODE) == 1
        with monkeypatch.context() as m:
            m.setattr(ledger, "save_latest", disk_full)
            with pytest.raises(sqlite3.OperationalError):
                save(ledger, fleet)
        save(ledger, fleet)
        assert "smartctl_device_temperature" not in saved_rows(ledger)
        ledger, restored, _ = restart(path, ledger)
        assert "smartctl_device_temperature" not in exposed(restored)
    finally:
        ledger.close()


def test_the_saving_task_survives_an_unexpected_error_and_logs_it(
    setup: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, ledger, fleet, node = setup
    node.send(1, smart=41.0, node_load1=1.0)
    fleet.mark_all_changed()  # both due at the first save
    rows = fleet.rows
    calls = 0

    def buggy(entries: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug rendering rows")
        return rows(entries)

    monkeypatch.setattr(fleet, "rows", buggy)
    saves = StateSaves()

    async def scenario() -> None:
        committer = Committer(ledger, 16)
        committer.start()
        task = asyncio.get_running_loop().create_task(
            _save_latest_forever(0.001, ledger, fleet, committer, saves))
        try:
            while saves.results["ok"] == 0:
                assert not task.done(), "the saving task ended"
                await asyncio.sleep(0.001)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await committer.stop()

    asyncio.run(scenario())
    assert saves.results["failed"] == 1
    assert "a bug rendering rows" in caplog.text
    assert set(saved_rows(ledger)) == {"smartctl_device_temperature", "node_load1"}  # requeued, written


def test_a_save_cut_short_requeues_only_what_it_did_not_write(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, ledger, fleet, node = setup
    node.send(1, **{f"s{i}": float(i) for i in range(7)})
    fleet.mark_all_changed()
    monkeypatch.setattr(app_mod, "SAVE_CHUNK", 2)
    chunks = 0

    async def scenario() -> int:
        blocked = asyncio.Event()

        async def call(fn: Callable[..., Any], *args: Any) -> Any:
            nonlocal chunks
            if fn == ledger.save_latest:
                if chunks == 2:
                    blocked.set()
                    await asyncio.Event().wait()  # the stop cancels it here
                chunks += 1
            return fn(*args)

        task = asyncio.get_running_loop().create_task(save_latest_state(ledger, fleet, call, 1))
        await blocked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await save_latest_state(ledger, fleet, direct(ledger), 1)

    assert asyncio.run(scenario()) == 3  # 4 written by the two chunks before: not again
    assert len(saved_rows(ledger)) == 7


def test_each_nodes_newest_and_arrival_survive_a_restart(setup: Any) -> None:
    """A node whose clock runs an hour slow is exposed at its batches' arrival (minus the
    hold): after a crash whose replay holds none of its batches, its timestamps must not step
    back to its own clock's."""
    path, ledger, fleet, node = setup
    arrival = time.time() - 10
    node.send(1, smart=41.0, node_load1=1.0, received_at=arrival - 30)
    node.send(2, node_load1=2.0, received_at=arrival)
    for _ in range(3):
        save(ledger, fleet)
    assert ledger.load_latest()[1] == 2  # every batch saved: nothing to replay
    before = exposed(fleet)
    assert before["node_load1"] == (2.0, int(arrival * 1000) - HOLD_MS)
    ledger, restored, (_, replayed) = restart(path, ledger)
    try:
        assert replayed == 0
        assert exposed(restored) == before
        assert restored.marks() == fleet.marks()
    finally:
        ledger.close()


def test_a_state_saved_by_the_previous_version_at_a_clean_stop_is_taken_over(setup: Any) -> None:
    """Before positions, a clean stop wrote the whole state to a `latest` table and the next
    start emptied it; this version restores it, keeps the table until a save has written it
    the new way (a crash before loses nothing), then drops it."""
    path, ledger, fleet, node = setup
    node.send(1, node_load1=1.0)
    ledger.conn.executescript(
        "CREATE TABLE latest (site TEXT NOT NULL, node TEXT NOT NULL, name TEXT NOT NULL, labels TEXT NOT NULL,"
        " mtype INTEGER NOT NULL, ts_ms INTEGER NOT NULL, value REAL NOT NULL);"
    )
    ledger.conn.execute("INSERT INTO latest VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (SITE, NODE, SMART[0], '[["device", "sda"]]', int(G), T0, 40.0))
    ledger, restored, (series, replayed) = restart(path, ledger)
    try:
        assert (series, replayed) == (1, 1)  # no position yet: the node's newest batch
        assert exposed(restored)["smartctl_device_temperature"] == (40.0, T0)
        ledger, restored, _ = restart(path, ledger)  # a crash before the first save
        assert exposed(restored)["smartctl_device_temperature"] == (40.0, T0)
        assert save(ledger, restored) == 2
        assert ledger.conn.execute("SELECT name FROM sqlite_master WHERE name = 'latest'").fetchone() is None
        ledger, again, (_, replayed) = restart(path, ledger)
        assert (exposed(again), replayed) == (exposed(restored), 0)
    finally:
        ledger.close()


def test_the_saved_position_is_applied_in_full_with_the_real_committer(setup: Any) -> None:
    """The save reads the position, then waits a round trip through the committer thread: a
    batch committed by then has had its handler apply it before the save takes the state.
    Handlers and saves interleave here as in serve, with the commit of the batch just
    submitted in the ledger thread while the save asks for the position."""
    path, ledger, fleet, node = setup
    reader = ledger_mod.connect(path, create=False)
    applied: set[int] = set()
    unapplied: list[set[int]] = []
    begin = fleet.begin_save

    def checked(position: int, keep: int) -> Any:
        recorded = {seq for (seq,) in reader.execute("SELECT seq FROM batches WHERE rowid <= ?", (position,))}
        unapplied.append(recorded - applied)
        return begin(position, keep)

    fleet.begin_save = checked  # type: ignore[method-assign]

    async def scenario() -> None:
        committer = Committer(ledger, 64)
        committer.start()

        async def handler(seq: int) -> None:
            sub, series = node.batch(seq, node_load1=float(seq))
            outcome = await committer.submit(sub)
            assert outcome.result == "accepted"
            fleet.apply(SITE, NODE, series, now_ms=int(sub.received_at * 1000))
            applied.add(seq)

        try:
            for seq in range(1, 61):
                task = asyncio.get_running_loop().create_task(handler(seq))
                for _ in range(seq % 4):  # 0..3 turns: the commit queued, in the thread, or done
                    await asyncio.sleep(0)
                await save_latest_state(ledger, fleet, committer.call, 1)
                await task
        finally:
            await committer.stop()

    try:
        asyncio.run(scenario())
    finally:
        reader.close()
    assert len(unapplied) == 60 and all(not missing for missing in unapplied), unapplied
