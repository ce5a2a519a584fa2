"""FleetState and FleetCollector: latest-value rules, names and types as sent, caps."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

import wire
from agent import catalog
from collector.exposition import FLEET_HELP, HOLD_MS, FleetCollector, FleetState, _values_text
from collector.ledger import Ledger, NodeState
from wire.metric_help import help_of
from wire.schema import schema_problem

G, C, U, INFO = wire.MetricType.GAUGE, wire.MetricType.COUNTER, wire.MetricType.UNTYPED, wire.MetricType.INFO


def series(name: str, ts: int, value: float, mtype: wire.MetricType = G, **labels: str) -> wire.Series:
    return wire.Series(name, tuple(labels.items()), mtype, (ts - 1, ts), (value - 1, value))


def render(fleet: FleetState, clock: Callable[[], float] = time.time) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    # As /metrics: the fleet series, then the collector's own families.
    return (fleet.exposition(int(clock() * 1000)).render() + generate_latest(registry)).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_newer_points_win_and_backfill_does_not_overwrite() -> None:
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("node_load1", 2000, 5.0)])
    fleet.apply("s", "n", [series("node_load1", 1000, 1.0)])  # an older window, backfilled
    assert samples(render(fleet))[("node_load1", (("node", "n"), ("site", "s")))] == 5.0
    fleet.apply("s", "n", [series("node_load1", 3000, 7.0)])
    assert samples(render(fleet))[("node_load1", (("node", "n"), ("site", "s")))] == 7.0


def test_site_and_node_come_from_the_authenticated_header() -> None:
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("up", 1, 1.0, site="elsewhere", job="x")])
    exposed = {k: v for k, v in samples(render(fleet)).items() if k[0] == "up"}
    assert exposed == {("up", (("job", "x"), ("node", "n"), ("site", "s"))): 1.0}


def test_sample_names_are_exactly_the_series_names() -> None:
    fleet = FleetState(100)
    fleet.apply("s", "n", [
        series("node_network_receive_bytes_total", 1, 10.0, C, device="eth0"),
        series("vllm:num_requests_running", 1, 2.0, G),
        series("DCGM_FI_DEV_GPU_UTIL", 1, 50.0, G, gpu="0"),
        series("odd_counter", 1, 3.0, C),
        series("node_uname_info", 1, 1.0, INFO, release="6.1"),
        series("mystery", 1, 4.0, U),
    ])
    text = render(fleet)
    names = {name for name, _ in samples(text)}
    assert {"node_network_receive_bytes_total", "vllm:num_requests_running", "DCGM_FI_DEV_GPU_UTIL",
            "odd_counter", "node_uname_info", "mystery"} <= names
    assert "# TYPE node_network_receive_bytes_total counter" in text
    assert "# TYPE node_uname_info gauge" in text
    assert "# TYPE odd_counter untyped" in text  # a counter name Prometheus would mangle stays as sent
    assert "\nodd_counter{" in text and "\nmystery{" in text


def test_fleet_families_carry_the_agent_catalogs_help() -> None:
    fleet = FleetState(100)
    fleet.apply("s", "n", [
        series("node_load1", 1, 1.0),
        series("node_load1:window_max", 1, 2.0),
        series("waystation_agent_uplink_probes_total", 1, 3.0, C),
        series("not_in_any_catalog", 1, 4.0),
    ])
    helps = {fam.name: fam.documentation for fam in text_string_to_metric_families(render(fleet))}
    assert helps["node_load1"] == catalog.lookup("node_load1").help  # type: ignore[union-attr]
    assert helps["node_load1:window_max"] == "1m load average (maximum over the summary window)."
    assert helps["waystation_agent_uplink_probes"] == catalog.lookup(  # type: ignore[union-attr]  (a counter family)
        "waystation_agent_uplink_probes_total").help
    assert helps["not_in_any_catalog"] == FLEET_HELP


def test_the_collectors_help_copy_is_the_catalogs() -> None:
    """wire/metric_help.py is generated from agent/catalog.py; regenerate it when this fails:
    .venv/bin/python -m agent.catalog > wire/metric_help.py"""
    assert (Path(__file__).resolve().parents[2] / "wire" / "metric_help.py").read_text() == \
        catalog.render_help_module()

def test_cardinality_cap_and_reserved_names_are_counted() -> None:
    fleet = FleetState(2)
    fleet.apply("s", "n", [series("a", 1, 1.0), series("b", 1, 1.0), series("c", 1, 1.0),
                           series("waystation_node_highest_seq", 1, 9.0)])
    fleet.update_node(NodeState("s", "n", highest_seq=3))
    m = samples(render(fleet))
    assert ("c", (("node", "n"), ("site", "s"))) not in m
    assert m[("waystation_exposition_series_dropped_total", (("node", "n"), ("site", "s")))] == 2
    assert m[("waystation_exposition_series", (("node", "n"), ("site", "s")))] == 2
    assert m[("waystation_node_highest_seq", (("node", "n"), ("site", "s")))] == 3  # ours, not the node's
    # Existing series still update at the cap.
    fleet.apply("s", "n", [series("a", 5, 9.0)])
    assert samples(render(fleet))[("a", (("node", "n"), ("site", "s")))] == 9.0


def test_the_fleet_wide_cap_holds_across_nodes_and_is_counted() -> None:
    fleet = FleetState(max_series_per_node=10, max_series_total=3)
    fleet.apply("s", "a", [series("x", 1, 1.0), series("y", 1, 1.0)])
    fleet.apply("s", "b", [series("x", 1, 1.0), series("y", 1, 1.0), series("z", 1, 1.0)])
    m = samples(render(fleet))
    assert m[("waystation_exposition_fleet_series", ())] == 3
    assert m[("waystation_exposition_series_over_fleet_limit_total", ())] == 2
    assert m[("waystation_exposition_series_dropped_total", (("node", "b"), ("site", "s")))] == 2
    # Expiry frees room under the fleet cap too.
    fleet.apply("s", "a", [series("x", 10 * 3_600_000, 2.0)], now_ms=10 * 3_600_000)
    fleet.apply("s", "b", [series("z", 10 * 3_600_000, 3.0)], now_ms=10 * 3_600_000)
    m = samples(render(fleet))
    assert m[("z", (("node", "b"), ("site", "s")))] == 3.0


def test_node_accounting_families() -> None:
    fleet = FleetState(10)
    fleet.update_node(NodeState("s", "n", last_seen=1.5e9, complete_through=4, highest_seq=9, gap_seqs=3,
                                dropped_batches=2, dropped_samples=40, conflicts=1, chain_breaks=1,
                                backlog_batches=12.0, backlog_bytes=3e6))
    m = samples(render(fleet))
    ids = (("node", "n"), ("site", "s"))
    assert m[("waystation_node_last_seen_timestamp_seconds", ids)] == 1.5e9
    assert m[("waystation_node_complete_through_seq", ids)] == 4
    assert m[("waystation_node_gap_seqs", ids)] == 3
    assert m[("waystation_node_dropped_batches_total", ids)] == 2
    assert m[("waystation_node_dropped_samples_total", ids)] == 40
    assert m[("waystation_node_tamper_events_total", ids)] == 2
    assert m[("waystation_node_reported_backlog_batches", ids)] == 12
    assert m[("waystation_node_reported_backlog_bytes", ids)] == 3e6


def test_schema_problem_names_the_offender() -> None:
    assert schema_problem([series("ok_name", 1, 1.0, job="x")]) is None
    assert "metric name" in (schema_problem([series("bad-name", 1, 1.0)]) or "")
    assert "label name" in (schema_problem([series("ok", 1, 1.0, **{"__reserved": "x"})]) or "")
    dup = wire.Series("ok", (("a", "1"), ("a", "2")), G, (1,), (1.0,))
    assert "repeats" in (schema_problem([dup]) or "")


T = 1_700_000_000_000
MIN = 60_000
IDS = (("node", "n"), ("site", "s"))


def test_series_the_node_stopped_sending_expire_by_its_own_clock() -> None:
    fleet = FleetState(100, series_ttl_s=900)
    fleet.apply("s", "n", [series("a", T, 1.0), series("b", T, 2.0)], now_ms=T)
    for minute in range(1, 17):  # the node goes on sending a, no longer b
        fleet.apply("s", "n", [series("a", T + minute * MIN, 1.0)], now_ms=T + minute * MIN)
        m = samples(render(fleet))
        assert (("b", IDS) in m) == (minute <= 15), minute  # gone once older than the TTL
    assert m[("waystation_exposition_series_expired_total", IDS)] == 1
    assert fleet.series_count("s", "n") == 1
    # It comes back when the node sends it again.
    fleet.apply("s", "n", [series("b", T + 17 * MIN, 3.0)], now_ms=T + 17 * MIN)
    assert samples(render(fleet))[("b", IDS)] == 3.0


def test_a_silent_node_keeps_its_series() -> None:
    """Expiry is measured on the node's own newest sample: a node cut off by its uplink
    (node-level alerts cover that) keeps its last values, whatever the collector's clock."""
    fleet = FleetState(100, series_ttl_s=900)
    fleet.apply("s", "n", [series("a", T, 1.0)], now_ms=T)
    fleet.apply("s", "m", [series("a", T + 60 * MIN, 1.0)], now_ms=T + 60 * MIN)
    assert samples(render(fleet))[("a", IDS)] == 1.0


