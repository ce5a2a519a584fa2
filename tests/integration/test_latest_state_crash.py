"""A real collector process keeps its /metrics state across SIGKILL: a series the node sent
once (SMART-like) and the newest values of the others come back with their timestamps."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

import wire
from collector.exposition import HOLD_MS
from tests.integration.harness import wait_for
from tests.integration.test_remote_write_forwarding import Collector

pytestmark = pytest.mark.timeout(180)

SITE, NODE = "s1", "n1"
T0 = int(time.time() * 1000) - 3_600_000
A = ("smartctl_device_temperature", (("device", "sda"), ("node", NODE), ("site", SITE)))
B = ("node_load1", (("node", NODE), ("site", SITE)))


class Node:
    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.frames: dict[int, bytes] = {}

    def data(self, seq: int, load: float, smart: float | None = None) -> bytes:
        ts = T0 + seq * 10_000
        series = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (ts,), (load,))]
        if smart is not None:
            series.append(wire.Series(A[0], (("device", "sda"),), wire.MetricType.GAUGE, (ts,), (smart,)))
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        self.frames[seq] = wire.encode_data_batch(wire.BatchContext(self.key, SITE, NODE, seq, prev, ts, seq, 1),
                                                  series)
        return self.frames[seq]


def exposed(c: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, int | None]]:
    """Every sample on /metrics: (value, timestamp in ms or None)."""
    out = {}
    for fam in text_string_to_metric_families(c.metrics()):
        for s in fam.samples:
            ts = None if s.timestamp is None else round(float(s.timestamp) * 1000)
            out[(s.name, tuple(sorted(s.labels.items())))] = (s.value, ts)
    return out


def saving_every(interval: str) -> str:
    return f'[ledger]\nstate_save_interval = "{interval}"\n'


def held(c: Collector, own_ms: int) -> int:
    """The timestamp a series whose own newest point is `own_ms` is exposed at: this node's
    clock runs an hour slow, so it is held at its newest batch's arrival minus the hold."""
    arrival = max(received for (received,) in c.ledger_rows(
        "SELECT received_at FROM batches WHERE site = ? AND node = ?", (SITE, NODE)))
    return max(own_ms, int(arrival * 1000) - HOLD_MS)


def test_exposed_state_survives_sigkill_and_a_clean_stop(tmp_path: Path) -> None:
    node = Node()
    c = Collector(tmp_path, saving_every("1s"))
    c.enroll(SITE, NODE, base64.b64encode(bytes(node.key.verify_key)).decode())
    c.start()
    try:
        assert c.post(node.data(1, load=1.0, smart=41.0)) == 200  # A: sent once
        assert c.post(node.data(2, load=2.0)) == 200  # B only from here on
        # The save that ends second from now started after both batches were applied.
        saves = c.metric("waystation_collector_state_saves_total", result="ok")
        wait_for(lambda: c.metric("waystation_collector_state_saves_total", result="ok") >= saves + 2, 60,
                 "a periodic save covering seq 2")
        before = exposed(c)
        assert before[A] == (41.0, held(c, T0 + 10_000))
        assert before[B] == (2.0, held(c, T0 + 20_000))
        assert c.config is not None
        c.config.write_text(f'log_level = "info"\n{saving_every("1h")}')  # no periodic save from here on

        c.stop(signal.SIGKILL)
        c.start()
        m = exposed(c)
        assert (m[A], m[B]) == (before[A], before[B])  # values and timestamps: none steps back

        assert c.post(node.data(3, load=3.0)) == 200
        before = exposed(c)
        c.stop(signal.SIGKILL)  # nothing saved seq 3: the start replays it after the saved position
        c.start()
        m = exposed(c)
        assert m[B] == (3.0, held(c, T0 + 30_000))
        assert (m[A], m[B]) == (before[A], before[B])
        assert m[("waystation_collector_state_saves_total", (("result", "ok"),))] == (0.0, None)

        assert c.post(node.data(4, load=4.0)) == 200
        before = exposed(c)
        c.stop()  # SIGTERM: a clean stop saves at once
        c.start()
        m = exposed(c)
        assert m[B] == (4.0, held(c, T0 + 40_000))
        assert (m[A], m[B]) == (before[A], before[B])
    finally:
        c.stop()
