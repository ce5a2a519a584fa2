"""Per-source schedules with failure isolation, and the counter series each source gives birth to.

Each enabled source gets its own thread, so a source that stalls (a hung HTTP
endpoint, a slow disk) delays only itself. A failing collect() is counted in
waystation_source_errors_total{source,stage} and retried next interval; a tick
that comes while the previous collect() is still running is skipped and counted
as stage="overrun". Sources whose probe() says they cannot run are disabled and
said so once. Every running source reports its collect, summarize and overrun
stages at 0 from the start (`error_counts()`), so no error counter is born at 1,
which increase() would never count; a probe error happens before the first batch.

Born counters. A counter series that a server or source creates at its first event
(vLLM's `vllm:request_success_total{finished_reason="abort"}`, TGI's
`tgi_request_failure`, our `waystation_gpu_xid_errors_total{xid}`) first shows up
already at 1 or more, and increase()/rate() never count a series' first point. The
runner therefore remembers, per source, the counter series (name, labels) it has
reported and whether its previous collect() was complete, and marks a counter series
"born" in a collect when

- the source's previous collect() was complete: it returned samples, did not raise,
  and the source did not flag it `partial` (below). The source was reporting a moment
  ago and this series was not in it, so a moment ago the series did not exist: it is
  0 just before its first point; and
- the source has not reported this series before (within the memory horizon below).

The summarizer then forwards a 0 one millisecond before the series' first point,
carried with that point's window (see agent/summarize.py), so it is never late.
Deliberately not born:

- series present at a source's first complete collect, or the first one after a
  failed, empty or partial collect: a target that was unreachable (or not yet
  watched) has long-running counters, and a 0 before them would invent an increase
  of everything they ever counted. The price: a series that is truly created while
  its source cannot be read loses its first event from increase(), as before;
- a series that disappears and comes back (a flickering exporter, a family the
  scrape's max_series left out for a while): it is not new, and a 0 would invent a
  reset;
- a restarted target: its surviving series come back lower, which is an ordinary
  counter reset (the summarizer forwards both sides of it and Prometheus counts the
  new value); only series it never had before are born, and only if the collect
  before saw it up (a restart that took a failed collect is "after a failed
  collect" above).

A source whose collect() can return part of its series while others failed for this
interval only (a read error of one field or device) sets an attribute `partial =
True` after such a collect (the runner reads it with getattr, default False): the next
collect is then treated as following a failure. Only failures of counters the source
has never reported matter; the gpu source flags exactly those.

Memory: a source's memory is a dict from the hash of (name, labels) to the
generation it was last reported in; a new generation starts every
SEEN_GENERATION_S, or early when the dict outgrows twice the source's largest
collect (label churn), and forgets series not reported during the generation
before. A series absent that long (one to two generations; less for a source with
heavy label churn) and then back is treated as born. A hash collision can only make a
born series look known (no zero, as before this existed), never the opposite.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from agent.sources.base import Labels, Sample, Source
from wire import MetricType

log = logging.getLogger("waystation.runner")

# The stages a running source can fail at, reported from 0 (a probe fails only at start).
RUNNING_STAGES = ("collect", "summarize", "overrun")

# How long a series a source stopped reporting stays remembered as seen (one to two of these).
SEEN_GENERATION_S = 24 * 3600.0
# The least a source's memory may hold before label churn starts a generation early.
SEEN_MIN_CAP = 1000

SeriesId = tuple[str, Labels]
Sink = Callable[[list[Sample], frozenset[SeriesId]], None]


@dataclass(frozen=True)
class Scheduled:
    source: Source
    interval_s: float


class CounterBirths:
    """One source's memory of its counter series; see the module docstring for the rule."""

    __slots__ = ("cap", "generation", "generation_start", "previous_complete", "seen")

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}  # hash((name, labels)) -> generation it was last reported in
        self.generation = 0
        self.generation_start: float | None = None
        self.cap = SEEN_MIN_CAP
        self.previous_complete = False

    def observe(self, samples: list[Sample], complete: bool, now: float) -> frozenset[SeriesId]:
        """Record one collect's counter series; return those born in it.

        complete: the collect did not raise and was not flagged partial (an empty one is
        never complete). now: the tick, in seconds, for the generations."""
        seen = self.seen
        counter = MetricType.COUNTER
        hashes = [hash((s.name, s.labels)) for s in samples if s.mtype is counter]
        born: frozenset[SeriesId] = frozenset()
        if self.previous_complete and not seen.keys() >= set(hashes):
            born = frozenset((s.name, s.labels) for s in samples
                             if s.mtype is counter and hash((s.name, s.labels)) not in seen)
        seen.update(dict.fromkeys(hashes, self.generation))
        counters = len(hashes)
        self.previous_complete = complete and bool(samples)
        self.cap = max(self.cap, 2 * counters)
        start = self.generation_start
        if start is None or now < start:  # first collect, or the wall clock stepped back
            self.generation_start = start = now
        if now - start >= SEEN_GENERATION_S or len(seen) > self.cap:
            # Keep what was reported in the generation now ending or since; rebuilt, not
            # deleted from, so the dict's table shrinks with it.
            gen = self.generation
            self.seen = {h: g for h, g in seen.items() if g >= gen}
            self.generation = gen + 1
            self.generation_start = now
        return born