def test_a_future_stamped_batch_does_not_expire_the_rest() -> None:
    fleet = FleetState(100, series_ttl_s=900)
    fleet.apply("s", "n", [series("a", T, 1.0), series("b", T, 2.0)], now_ms=T)
    fleet.apply("s", "n", [series("c", T + 10 * 24 * 60 * MIN, 9.0)], now_ms=T + MIN)  # clock 10 days ahead
    fleet.apply("s", "n", [series("a", T + 2 * MIN, 1.0), series("b", T + 2 * MIN, 2.0)], now_ms=T + 2 * MIN)
    m = samples(render(fleet))
    assert {name for name, ids in m if ids == IDS} >= {"a", "b", "c"}
    assert m[("waystation_exposition_series_expired_total", IDS)] == 0


def test_expiry_frees_the_cardinality_cap_and_old_backfill_is_not_exposed() -> None:
    fleet = FleetState(2, series_ttl_s=900)
    fleet.apply("s", "n", [series("a", T, 1.0), series("b", T, 1.0)], now_ms=T)
    for minute in (10, 20):
        fleet.apply("s", "n", [series("a", T + minute * MIN, 1.0)], now_ms=T + minute * MIN)
    fleet.apply("s", "n", [series("c", T + 21 * MIN, 5.0)], now_ms=T + 21 * MIN)
    # Backfill of a series last sent longer than the TTL ago: not exposed, not a cap drop.
    fleet.apply("s", "n", [series("d", T + MIN, 7.0)], now_ms=T + 21 * MIN)
    m = samples(render(fleet))
    assert m[("c", IDS)] == 5.0
    assert ("b", IDS) not in m and ("d", IDS) not in m
    assert m[("waystation_exposition_series_dropped_total", IDS)] == 0
    assert m[("waystation_exposition_series_expired_total", IDS)] == 1


