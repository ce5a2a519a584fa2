"""Born counters: a counter series that appears while its source was already reporting gets a 0
just before its first point, through the real Runner and Summarizer; nothing else does.

A scripted source plays collects (a page of series, a failure, an empty answer, a partial
one); each test reads what the summarizer forwards, as it would go on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

import agent.runner as runner_mod
import wire
from agent.runner import CounterBirths, Runner, Scheduled
from agent.sources.base import Labels, Sample
from agent.summarize import Summarizer
from wire import MetricType

C, G = MetricType.COUNTER, MetricType.GAUGE
T0 = 1_700_000_040.0  # seconds, a multiple of 60
REQS = ("vllm:request_success_total", (("finished_reason", "stop"),))
ABORT = ("vllm:request_success_total", (("finished_reason", "abort"),))
FAIL = ("tgi_request_failure", (("err", "validation"),))

Page = dict[tuple[str, Labels], float]
Step = Page | Exception | None  # a page, a collect that raises, None for an empty answer


class Scripted:
    """A source that answers each collect with the next step of its script."""

    name = "vllm"

    def __init__(self, script: Sequence[Step], partial_at: Sequence[int] = ()) -> None:
        self.script = list(script)
        self.partial_at = set(partial_at)
        self.calls = 0
        self.partial = False

    def probe(self) -> str | None:
        return None

    def collect(self, now: float) -> list[Sample]:
        step = self.script[self.calls]
        self.partial = self.calls in self.partial_at
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        ts = round(now * 1000)
        return [Sample(name, labels, C, v, ts) for (name, labels), v in (step or {}).items()]


def play(script: Sequence[Step], interval: float = 10.0, window: float = 60.0,
         partial_at: Sequence[int] = ()) -> tuple[dict[tuple[str, Labels], list[tuple[int, float]]], Summarizer]:
    """Every step at T0 + k * interval, flushing each window as the agent does; forwarded points."""
    source = Scripted(script, partial_at)
    z = Summarizer(window)
    runner = Runner([Scheduled(source, interval)], z.add)
    (item,) = runner.scheduled
    out: list[wire.Series] = []
    for k in range(len(script)):
        tick = T0 + k * interval
        out += z.flush(round(tick * 1000))  # the flush of a boundary comes before its tick's read ends
        runner.run_once(item, tick)
    out += z.flush_all()
    got: dict[tuple[str, Labels], list[tuple[int, float]]] = {}
    for s in out:
        got.setdefault((s.name, s.labels), []).extend(zip(s.timestamps_ms, s.values, strict=True))
    assert z.dropped_samples == 0
    return got, z


def ms(k: int, interval: float = 10.0) -> int:
    return round((T0 + k * interval) * 1000)


def test_a_series_born_after_a_successful_collect_gets_a_zero_before_its_first_point() -> None:
    got, _ = play([{REQS: 100}, {REQS: 103}, {REQS: 110, ABORT: 1}, {REQS: 112, ABORT: 1}])
    assert got[ABORT] == [(ms(2) - 1, 0.0), (ms(2), 1.0), (ms(3), 1.0)]
    assert got[REQS] == [(ms(0), 100.0), (ms(3), 112.0)]  # present from the start: no zero


def test_a_whole_new_family_is_born_too() -> None:
    got, _ = play([{REQS: 5}, {REQS: 5, FAIL: 2}])
    assert got[FAIL] == [(ms(1) - 1, 0.0), (ms(1), 2.0)]


def test_series_present_at_the_first_collect_get_no_zero() -> None:
    got, _ = play([{REQS: 100, ABORT: 40}, {REQS: 101, ABORT: 41}])
    assert got[ABORT] == [(ms(0), 40.0), (ms(1), 41.0)]


@pytest.mark.parametrize("gap", [OSError("connection refused"), None], ids=["failed", "empty"])
def test_no_zero_after_a_failed_or_empty_collect(gap: Step) -> None:
    """The target came back after being unreachable: what appears now may be long-running."""
    got, _ = play([{REQS: 100}, gap, {REQS: 180, ABORT: 30}, {REQS: 181, ABORT: 30, FAIL: 1}])
    assert got[ABORT] == [(ms(2), 30.0), (ms(3), 30.0)]
    assert got[FAIL] == [(ms(3) - 1, 0.0), (ms(3), 1.0)]  # the collect before was complete again


def test_no_zero_after_a_collect_the_source_flagged_partial() -> None:
    got, _ = play([{REQS: 100}, {REQS: 101}, {REQS: 102, ABORT: 9}], partial_at=[1])
    assert got[ABORT] == [(ms(2), 9.0)]


def test_a_series_that_disappears_and_comes_back_gets_no_zero() -> None:
    # Gone long enough for the summarizer to forget it: only the runner remembers.
    got, _ = play([{REQS: 100, ABORT: 7}, {REQS: 101}, {REQS: 102}, {REQS: 103}, {REQS: 104, ABORT: 7}],
                  interval=60.0)
    assert got[ABORT] == [(ms(0, 60.0), 7.0), (ms(4, 60.0), 7.0)]


def test_a_restarted_target_resets_its_series_and_only_new_ones_are_born() -> None:
    """Back within one interval: old series are lower (a reset, kept by the summarizer), a
    series it never had before is born."""
    got, _ = play([{REQS: 500, ABORT: 20}, {REQS: 520, ABORT: 21}, {REQS: 3, FAIL: 1}, {REQS: 9, ABORT: 1, FAIL: 1}])
    assert got[REQS] == [(ms(0), 500.0), (ms(1), 520.0), (ms(2), 3.0), (ms(3), 9.0)]
    assert got[ABORT] == [(ms(0), 20.0), (ms(1), 21.0), (ms(3), 1.0)]  # not new: Prometheus counts the reset
    assert got[FAIL] == [(ms(2) - 1, 0.0), (ms(2), 1.0), (ms(3), 1.0)]


def test_a_series_born_at_zero_needs_no_extra_point() -> None:
    got, _ = play([{REQS: 1}, {REQS: 1, ABORT: 0}, {REQS: 1, ABORT: 2}])
    assert got[ABORT] == [(ms(1), 0.0), (ms(2), 2.0)]


def test_gauges_are_never_born() -> None:
    z = Summarizer(60)
    z.add([Sample("temp", (), G, 50.0, 1000)], frozenset({("temp", ())}))
    assert [s.timestamps_ms for s in z.flush_all()] == [(1000,)]


@pytest.mark.parametrize("interval", [10.0, 15.0, 60.0])
def test_the_zero_of_a_series_born_on_a_window_boundary_is_never_late(interval: float) -> None:
    """Tick on the boundary, read done after the previous window was flushed: the 0 at
    boundary - 1 ms belongs to a flushed window, and travels with its first point instead."""
    k = round(60 / interval)  # the first tick on the next boundary
    script: list[Step] = [{REQS: float(i)} for i in range(k)]
    script += [{REQS: 9.0, ABORT: 1.0}, {REQS: 9.0, ABORT: 3.0}]
    got, z = play(script, interval=interval)
    born_ms = ms(k, interval)
    assert born_ms % 60_000 == 0
    assert got[ABORT] == [(born_ms - 1, 0.0), (born_ms, 1.0), (ms(k + 1, interval), 3.0)]
    assert z.dropped_samples == 0


def test_the_batch_with_a_zero_before_its_window_signs_and_parses() -> None:
    from nacl.signing import SigningKey

    z = Summarizer(60)
    boundary = round(T0 * 1000) + 60_000
    z.add([Sample(*ABORT, C, 1.0, boundary)], frozenset({ABORT}))
    assert z.flush(boundary) == []  # its window is still open: nothing of it left behind
    out = z.flush(boundary + 60_000)
    ctx = wire.BatchContext(SigningKey.generate(), "s", "n", 1, wire.ZERO_HASH, boundary + 60_000, 1)
    frame = wire.parse_frame(wire.encode_data_batch(ctx, out))
    assert (frame.header.window_start_ms, frame.header.window_end_ms) == (boundary - 1, boundary)
    assert wire.decode_series(wire.decompress_payload(frame, 1 << 20)) == out


def test_a_late_first_point_drops_its_zero_with_it() -> None:
    z = Summarizer(60)
    z.flush(120_000)
    z.add([Sample(*ABORT, C, 1.0, 60_000)], frozenset({ABORT}))
    assert z.dropped_samples == 1 and z.flush_all() == []


def test_a_failing_sink_makes_the_next_collect_not_watched() -> None:
    calls: list[frozenset[tuple[str, Labels]]] = []

    def sink(samples: list[Sample], born: frozenset[tuple[str, Labels]]) -> None:
        calls.append(born)
        if len(calls) == 2:
            raise RuntimeError("summarizer broke")

    source = Scripted([{REQS: 1}, {REQS: 2}, {REQS: 3, ABORT: 1}, {REQS: 4, ABORT: 1, FAIL: 1}])
    runner = Runner([Scheduled(source, 10)], sink)
    for k in range(4):
        runner.run_once(runner.scheduled[0], T0 + 10 * k)
    assert calls == [frozenset(), frozenset(), frozenset(), frozenset({FAIL})]
    assert runner.error_counts()[("vllm", "summarize")] == 1


def test_memory_forgets_series_gone_for_a_generation_and_stays_bounded_under_churn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_mod, "SEEN_GENERATION_S", 100.0)
    births = CounterBirths()

    def page(t: float, *keys: tuple[str, Labels]) -> frozenset[tuple[str, Labels]]:
        return births.observe([Sample(n, lab, C, 1.0, round(t * 1000)) for n, lab in keys], True, t)

    assert page(0, REQS, ABORT) == frozenset()
    assert page(10, REQS) == frozenset()
    assert page(90, REQS, ABORT) == frozenset()  # back within the horizon: not born
    for t in range(100, 320, 10):
        page(t, REQS)
    assert page(320, REQS, ABORT) == frozenset({ABORT})  # gone for two generations: forgotten
    # Label churn (a new series every collect) keeps the memory bounded by the cap.
    churn = CounterBirths()
    for k in range(20_000):
        churn.observe([Sample("c_total", (("id", str(k)),), C, 1.0, k)], True, float(k) / 1000)
    assert len(churn.seen) <= runner_mod.SEEN_MIN_CAP + 1


def test_every_running_source_reports_its_error_stages_from_zero() -> None:
    """waystation_source_errors_total is never born at its first error."""

    class Absent(Scripted):
        name = "gpu"

        def probe(self) -> str | None:
            raise OSError("no device")

    class Smart(Scripted):
        name = "smart"

    # Hour-long intervals: no collect runs during the test, only the start.
    runner = Runner([Scheduled(Scripted([]), 3600), Scheduled(Absent([]), 3600), Scheduled(Smart([]), 3600)],
                    lambda s, b: None)
    assert runner.error_counts() == {}
    runner.start()
    try:
        assert runner.error_counts() == {
            ("vllm", "collect"): 0, ("vllm", "summarize"): 0, ("vllm", "overrun"): 0,
            ("smart", "collect"): 0, ("smart", "summarize"): 0, ("smart", "overrun"): 0,
            ("gpu", "probe"): 1,  # before the first batch: a probe error is there from the start
        }
        runner.count_error("smart", "collect")
        assert runner.error_counts()[("smart", "collect")] == 1
    finally:
        runner.stop()


def test_the_agent_sends_source_errors_from_zero(tmp_path: Path) -> None:
    from nacl.signing import SigningKey

    from agent.config import AgentConfig, NetworkSourceConfig, SourcesConfig, SystemSourceConfig
    from agent.daemon import Agent

    config = AgentConfig(node="n1", state_dir=str(tmp_path),
                         sources=SourcesConfig(system=SystemSourceConfig(enabled=False),
                                               network=NetworkSourceConfig(enabled=False)))
    agent = Agent(config, SigningKey.generate())
    agent.runner = Runner([Scheduled(Scripted([{REQS: 1}] * 3), 3600)], agent.summarizer.add)
    agent.runner.start()
    try:
        errors = {dict(s.labels)["stage"]: s for s in agent.self_metrics(1_700_000_060_000)
                  if s.name == "waystation_source_errors_total"}
        assert sorted(errors) == ["collect", "overrun", "summarize"]
        assert all(s.values == (0.0,) and s.mtype == C and dict(s.labels)["source"] == "vllm"
                   for s in errors.values())
    finally:
        agent.runner.stop()


def test_a_scrape_family_dropped_over_max_series_is_not_born_when_it_fits_later() -> None:
    """A page whose families did not all fit in max_series is incomplete (`partial`): a counter
    family dropped there and kept at a later scrape has long-running values, not new ones."""
    from agent.config import ScrapeSourceConfig
    from agent.sources.base import SourceEnv
    from agent.sources.scrape import Scrape

    pages = iter([
        "# TYPE big_total counter\nbig_total{a=\"1\"} 500\nbig_total{a=\"2\"} 700\n"
        "# TYPE small_total counter\nsmall_total 1\n",
        "# TYPE small_total counter\nsmall_total 2\n# TYPE big_total counter\nbig_total{a=\"1\"} 510\n",
        "# TYPE small_total counter\nsmall_total 3\n# TYPE big_total counter\nbig_total{a=\"1\"} 520\n",
    ])
    source = Scrape(ScrapeSourceConfig(name="app", url="http://127.0.0.1:1/metrics", max_series=2),
                    SourceEnv(http_get=lambda url, timeout: next(pages).encode()))
    z = Summarizer(60.0)
    runner = Runner([Scheduled(source, 10.0)], z.add)
    (item,) = runner.scheduled
    for k in range(3):
        runner.run_once(item, T0 + k * 10.0)
    points = {(s.name, s.labels): list(zip(s.timestamps_ms, s.values, strict=True)) for s in z.flush_all()}
    # Page 1 keeps big_total (two series) and drops small_total; pages 2 and 3 keep both.
    small = [v for (name, _), pts in points.items() if name == "small_total" for _, v in pts]
    assert small == [2.0, 3.0], points
