"""Per-source schedules with failure isolation.

Each enabled source gets its own thread, so a source that stalls (a hung HTTP
endpoint, a slow disk) delays only itself. A failing collect() is counted in
waystation_source_errors_total{source,stage} and retried next interval; a tick
that comes while the previous collect() is still running is skipped and counted
as stage="overrun". Sources whose probe() says they cannot run are disabled and
said so once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from agent.sources.base import Sample, Source

log = logging.getLogger("waystation.runner")


@dataclass(frozen=True)
class Scheduled:
    source: Source
    interval_s: float


class Runner:
    def __init__(
        self,
        scheduled: list[Scheduled],
        sink: Callable[[list[Sample]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scheduled = scheduled
        self.sink = sink
        self.clock = clock
        self.stop_event = threading.Event()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.disabled: dict[str, str] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def count_error(self, source: str, stage: str) -> None:
        with self.lock:
            self.errors[(source, stage)] += 1

    def error_counts(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return dict(self.errors)

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
            t = threading.Thread(target=self._loop, args=(item,), name=f"source-{name}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)

    def _loop(self, item: Scheduled) -> None:
        name = item.source.name
        interval = item.interval_s
        # Ticks are aligned to multiples of the interval so sources sharing an interval
        # share timestamps (the wire format stores a shared timestamp column once).
        next_tick = (self.clock() // interval + 1) * interval
        while not self.stop_event.wait(max(0.0, next_tick - self.clock())):
            tick = next_tick
            try:
                samples = item.source.collect(tick)
            except Exception as exc:  # noqa: BLE001 (failure isolation is the point)
                self.count_error(name, "collect")
                log.warning("source %s: collect failed: %s", name, exc)
                samples = []
            if samples:
                try:
                    self.sink(samples)
                except Exception:
                    self.count_error(name, "summarize")
                    log.exception("source %s: samples could not be summarized", name)
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