def test_snapshot_restores_the_same_exposition(tmp_path: Path) -> None:
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("node_load1", T, 1.5), series("up", T, 1.0, C, job="vllm"),
                           series("gpu_info", T, 1.0, INFO, driver='5"50')], now_ms=T)
    fleet.apply("s", "m", [series("node_load1", T + MIN, 2.5)], now_ms=T)
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        assert ledger.save_latest(fleet.snapshot(), through=7) == 4
        rows, through = ledger.load_latest()
        restored = FleetState(100)
        assert (restored.restore(rows), through) == (4, 7)
        assert ledger.load_latest() == (rows, 7)  # kept: a later crash restores it again
    finally:
        ledger.close()
    assert stamped(render(restored)) == stamped(render(fleet))  # values and timestamps
    # Newer points from batches applied after the restore still win.
    restored.apply("s", "n", [series("node_load1", T + MIN, 9.0)], now_ms=T)
    assert samples(render(restored))[("node_load1", IDS)] == 9.0


def at(ms: int) -> Callable[[], float]:
    """A collector clock standing at `ms`."""
    return lambda: ms / 1000


def stamped(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, int | None]]:
    """(value, timestamp in ms as written in the text) per sample."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            ts = None if s.timestamp is None else round(float(s.timestamp) * 1000)
            out[(s.name, tuple(sorted(s.labels.items())))] = (s.value, ts)
    return out


def test_fleet_series_carry_their_sample_time_in_milliseconds_and_ours_none() -> None:
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("node_load1", T + 123, 1.5),
                           series("node_cpu_seconds_total", T + 999, 7.0, C, cpu="0", mode="idle")], now_ms=T)
    fleet.update_node(NodeState("s", "n", last_seen=1.7e9, highest_seq=3))
    text = render(fleet, clock=lambda: T / 1000 + 60)
    # The text format's timestamp is integer milliseconds, exactly the node's sample time.
    assert f'node_load1{{node="n",site="s"}} 1.5 {T + 123}\n' in text
    assert f'node_cpu_seconds_total{{cpu="0",mode="idle",node="n",site="s"}} 7.0 {T + 999}\n' in text
    m = stamped(text)
    # The collector's own families describe now: Prometheus stamps them at scrape time.
    own = {k: ts for k, (_, ts) in m.items() if k[0].startswith("waystation_")}
    assert own and set(own.values()) == {None}
    assert m[("waystation_node_highest_seq", IDS)] == (3.0, None)


def test_a_node_clock_running_ahead_is_stamped_no_later_than_the_collectors_now() -> None:
    """A sample from the future would make Prometheus refuse the series' real samples until
    then; it is exposed at the collector's clock, which only moves forward."""
    fleet = FleetState(100)
    ahead = T + 10 * MIN
    fleet.apply("s", "n", [series("node_load1", ahead, 1.0)], now_ms=T)
    now = T
    assert stamped(render(fleet, clock=lambda: now / 1000))[("node_load1", IDS)] == (1.0, T)
    fleet.apply("s", "n", [series("node_load1", ahead + 1000, 2.0)], now_ms=T)
    now = T + 5000
    assert stamped(render(fleet, clock=lambda: now / 1000))[("node_load1", IDS)] == (2.0, T + 5000)
    now = T + 20 * MIN  # the collector's clock passes the node's: its own time again
    assert stamped(render(fleet, clock=lambda: now / 1000))[("node_load1", IDS)] == (2.0, ahead + 1000)


