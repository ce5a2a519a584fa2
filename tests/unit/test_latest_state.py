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
from collector import trust
from collector.app import rebuild_latest_state, save_latest_state
from collector.exposition import FleetCollector, FleetState
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

    def send(self, seq: int, received_at: float | None = None, **values: float) -> None:
        """Batch `seq` at T0 + seq × 30 s carrying the named series (smart=… for SMART)."""
        ts = T0 + seq * 30_000  # 4 batches stay within HOLD_MS: own timestamps shown
        series = [
            wire.Series(*SMART, G, (ts,), (v,)) if name == "smart" else wire.Series(name, (), G, (ts,), (v,))
            for name, v in values.items()
        ]
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        raw = wire.encode_data_batch(wire.BatchContext(self.key, SITE, NODE, seq, prev, ts, seq, 1), series)
        self.frames[seq] = raw
        frame = wire.parse_frame(raw)
        [outcome] = self.ledger.commit([Submission(frame, self.record, received_at or time.time())])
        assert outcome.result == "accepted", outcome
        self.fleet.apply(SITE, NODE, series)


def exposed(fleet: FleetState) -> dict[str, tuple[float, int]]:
    """Fleet series by name: (value, timestamp ms) as /metrics shows them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    out = {}
    for line in generate_latest(registry).decode().splitlines():
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


def save(ledger: Ledger, fleet: FleetState) -> int:
    return asyncio.run(save_latest_state(ledger, fleet, direct(ledger)))


def restart(path: Path, ledger: Ledger) -> tuple[Ledger, FleetState, tuple[int, int]]:
    """What a start does after a crash: a fresh process, the same ledger file."""
    ledger.close()
    ledger = Ledger(path)
    fleet = FleetState(1000)
    return ledger, fleet, rebuild_latest_state(ledger, fleet, LIMITS)


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    ledger = Ledger(tmp_path / "ledger.db")
    fleet = FleetState(1000)
    yield tmp_path / "ledger.db", ledger, fleet, Node(ledger, fleet)
    ledger.close()


def test_after_a_crash_the_state_is_the_saved_one_plus_every_batch_after_it(setup: Any) -> None:
    path, ledger, fleet, node = setup
    node.send(1, smart=41.0, node_load1=1.0)  # SMART: read once, not in any later batch
    node.send(2, node_load1=2.0)
    assert save(ledger, fleet) == 2
    node.send(3, node_load1=3.0, node_memory_MemFree_bytes=5e9)
    node.send(4, node_load1=4.0)
    before = exposed(fleet)
    # No save after seq 2: a crash here.
    ledger, restored, (series, replayed) = restart(path, ledger)
    try:
        assert (series, replayed) == (2, 2)  # the save, then seq 3 and 4
        assert exposed(restored) == before
        assert before["smartctl_device_temperature"] == (41.0, T0 + 30_000)
        assert before["node_load1"] == (4.0, T0 + 4 * 30_000)
        # The restart did not use up the save: a second crash restores the same.
        ledger, again, _ = restart(path, ledger)
        assert exposed(again) == before
    finally:
        ledger.close()


def test_only_series_that_changed_are_written_and_expired_ones_are_deleted(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    fleet = FleetState(1000, series_ttl_s=600)
    node = Node(ledger, fleet)
    try:
        node.send(1, smart=41.0, node_load1=1.0, up=1.0)
        assert save(ledger, fleet) == 3
        node.send(2, node_load1=2.0)
        assert save(ledger, fleet) == 1
        assert save(ledger, fleet) == 0  # nothing changed: nothing written
        for seq in range(3, 30):  # the node goes on without `up` and SMART: both expire
            node.send(seq, node_load1=float(seq))
        save(ledger, fleet)
        rows, _ = ledger.load_latest()
        assert {r[2] for r in rows} == {"node_load1"}
        assert fleet.series_count(SITE, NODE) == 1
    finally:
        ledger.close()


def test_a_batch_pruned_after_the_saved_position_is_missing_not_fatal(setup: Any) -> None:
    path, ledger, fleet, node = setup
    old = time.time() - 7200
    node.send(1, smart=41.0, received_at=old)
    save(ledger, fleet)
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


def test_a_failed_save_records_no_position_and_the_next_writes_everything(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, ledger, fleet, node = setup
    node.send(1, smart=41.0, node_load1=1.0)
    save(ledger, fleet)
    node.send(2, node_load1=2.0)

    def disk_full(*args: Any) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as m:
        m.setattr(ledger, "save_latest", disk_full)
        with pytest.raises(sqlite3.OperationalError):
            save(ledger, fleet)
    assert ledger.load_latest()[1] == ledger.max_rowid() - 1  # still the first save's position
    assert save(ledger, fleet) == 2
    node.send(3, node_load1=3.0)
    before = exposed(fleet)
    ledger, restored, (_, replayed) = restart(path, ledger)
    try:
        assert (exposed(restored), replayed) == (before, 1)
    finally:
        ledger.close()


def test_a_state_saved_by_the_previous_version_at_a_clean_stop_is_taken_over(setup: Any) -> None:
    """Before positions, a clean stop wrote the whole state to a `latest` table and the next
    start emptied it; the first start of this version restores it and saves it the new way."""
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
        assert save(ledger, restored) == 2
        ledger, again, _ = restart(path, ledger)
        assert exposed(again) == exposed(restored)
    finally:
        ledger.close()
