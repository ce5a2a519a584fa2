"""The runner isolates sources: one that fails, stalls or cannot run never stops the others."""

from __future__ import annotations

import threading
import time

from agent.runner import Runner, Scheduled
from agent.sources.base import Labels, Sample
from wire import MetricType


class Steady:
    def __init__(self, name: str) -> None:
        self.name = name

    def probe(self) -> str | None:
        return None

    def collect(self, now: float) -> list[Sample]:
        return [Sample("up", (("source", self.name),), MetricType.GAUGE, 1.0, round(now * 1000))]


class Failing(Steady):
    def collect(self, now: float) -> list[Sample]:
        raise OSError("device vanished")


class Stalling(Steady):
    def collect(self, now: float) -> list[Sample]:
        time.sleep(0.35)
        return super().collect(now)


class Absent(Steady):
    def probe(self) -> str | None:
        return "unavailable: no such hardware"


def test_failures_are_isolated_counted_and_reported_once() -> None:
    got: list[Sample] = []
    lock = threading.Lock()

    def sink(samples: list[Sample], born: frozenset[tuple[str, Labels]]) -> None:
        with lock:
            got.extend(samples)

    runner = Runner([Scheduled(Steady("ok"), 0.1), Scheduled(Failing("bad"), 0.1),
                     Scheduled(Stalling("slow"), 0.1), Scheduled(Absent("gpu"), 0.1)], sink)
    runner.start()
    time.sleep(1.2)
    runner.stop()
    errors = runner.error_counts()
    ok_ticks = [s.ts_ms for s in got if dict(s.labels)["source"] == "ok"]
    assert len(ok_ticks) >= 8, "the steady source kept its schedule"
    assert all(t % 100 == 0 for t in ok_ticks), "ticks are aligned to the interval"
    assert errors[("bad", "collect")] >= 8
    assert errors[("slow", "overrun")] >= 2
    assert runner.disabled == {"gpu": "unavailable: no such hardware"}
    assert not any(dict(s.labels)["source"] in ("bad", "gpu") for s in got)


def test_wall_clock_stepping_back_does_not_stall_sampling() -> None:
    offset = [0.0]
    got: list[int] = []
    runner = Runner([Scheduled(Steady("ok"), 0.1)], lambda s, _born: got.extend(x.ts_ms for x in s),
                    clock=lambda: time.time() - offset[0])
    runner.start()
    time.sleep(0.4)
    offset[0] = 3600.0  # NTP corrects an hour-fast clock
    stepped_at = len(got)
    time.sleep(0.6)
    runner.stop()
    assert len(got) - stepped_at >= 3, "sampling continued on the corrected clock"