def test_a_series_sent_less_often_than_the_lookback_stays_within_it_behind_the_node() -> None:
    """SMART is read every 10 minutes, Prometheus looks back 5: while the node reports, such a
    series is stamped HOLD_MS behind the node's newest sample, with its newest value."""
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("smartctl_device_temperature", T, 41.0, device="sda"),
                           series("node_load1", T, 1.0)], now_ms=T)
    temp = ("smartctl_device_temperature", (("device", "sda"), ("node", "n"), ("site", "s")))
    for minute in range(1, 10):
        newest = T + minute * MIN
        fleet.apply("s", "n", [series("node_load1", newest, 1.0)], now_ms=newest)
        m = stamped(render(fleet, clock=at(newest + 30_000)))
        assert m[("node_load1", IDS)] == (1.0, newest)  # sent every minute: its own time
        assert m[temp] == (41.0, max(T, newest - HOLD_MS))
    fleet.apply("s", "n", [series("smartctl_device_temperature", T + 10 * MIN, 42.0, device="sda")], now_ms=T)
    assert stamped(render(fleet, clock=lambda: T / 1000 + 3600))[temp] == (42.0, T + 10 * MIN)


SMART_IDS = (("device", "sda"), ("node", "n"), ("site", "s"))
TEMP = ("smartctl_device_temperature", SMART_IDS)
LOAD = ("node_load1", IDS)
LOOKBACK_MS = 5 * MIN