class Runner:
    def __init__(
        self,
        scheduled: list[Scheduled],
        sink: Sink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """sink(samples, born) gets each collect's samples and the counter series born in it."""
        self.scheduled = scheduled
        self.sink = sink
        self.clock = clock
        self.stop_event = threading.Event()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.disabled: dict[str, str] = {}
        self.running: list[str] = []
        self.births: dict[int, CounterBirths] = {id(item.source): CounterBirths() for item in scheduled}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def count_error(self, source: str, stage: str) -> None:
        with self.lock:
            self.errors[(source, stage)] += 1

    def error_counts(self) -> dict[tuple[str, str], int]:
        """Errors by (source, stage): every running source's RUNNING_STAGES from 0, plus probe errors."""
        with self.lock:
            counts = {(name, stage): 0 for name in self.running for stage in RUNNING_STAGES}
            counts.update(self.errors)
            return counts

    def start(self) -> None:
        for item in self.scheduled:
            name = item.source.name
            try:
                reason = item.source.probe()
            except Exception as exc:  # noqa: BLE001 (a probe must not stop the agent)
                reason = f"probe failed: {exc}"
                self.count_error(name, "probe")
            if reason is not None:
                self.disabled[name] = reason
                log.warning("source %s disabled: %s", name, reason)
                continue
            with self.lock:
                self.running.append(name)
            t = threading.Thread(target=self._loop, args=(item,), name=f"source-{name}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)

    def run_once(self, item: Scheduled, tick: float) -> None:
        """One collect of one source at `tick`, into the sink; from that source's thread only."""
        name = item.source.name
        complete = True
        try:
            samples = item.source.collect(tick)
        except Exception as exc:  # noqa: BLE001 (failure isolation is the point)
            self.count_error(name, "collect")
            log.warning("source %s: collect failed: %s", name, exc)
            samples = []
            complete = False
        births = self.births[id(item.source)]
        born = births.observe(samples, complete and not getattr(item.source, "partial", False), tick)
        if samples:
            try:
                self.sink(samples, born)
            except Exception:
                self.count_error(name, "summarize")
                log.exception("source %s: samples could not be summarized", name)
                births.previous_complete = False

    def _loop(self, item: Scheduled) -> None:
        name = item.source.name
        interval = item.interval_s
        # Ticks are aligned to multiples of the interval so sources sharing an interval
        # share timestamps (the wire format stores a shared timestamp column once).
        next_tick = (self.clock() // interval + 1) * interval
        while not self.stop_event.wait(max(0.0, next_tick - self.clock())):
            tick = next_tick
            self.run_once(item, tick)
            now = self.clock()
            next_tick = tick + interval
            if now >= next_tick:
                skipped = int((now - tick) // interval)
                with self.lock:
                    self.errors[(name, "overrun")] += skipped
                next_tick = tick + (skipped + 1) * interval
            elif next_tick - now > interval:
                # The wall clock stepped back: sample on the new clock, not hours from now.
                next_tick = (now // interval + 1) * interval
