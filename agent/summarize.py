"""Window aggregation: raw samples in, a few points per series and window out.

Windows are aligned to multiples of the window length in wall time (epoch ms), so
every node cuts the same windows. Per series and window:

- GAUGE, UNTYPED: `name` = the last sample (its own value and timestamp), plus
  `name:window_min`, `name:window_max`, `name:window_mean` (GAUGE, same labels, at the
  last sample's timestamp). A series with exactly one sample in the window is forwarded
  raw, without the :window_* series: that is what a window equal to the source interval
  looks like, and it is detected per series and window from the count alone, so it
  needs no knowledge of source intervals and stays right when an interval drifts.
  NaN samples count as samples but are left out of min/max/mean.
- COUNTER: the last sample; also the first sample ever seen of the series and, at each
  reset (a value below the previous one), the last pre-reset and the first post-reset
  sample. Between any two consecutive forwarded points the raw samples then hold no
  reset, so Prometheus' increase()/rate() over forwarded points whose range starts and
  ends on forwarded points counts exactly what it counts over the raw samples.
  A counter series the runner says was born in this collect (see agent/runner.py: it
  did not exist a moment before) also gets a 0 one millisecond before its first sample,
  forwarded with that sample's window even when that millisecond lies in an earlier,
  already flushed window (a tick on a window boundary whose read ends after the flush):
  the zero is part of the first point's window, never late. It is forwarded only with
  its sample (a late first sample drops both), only when the summarizer holds no earlier
  point of the series (so it can never be out of order), and only before a first value
  above 0 (a 0 before a 0 counts nothing). A batch's window range (wire.prepare_data)
  is computed over every point, so it simply starts that millisecond earlier.
- INFO: the last sample.

Samples are folded into running aggregates as they arrive; only counters keep extra
points, and only at resets.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from agent.sources.base import Labels, Sample
from wire import MetricType, Series

SeriesKey = tuple[str, Labels, MetricType]

WINDOW_SUFFIXES = (":window_min", ":window_max", ":window_mean")


@dataclass(slots=True)
class _GaugeWindow:
    count: int
    last_ts: int
    last_v: float
    finite: int = 0  # samples that enter min/max/mean (not NaN)
    lo: float = math.inf
    hi: float = -math.inf
    total: float = 0.0

    def fold(self, ts: int, v: float) -> None:
        self.count += 1
        self.last_ts = ts
        self.last_v = v
        if v == v:
            self.finite += 1
            self.lo = min(self.lo, v)
            self.hi = max(self.hi, v)
            self.total += v


@dataclass(slots=True)
class _CounterWindow:
    last_ts: int
    last_v: float
    extra: list[tuple[int, float]] = field(default_factory=list)  # born zero, first ever, reset edges


@dataclass(slots=True)
class _SeriesState:
    last_ts: int
    last_v: float
    windows: dict[int, _GaugeWindow | _CounterWindow] = field(default_factory=dict)


class Summarizer:
    """Folds samples into aligned windows; thread-safe.

    add() is called from any number of source threads; flush()/flush_all() from the
    main loop. A sample whose window was already flushed, or that is not newer than
    the previous sample of its series, is dropped and counted in `dropped_samples`.
    """

    def __init__(self, window_s: float, grace_s: float = 0.0) -> None:
        """window_s: window length; grace_s: how long after its end a window stays open
        for samples still on their way (a slow scrape stamped before the boundary)."""
        self.window_ms = round(window_s * 1000)
        self.grace_ms = round(grace_s * 1000)
        if self.window_ms < 1:
            raise ValueError("window must be at least 1 ms")
        if self.grace_ms < 0:
            raise ValueError("grace must not be negative")
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, _SeriesState] = {}
        self._closed_before = -(2**62)  # windows with index below this have been flushed
        self.dropped_samples = 0

    def add(self, samples: Iterable[Sample], born: Collection[tuple[str, Labels]] = ()) -> None:
        """Fold samples in; called from source threads, concurrently with each other.

        born: (name, labels) of counter series born in these samples (the runner's
        judgement); each gets a 0 just before its first sample, in that sample's window."""
        wms = self.window_ms
        with self._lock:
            for s in samples:
                ts = s.ts_ms
                w = ts // wms
                if w < self._closed_before:
                    self.dropped_samples += 1
                    continue
                key = (s.name, s.labels, s.mtype)
                v = s.value
                state = self._series.get(key)
                if state is None:
                    state = self._series[key] = _SeriesState(ts, v)
                    first = True
                elif ts <= state.last_ts:
                    self.dropped_samples += 1
                    continue
                else:
                    first = False
                win = state.windows.get(w)
                if s.mtype == MetricType.COUNTER:
                    if win is None:
                        win = state.windows[w] = _CounterWindow(ts, v)
                    assert isinstance(win, _CounterWindow)
                    if first:
                        if v > 0 and born and (s.name, s.labels) in born:
                            win.extra.append((ts - 1, 0.0))
                        win.extra.append((ts, v))
                    elif v < state.last_v:
                        # The pre-reset sample, if it lies in an earlier window, was that
                        # window's last sample and is forwarded already.
                        if state.last_ts // wms == w:
                            win.extra.append((state.last_ts, state.last_v))
                        win.extra.append((ts, v))
                    win.last_ts = ts
                    win.last_v = v
                else:
                    if win is None:
                        win = state.windows[w] = _GaugeWindow(0, ts, v)
                    assert isinstance(win, _GaugeWindow)
                    win.fold(ts, v)
                state.last_ts = ts
                state.last_v = v

    def flush(self, now_ms: int) -> list[Series]:
        """Every window that ended by now_ms (less grace), as series; later ones stay open."""
        with self._lock:
            limit = (now_ms - self.grace_ms) // self.window_ms
            self._closed_before = max(self._closed_before, limit)
            return self._take_closed()

    def flush_all(self) -> list[Series]:
        """Close and return every window, open ones included (for shutdown)."""
        with self._lock:
            newest = max((w for st in self._series.values() for w in st.windows), default=None)
            if newest is not None:
                self._closed_before = max(self._closed_before, newest + 1)
            return self._take_closed()

    def _take_closed(self) -> list[Series]:
        closed: list[tuple[SeriesKey, list[tuple[int, _GaugeWindow | _CounterWindow]]]] = []
        # A series idle for a whole closed window is forgotten (label churn must not grow
        # memory); if it comes back it starts afresh, which costs one extra counter point.
        forget_before_ms = (self._closed_before - 1) * self.window_ms
        idle: list[SeriesKey] = []
        for key, st in self._series.items():
            done = sorted(w for w in st.windows if w < self._closed_before)
            if done:
                closed.append((key, [(w, st.windows.pop(w)) for w in done]))
            if not st.windows and st.last_ts < forget_before_ms:
                idle.append(key)
        for key in idle:
            del self._series[key]
        return _build(closed)