class Prometheus:
    """What a Prometheus scraping the collector every 15 s stores of two series: it appends a
    sample only if its timestamp is newer than the series' newest (an older one is
    out-of-order, a same one a duplicate); a second value at a stored timestamp is counted."""

    def __init__(self, fleet: FleetState) -> None:
        self.fleet = fleet
        self.newest: dict[object, tuple[int, float]] = {}
        self.duplicates = 0

    def scrape(self, now: int) -> None:
        for key, (value, ts) in stamped(render(self.fleet, clock=at(now))).items():
            if key not in (TEMP, LOAD):
                continue
            assert ts is not None and ts <= now, (key, ts, now)
            held = self.newest.get(key)
            if held is not None and ts == held[0] and value != held[1]:
                self.duplicates += 1
            if held is None or ts > held[0]:
                self.newest[key] = (ts, value)

    def age(self, key: object, now: int) -> int:
        """How old the newest sample an instant query at `now` finds is (its lookback is 5 min)."""
        return now - self.newest[key][0]


def run_node(flush_ms: int, skew_ms: int, minutes: int, prom_minutes: int | None = None,
             delivery_ms: int = 2000) -> tuple[Prometheus, dict[object, int], int]:
    """A node whose clock is `skew_ms` off the collector's sends a batch every `flush_ms`
    (node_load1 every time, SMART read every 10 minutes) for `minutes`; Prometheus scrapes
    every 15 s for `prom_minutes`. Returns Prometheus, each series' worst age at any
    evaluation (every second) while the node sends, and the last batch's arrival."""
    fleet = FleetState(100)
    prom = Prometheus(fleet)
    worst = {TEMP: 0, LOAD: 0}
    smart_read = None
    last_arrival = T
    for now in range(T, T + (prom_minutes or minutes) * MIN + 1, 1000):
        sending = now < T + minutes * MIN
        if sending and (now - T) % (10 * MIN) == 0:
            smart_read = now + skew_ms  # read on the node, sent with the next batch
        if sending and (now - T) % flush_ms == flush_ms - 1000:
            sampled = now - delivery_ms + skew_ms
            batch = [series("node_load1", sampled, (now - T) / MIN)]
            if smart_read is not None:
                batch.append(series("smartctl_device_temperature", smart_read, 40.0 + (now - T) // (10 * MIN),
                                    device="sda"))
                smart_read = None
            fleet.apply("s", "n", batch, now_ms=now)
            last_arrival = now
        if (now - T) % 15_000 == 0:
            prom.scrape(now)
        if sending and now >= T + flush_ms:
            for key in worst:
                worst[key] = max(worst[key], prom.age(key, now))
    return prom, worst, last_arrival


@pytest.mark.parametrize(("flush_s", "skew_s"), [
    (60, 0), (60, -90), (150, 0), (150, -90), (60, -600), (150, -600), (60, 180),
])
def test_every_series_stays_within_the_lookback_whatever_the_node_clock_and_flush(
    flush_s: int, skew_s: int
) -> None:
    """A held series is at most a flush interval + HOLD_MS + delivery old at any evaluation,
    measured on the collector's clock: a node clock running 90 s (or 10 min) slow, or the
    longest allowed flush interval (150 s), must not drop SMART (and with it DiskWearHigh's
    `for:`) or every series (and ClockSkew) out of Prometheus' 5-minute lookback."""
    prom, worst, _ = run_node(flush_s * 1000, skew_s * 1000, minutes=40)
    assert worst[TEMP] < LOOKBACK_MS and worst[LOAD] < LOOKBACK_MS, worst
    assert worst[TEMP] <= flush_s * 1000 + HOLD_MS + 2000 + 15_000, worst
    assert prom.duplicates == 0


