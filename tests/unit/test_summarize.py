"""The summarizer: aligned windows, gauge statistics, counters that keep their resets."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from agent.sources.base import Sample
from agent.summarize import Summarizer
from wire import MetricType

G, C, U, INFO = MetricType.GAUGE, MetricType.COUNTER, MetricType.UNTYPED, MetricType.INFO
T0 = 1_700_000_040_000  # a multiple of 60 s
LABELS = (("gpu", "0"),)


def gauge(v: float, ts: int, name: str = "temp", mtype: MetricType = G) -> Sample:
    return Sample(name, LABELS, mtype, v, ts)


def counter(v: float, ts: int, name: str = "bytes_total") -> Sample:
    return Sample(name, LABELS, C, v, ts)


def series_map(out: list[wire.Series]) -> dict[tuple[str, MetricType], wire.Series]:
    got = {(s.name, s.mtype): s for s in out}
    assert len(got) == len(out)
    return got


def points(s: wire.Series) -> list[tuple[int, float]]:
    return list(zip(s.timestamps_ms, s.values, strict=True))


def test_gauge_window_with_several_samples_gives_last_min_max_mean() -> None:
    z = Summarizer(60)
    z.add([gauge(50, T0 + 1_000), gauge(70, T0 + 11_000), gauge(40, T0 + 21_000)])
    z.add([gauge(60, T0 + 31_000)])
    assert z.flush(T0 + 59_999) == []  # window [T0, T0+60s) has not ended
    got = series_map(z.flush(T0 + 60_000))
    assert set(got) == {("temp", G), ("temp:window_min", G), ("temp:window_max", G),
                        ("temp:window_mean", G)}
    last = T0 + 31_000
    assert points(got[("temp", G)]) == [(last, 60.0)]
    assert points(got[("temp:window_min", G)]) == [(last, 40.0)]
    assert points(got[("temp:window_max", G)]) == [(last, 70.0)]
    assert points(got[("temp:window_mean", G)]) == [(last, 55.0)]
    assert all(s.labels == LABELS for s in got.values())
    assert z.flush(T0 + 120_000) == []  # nothing flushed twice


def test_single_sample_per_window_is_forwarded_raw() -> None:
    z = Summarizer(10)
    z.add([gauge(1.5, T0 + 3_000), gauge(2.5, T0 + 13_000), gauge(3.5, T0 + 23_000)])
    out = z.flush(T0 + 30_000)
    assert [(s.name, s.mtype) for s in out] == [("temp", G)]
    assert points(out[0]) == [(T0 + 3_000, 1.5), (T0 + 13_000, 2.5), (T0 + 23_000, 3.5)]


def test_windows_are_aligned_to_wall_time_not_to_the_first_sample() -> None:
    z = Summarizer(60)
    # 59 s and 61 s after an aligned boundary fall in different windows.
    z.add([gauge(1, T0 + 59_000), gauge(2, T0 + 61_000), gauge(4, T0 + 62_000)])
    out = series_map(z.flush(T0 + 120_000))
    assert points(out[("temp", G)]) == [(T0 + 59_000, 1.0), (T0 + 62_000, 4.0)]
    # only the second window had more than one sample
    assert points(out[("temp:window_min", G)]) == [(T0 + 62_000, 2.0)]
    assert points(out[("temp:window_mean", G)]) == [(T0 + 62_000, 3.0)]


def test_open_window_stays_open_and_flush_all_closes_it() -> None:
    z = Summarizer(60)
    z.add([gauge(1, T0 + 1_000), gauge(5, T0 + 61_000), gauge(7, T0 + 62_000)])
    first = z.flush(T0 + 90_000)
    assert [points(s) for s in first] == [[(T0 + 1_000, 1.0)]]
    z.add([gauge(9, T0 + 63_000)])
    rest = series_map(z.flush_all())
    assert points(rest[("temp", G)]) == [(T0 + 63_000, 9.0)]
    assert points(rest[("temp:window_max", G)]) == [(T0 + 63_000, 9.0)]
    assert points(rest[("temp:window_min", G)]) == [(T0 + 63_000, 5.0)]
    assert z.flush_all() == []


def test_untyped_keeps_its_type_and_gets_gauge_statistics_info_gets_last_only() -> None:
    z = Summarizer(60)
    z.add([gauge(1, T0 + 1, "u", U), gauge(3, T0 + 2, "u", U)])
    z.add([gauge(1, T0 + 1, "build_info", INFO), gauge(1, T0 + 2, "build_info", INFO)])
    got = series_map(z.flush(T0 + 60_000))
    assert set(got) == {("u", U), ("u:window_min", G), ("u:window_max", G),
                        ("u:window_mean", G), ("build_info", INFO)}
    assert points(got[("build_info", INFO)]) == [(T0 + 2, 1.0)]
    assert points(got[("u:window_mean", G)]) == [(T0 + 2, 2.0)]


def test_nan_counts_as_a_sample_but_not_in_statistics() -> None:
    z = Summarizer(60)
    z.add([gauge(2, T0 + 1), gauge(math.nan, T0 + 2), gauge(4, T0 + 3), gauge(math.nan, T0 + 4)])
    z.add([gauge(math.nan, T0 + 60_001), gauge(math.nan, T0 + 60_002)])
    got = series_map(z.flush(T0 + 120_000))
    last = got[("temp", G)].values
    assert len(last) == 2 and all(math.isnan(v) for v in last)
    assert got[("temp:window_min", G)].values[0] == 2.0
    assert got[("temp:window_max", G)].values[0] == 4.0
    assert got[("temp:window_mean", G)].values[0] == 3.0
    assert math.isnan(got[("temp:window_mean", G)].values[1])


def test_a_flush_covering_several_windows_gives_multi_point_series_that_encode() -> None:
    z = Summarizer(10)
    for i in range(60):  # one sample every 2 s for 2 minutes: 5 per window
        z.add([gauge(float(i % 7), T0 + 2_000 * i), counter(1000.0 * i, T0 + 2_000 * i)])
    out = z.flush(T0 + 120_000)
    got = series_map(out)
    assert len(got[("temp", G)].timestamps_ms) == 12
    assert len(got[("temp:window_mean", G)].timestamps_ms) == 12
    # counter: first sample ever, then the last of each window
    assert got[("bytes_total", C)].timestamps_ms == (T0, *(T0 + 8_000 + 10_000 * k for k in range(12)))
    for s in out:
        assert all(b > a for a, b in zip(s.timestamps_ms, s.timestamps_ms[1:], strict=False))
    assert wire.decode_series(wire.encode_series(out)) == out


def test_late_and_out_of_order_samples_are_dropped_and_counted() -> None:
    z = Summarizer(60)
    z.add([gauge(1, T0 + 1_000)])
    z.flush(T0 + 60_000)
    z.add([gauge(2, T0 + 59_000, "other")])  # its window was flushed already
    z.add([gauge(3, T0 + 70_000), gauge(4, T0 + 70_000), gauge(5, T0 + 65_000)])
    assert z.dropped_samples == 3
    out = z.flush(T0 + 120_000)
    assert [(s.name, points(s)) for s in out] == [("temp", [(T0 + 70_000, 3.0)])]


def test_grace_keeps_a_window_open_for_samples_still_on_their_way() -> None:
    z = Summarizer(60, grace_s=5)
    z.add([gauge(1, T0 + 1_000)])
    assert z.flush(T0 + 64_999) == []
    z.add([gauge(2, T0 + 59_900)])  # a slow scrape stamped before the boundary
    out = series_map(z.flush(T0 + 65_000))
    assert points(out[("temp", G)]) == [(T0 + 59_900, 2.0)]
    assert z.dropped_samples == 0


def test_counter_reset_forwards_both_sides() -> None:
    z = Summarizer(60)
    z.add([counter(v, T0 + 10_000 * (i + 1)) for i, v in enumerate([5, 8, 12, 3, 6])])
    (s,) = z.flush(T0 + 60_000)
    # first ever (5), pre-reset (12), post-reset (3), last (6); 8 is not needed
    assert points(s) == [(T0 + 10_000, 5.0), (T0 + 30_000, 12.0), (T0 + 40_000, 3.0),
                         (T0 + 50_000, 6.0)]


def test_counter_reset_across_a_window_boundary() -> None:
    z = Summarizer(60)
    z.add([counter(10, T0 + 1_000), counter(20, T0 + 50_000)])
    assert points(z.flush(T0 + 60_000)[0]) == [(T0 + 1_000, 10.0), (T0 + 50_000, 20.0)]
    z.add([counter(2, T0 + 70_000), counter(4, T0 + 80_000), counter(9, T0 + 90_000)])
    # the pre-reset point was the last window's last: only the post-reset one is added
    assert points(z.flush(T0 + 120_000)[0]) == [(T0 + 70_000, 2.0), (T0 + 90_000, 9.0)]


def test_idle_series_are_forgotten() -> None:
    z = Summarizer(60)
    z.add([counter(10, T0 + 1_000), counter(20, T0 + 2_000)])
    z.flush(T0 + 60_000)
    z.flush(T0 + 180_000)
    # Forgotten, so its next sample counts as the series' first and is forwarded as such.
    z.add([counter(30, T0 + 200_000), counter(40, T0 + 210_000)])
    (s,) = z.flush(T0 + 240_000)
    assert points(s) == [(T0 + 200_000, 30.0), (T0 + 210_000, 40.0)]


def prom_increase(pts: Sequence[tuple[int, float]]) -> float:
    """Prometheus' increase() without extrapolation: last - first, plus every reset's value."""
    total = 0.0
    for (_, a), (_, b) in zip(pts, pts[1:], strict=False):
        total += b - a if b >= a else b
    return total


counter_steps = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=25_000),  # ms since the previous sample
        st.one_of(st.integers(0, 1_000).map(lambda d: ("inc", d)),
                  st.integers(0, 50).map(lambda v: ("reset", v))),
        st.booleans(),  # flush before this sample
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(
    steps=counter_steps,
    window_s=st.sampled_from([1, 5, 10, 60]),
    start=st.integers(min_value=0, max_value=10**6),
)
def test_counter_increase_is_preserved_on_forwarded_points(
    steps: list[tuple[int, tuple[str, int], bool]], window_s: int, start: int
) -> None:
    z = Summarizer(window_s)
    raw: list[tuple[int, float]] = []
    emitted: list[tuple[int, float]] = []
    ts, value = T0 + start, 0.0
    for dt, (op, amount), flush_first in steps:
        ts += dt
        value = value + amount if op == "inc" else float(min(amount, value))
        if flush_first:
            for s in z.flush(ts):
                emitted += points(s)
        z.add([counter(value, ts)])
        raw.append((ts, value))
    for s in z.flush_all():
        emitted += points(s)

    assert z.dropped_samples == 0
    assert all(b[0] > a[0] for a, b in zip(emitted, emitted[1:], strict=False))
    assert set(emitted) <= set(raw)
    assert emitted[0] == raw[0] and emitted[-1] == raw[-1]
    # Each window's last sample is forwarded.
    last_of_window = {t // (window_s * 1000): (t, v) for t, v in raw}
    assert set(last_of_window.values()) <= set(emitted)
    # increase() over any range bounded by forwarded points equals increase() over raw.
    for i in range(len(emitted)):
        for j in range(i + 1, len(emitted)):
            lo, hi = emitted[i][0], emitted[j][0]
            inside = [p for p in raw if lo <= p[0] <= hi]
            assert prom_increase(emitted[i : j + 1]) == prom_increase(inside)


def test_concurrent_adds_while_flushing_lose_nothing_unaccounted() -> None:
    # 1 ms windows and a shared clock: every sample has its own window, so each one is
    # either forwarded raw exactly once or (late for a flushed window) dropped and counted.
    z = Summarizer(0.001)
    threads, per_thread = 8, 2_000
    clock = [T0]
    lock = threading.Lock()

    def source(k: int) -> None:
        for i in range(per_thread):
            with lock:
                clock[0] += 1
                ts = clock[0]
            z.add([gauge(float(i), ts, name=f"g{k}")])

    workers = [threading.Thread(target=source, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    emitted = 0
    while any(w.is_alive() for w in workers):
        with lock:
            now = clock[0]
        emitted += sum(len(s.timestamps_ms) for s in z.flush(now) if ":" not in s.name)
    for w in workers:
        w.join()
    emitted += sum(len(s.timestamps_ms) for s in z.flush_all() if ":" not in s.name)
    assert emitted + z.dropped_samples == threads * per_thread
    assert emitted > 0