def _build(
    closed: list[tuple[SeriesKey, list[tuple[int, _GaugeWindow | _CounterWindow]]]],
) -> list[Series]:
    points: dict[SeriesKey, tuple[list[int], list[float]]] = {}

    def put(key: SeriesKey, ts: int, v: float) -> None:
        col = points.get(key)
        if col is None:
            col = points[key] = ([], [])
        col[0].append(ts)
        col[1].append(v)

    for key, windows in closed:
        name, labels, mtype = key
        for _, win in windows:
            if isinstance(win, _CounterWindow):
                for ts, v in sorted(dict([*win.extra, (win.last_ts, win.last_v)]).items()):
                    put(key, ts, v)
                continue
            put(key, win.last_ts, win.last_v)
            if win.count > 1 and mtype != MetricType.INFO:
                if win.finite:
                    stats = (win.lo, win.hi, win.total / win.finite)
                else:
                    stats = (math.nan, math.nan, math.nan)
                for suffix, v in zip(WINDOW_SUFFIXES, stats, strict=True):
                    put((name + suffix, labels, MetricType.GAUGE), win.last_ts, v)

    out: list[Series] = []
    for key in sorted(points, key=lambda k: (k[0], k[1], int(k[2]))):
        tss, vals = points[key]
        if any(b <= a for a, b in zip(tss, tss[1:], strict=False)):
            # Only when a scraped name collides with a derived one (`x:window_min`):
            # keep time order and the first point per timestamp.
            merged: dict[int, float] = {}
            for ts, v in zip(tss, vals, strict=True):
                merged.setdefault(ts, v)
            tss = sorted(merged)
            vals = [merged[ts] for ts in tss]
        out.append(Series(key[0], key[1], key[2], tuple(tss), tuple(vals)))
    return out