def test_a_dead_nodes_series_leave_the_lookback_within_five_minutes() -> None:
    """The floor moves only when batches arrive: a node that stops stays queryable for at most
    the lookback after its last batch, then its series are absent from instant queries."""
    prom, _, last = run_node(60_000, -90_000, minutes=20, prom_minutes=30)
    end = last + LOOKBACK_MS + 15_000
    assert prom.age(TEMP, end) > LOOKBACK_MS and prom.age(LOAD, end) > LOOKBACK_MS


def test_a_value_backfilled_at_the_held_timestamp_moves_the_timestamp() -> None:
    """After an outage the live batch lands first and SMART is held at the floor; the backfill
    then brings a newer SMART read (older than the floor): a second value at the same
    timestamp would be refused by Prometheus, so it is exposed 1 ms later."""
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("smartctl_device_temperature", T, 41.0, device="sda"),
                           series("node_load1", T, 1.0)], now_ms=T + 1000)
    back = T + 30 * MIN
    fleet.apply("s", "n", [series("node_load1", back, 2.0)], now_ms=back + 1000)  # live batch first
    floor = back + 1000 - HOLD_MS
    assert stamped(render(fleet, clock=at(back + 2000)))[TEMP] == (41.0, floor)
    fleet.apply("s", "n", [series("smartctl_device_temperature", T + 20 * MIN, 43.0, device="sda")],
                now_ms=back + 3000)  # the backfill: read during the outage
    assert stamped(render(fleet, clock=at(back + 4000)))[TEMP] == (43.0, floor + 1)
    assert stamped(render(fleet, clock=at(back + 5000)))[TEMP] == (43.0, floor + 1)  # same again: ignored


def test_a_changed_value_waits_for_the_clock_rather_than_repeat_a_timestamp() -> None:
    """A node clock running ahead is exposed at the collector's clock; a second value within
    the same millisecond keeps the last shown value until the clock allows a later stamp."""
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("node_load1", T + MIN, 1.0)], now_ms=T)
    assert stamped(render(fleet, clock=at(T)))[LOAD] == (1.0, T)
    fleet.apply("s", "n", [series("node_load1", T + MIN + 1000, 2.0)], now_ms=T)
    assert stamped(render(fleet, clock=at(T)))[LOAD] == (1.0, T)
    assert stamped(render(fleet, clock=at(T + 1)))[LOAD] == (2.0, T + 1)


def test_a_collector_clock_stepped_back_does_not_step_timestamps_back() -> None:
    fleet = FleetState(100)
    fleet.apply("s", "n", [series("node_load1", T + MIN, 1.0)], now_ms=T + MIN)
    assert stamped(render(fleet, clock=at(T + MIN)))[LOAD] == (1.0, T + MIN)
    # NTP steps the collector's clock back a minute: the node's next batch arrives at T + 30 s.
    fleet.apply("s", "n", [series("node_load1", T + 2 * MIN, 2.0)], now_ms=T + 30_000)
    # Not back to T + 31 s: the last shown stays until the clock passes it again.
    assert stamped(render(fleet, clock=at(T + 31_000)))[LOAD] == (1.0, T + MIN)
    assert stamped(render(fleet, clock=at(T + MIN + 5)))[LOAD] == (2.0, T + MIN + 5)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-20 * MIN, 20 * MIN),
                          st.integers(0, 3 * MIN), st.integers(0, 3)), min_size=1, max_size=40))
def test_a_series_exposed_timestamp_never_moves_backwards(steps: list[tuple[str, int, int, int]]) -> None:
    """Prometheus drops a sample older than the series' newest as out-of-order, and refuses a
    second value at a timestamp it has: whatever order points arrive in (backfill, a clock
    ahead or behind), each scrape's timestamp is at least the last, never after the
    collector's clock, and an equal timestamp carries an equal value."""
    fleet = FleetState(100)
    now = T
    last: dict[object, tuple[int, float]] = {}
    for name, offset, wait, value in steps:
        now += wait
        fleet.apply("s", "n", [series(name, now + offset, float(value))], now_ms=now)
        for key, (v, ts) in stamped(render(fleet, clock=at(now))).items():
            if key[0] in ("a", "b", "c"):
                assert ts is not None and ts <= now
                if key in last:
                    assert ts >= last[key][0]
                    assert ts > last[key][0] or v == last[key][1], (key, ts, v, last[key])
                last[key] = (ts, v)


def reference_text(fleet: FleetState, now_ms: int) -> str:
    """The fleet's series as prometheus_client renders them (how the collector exposed them
    before it rendered the text itself): one family per name, typed by its first series."""
    families: dict[str, Metric] = {}
    for site, node, name, labels, mtype, ts, value in fleet.snapshot():
        fam = families.get(name)
        if fam is None:
            text = help_of(name) or FLEET_HELP
            if mtype == C and name.endswith("_total") and len(name) > 6:
                fam = Metric(name[:-6], text, "counter")
            elif mtype == INFO and name.endswith("_info") and len(name) > 5:
                fam = Metric(name[:-5], text, "info")
            elif mtype in (G, INFO):
                fam = Metric(name, text, "gauge")
            else:
                fam = Metric(name, text, "unknown")
            families[name] = fam
        shown = dict(json.loads(labels), site=site, node=node)
        fam.samples.append(Sample(name, shown, value, min(ts, now_ms) / 1000))

    class Fixed(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    return generate_latest(registry).decode()


def parsed(text: str) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            value = "NaN" if s.value != s.value else (s.value, math.copysign(1.0, s.value))
            out.append((fam.name, fam.type, fam.documentation, s.name, sorted(s.labels.items()), value, s.timestamp))
    return sorted(out, key=repr)


LABEL_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["node_load1", "node_network_receive_bytes_total", "odd_counter", "node_uname_info",
                     "vllm:num_requests_running", "DCGM_FI_DEV_GPU_UTIL", "mystery_total", "x_info"]),
    st.sampled_from([G, C, U, INFO]),
    st.dictionaries(st.sampled_from(["device", "gpu", "a_b", "le", "node", "site"]), LABEL_TEXT, max_size=3),
    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1234567.0, 1e21, 5e-324]),
    st.sampled_from(["n1", "n2", 'odd"node\\x']),
    st.integers(0, HOLD_MS),  # how far behind the clock: held series would be stamped at the floor
), max_size=30))
def test_the_text_is_what_prometheus_client_renders_for_the_same_series(
    sent: list[tuple[str, wire.MetricType, dict[str, str], float, str, int]]
) -> None:
    """Names, types, HELP, escaped label values (backslash, quote, newline, any UTF-8),
    values (NaN, infinities, -0.0, large and tiny ones) and millisecond timestamps read
    back exactly as from prometheus_client's own text, which the collector rendered with
    before it rendered a big fleet's text itself."""
    fleet = FleetState(1000)
    now_ms = T_NOW
    for name, mtype, labels, value, node, ts in sent:
        fleet.apply("s", node, [wire.Series(name, tuple(labels.items()), mtype, (now_ms - ts,), (value,))],
                    now_ms=now_ms)
    want = reference_text(fleet, now_ms)  # before the scrape: stamps as held (all within the hold)
    text = fleet.exposition(now_ms)
    got = text.render().decode()
    assert parsed(got) == parsed(want)
    for lines in (1, 2, 7):  # /metrics sends a big fleet's text in pieces
        assert b"".join(text.chunks(lines)).decode() == got
    assert got.count("# TYPE ") == want.count("# TYPE ")  # every family once


T_NOW = 1_700_000_000_000


def test_a_family_sent_with_two_types_is_typed_by_its_oldest_series_after_slots_are_reused() -> None:
    """Samples of a family go in the order their series were created, whatever slot a new
    series reused: a gauge joining after another series of the name expired must not
    retype the family its older counter still reports in."""
    fleet = FleetState(100, series_ttl_s=600)
    fleet.apply("s", "n", [series("x_total", T_NOW, 1.0, G, k="a"), series("x_total", T_NOW, 1.0, C, k="b")],
                now_ms=T_NOW)
    for k in range(1, 13):  # only k=b keeps reporting: k=a expires and frees its slot
        fleet.apply("s", "n", [series("x_total", T_NOW + k * 60_000, 1.0 + k, C, k="b")], now_ms=T_NOW + k * 60_000)
    t = T_NOW + 13 * 60_000
    fleet.apply("s", "n", [series("x_total", t, 20.0, C, k="b"), series("x_total", t, 5.0, G, k="c")], now_ms=t)
    text = fleet.exposition(t + 60_000).render().decode()
    assert "# TYPE x_total counter" in text
    assert text.index('k="b"') < text.index('k="c"')


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats() | st.integers(-(2**60), 2**60).map(float)
                | st.sampled_from([0.0, -0.0, 2.0**53, 2.0**53 - 1, -(2.0**53), 1e16, 0.1]), max_size=50))
def test_values_are_written_as_repr_writes_them(values: list[float]) -> None:
    """Whole numbers take a faster way to their text than repr; the text is still repr's
    (NaN and the infinities by their text-format names)."""
    named = {"nan": "NaN", "inf": "+Inf", "-inf": "-Inf"}
    assert _values_text(np.array(values, dtype=np.float64)) == [named.get(repr(v), repr(v)) for v in values]


def test_a_scrape_in_steps_shows_each_node_as_it_is_when_its_step_comes() -> None:
    """Batches applied between a scrape's steps: a node already shown is in this scrape as
    it was, one shown later with what arrived meanwhile, new series included (the scrape's
    columns grow past the fleet's size at its start)."""
    fleet = FleetState(1000)
    for n in range(3):
        fleet.apply("s", f"n{n}", [series(f"m_{i}", T_NOW, float(i)) for i in range(4)], now_ms=T_NOW)
    scrape = fleet.scrape(T_NOW + 1000)
    assert scrape.step(1)  # n0 shown; n1 and n2 wait
    fleet.apply("s", "n0", [series("m_0", T_NOW + 500, 100.0)], now_ms=T_NOW + 500)
    fleet.apply("s", "n2", [series(f"joined_{i}", T_NOW + 500, 7.0) for i in range(20)]
                + [series("m_0", T_NOW + 500, 200.0)], now_ms=T_NOW + 500)
    while scrape.step(1):
        pass
    got = samples(scrape.text().render().decode())
    assert got[("m_0", (("node", "n0"), ("site", "s")))] == 0.0  # shown before its batch
    assert got[("m_0", (("node", "n2"), ("site", "s")))] == 200.0
    assert sum(1 for name, _ in got if name.startswith("joined_")) == 20
    assert len(got) == 3 * 4 + 20
    assert samples(fleet.exposition(T_NOW + 2000).render().decode())[("m_0", (("node", "n0"), ("site", "s")))] == 100.0


def test_a_series_at_the_earliest_timestamp_is_still_shown() -> None:
    """A saved row at the lowest int64 time with value 0.0 looks like a slot never shown
    (its time and value equal the fresh ones): it is rendered all the same."""
    fleet = FleetState(100)
    fleet.restore([("s", "n", "m", "[]", int(G), -(1 << 63), 0.0)], now_ms=T_NOW)
    for _ in range(2):  # the second scrape reuses the first one's text
        assert samples(fleet.exposition(T_NOW).render().decode()) == {("m", (("node", "n"), ("site", "s"))): 0.0}
