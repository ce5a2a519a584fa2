"""End to end on loopback: the collector's remote_write forwarding into REAL receivers.

A real agent (system source every second, 1s summary windows, a batch every 2s) feeds a
real collector whose collector.toml names two remote_write targets, a real Prometheus 2.42
("prometheus") and a real VictoriaMetrics 1.79 ("victoria", behind a FaultProxy that passes
everything unless told otherwise, and drops the connection while VictoriaMetrics is stopped,
as the stopped receiver itself would). The ledger (data_dir/ledger.db)
is the truth: every sample of every data batch in it must reach each receiver with its
original timestamp, its labels plus site and node from the batch header, and its value.

- test_receiver_outage_crash_during_catch_up_and_collector_outage (one stack, in turn):
  b. VictoriaMetrics down for RECEIVER_OUTAGE_S while ingest goes on: pending/lag rise in
     /metrics, Prometheus is not held back; VictoriaMetrics comes back and catches up;
  c. the collector (serve AND its forwarder child) SIGKILLed while that catch-up is under
     way (after a few of its requests, with one likely in flight), then restarted: nothing
     is missing at either receiver (VictoriaMetrics, without dedup, keeps resent samples
     twice: duplicates are reported, not failed);
  a. the collector down for OUTAGE_S: the agent spools, then backfills; both receivers end
     up with a sample for every second of the outage at its original timestamp;
  and at the end: ledger == Prometheus == VictoriaMetrics over the whole run, every series.
- test_refused_request_is_counted_and_skipped (d): a FaultProxy in front of VictoriaMetrics
  answers one request with 400: counted in waystation_remote_write_samples_refused_total,
  the position moves on, later batches arrive, and exactly the refused samples are missing.

Run (the slow one takes about RECEIVER_OUTAGE_S + OUTAGE_S + 2 min):
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_remote_write.py
Quick local iteration with shorter outages:
    WAYSTATION_E2E_OUTAGE_S=30 WAYSTATION_E2E_RECEIVER_OUTAGE_S=30 .venv/bin/python -m pytest ...
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import wire
from tests.e2e.receivers import (
    PROMETHEUS,
    VICTORIA_METRICS,
    FaultProxy,
    KillableCollector,
    Labels,
    PrometheusReceiver,
    Samples,
    VictoriaMetricsReceiver,
    decode_request,
    value_key,
)
from tests.integration.harness import Agent, wait_for

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or VICTORIA_METRICS is None,
    reason="needs prometheus and victoria-metrics (apt-get install prometheus victoria-metrics)",
)

OUTAGE_S = float(os.environ.get("WAYSTATION_E2E_OUTAGE_S", "180"))
RECEIVER_OUTAGE_S = float(os.environ.get("WAYSTATION_E2E_RECEIVER_OUTAGE_S", "120"))

SITE, NODE = "lab", "node-1"
PROM, VICT = "prometheus", "victoria"
TARGETS = (PROM, VICT)
# A gauge the system source emits every second (agent/sources/system.py), whose value moves.
PROBE = "node_memory_MemAvailable_bytes"
PROBE_SELECTOR = f'{{__name__="{PROBE}",site="{SITE}",node="{NODE}"}}'
EVERYTHING = '{__name__=~".+"}'  # the receivers hold nothing but what the collector sent
FLUSH_S = 2.0
# Victoria's requests in the long test are kept small and its link slow while it catches up
# after its outage, so that the catch-up takes seconds (not one request) and the SIGKILL
# lands in the middle of it.
CATCH_UP_SAMPLES_PER_REQUEST = 200
CATCH_UP_DELAY_S = 0.2
# The forwarder's reason for a 400 whose body names no sample-level refusal (classify()).
REASON_FOR_PLAIN_400 = "bad_request"

AGENT_TOML = f"""
[summary]
window = "1s"
flush_interval = "{FLUSH_S:g}s"
[sources.system]
interval = "1s"
[sources.gpu]
enabled = false
[sources.smart]
enabled = false
[sources.network]
enabled = false
"""


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the ledger, the truth ----------------------------------------------------------------------

def norm(labels: dict[str, str]) -> Labels:
    """Labels as the receivers hold them: an empty value is the same as no label."""
    return frozenset((k, v) for k, v in labels.items() if v != "")


def ledger_samples(collector: KillableCollector) -> Samples:
    """Every sample of every data batch in the ledger, labelled as the forwarder must send it:
    the series' own labels, __name__, and site and node from the (verified) batch header."""
    out: Samples = {}
    for (raw,) in collector.ledger_rows("SELECT frame FROM batches WHERE kind = ?", (int(wire.Kind.DATA),)):
        h = wire.parse_frame(bytes(raw)).header
        for s in collector.ledger_series(bytes(raw)):  # wire v1 or v2
            labels = {k: v for k, v in s.labels if k not in ("site", "node")}
            labels.update(__name__=s.name, site=h.site, node=h.node)
            out.setdefault(norm(labels), []).extend(zip(s.timestamps_ms, s.values, strict=True))
    for pts in out.values():
        pts.sort(key=lambda p: p[0])
    return out


def window(samples: Samples, start_ms: int, end_ms: int, name: str | None = None) -> Samples:
    out: Samples = {}
    for labels, pts in samples.items():
        if name is not None and ("__name__", name) not in labels:
            continue
        kept = [p for p in pts if start_ms <= p[0] <= end_ms]
        if kept:
            out[labels] = kept
    return out


def renorm(samples: Samples) -> Samples:
    out: Samples = {}
    for labels, pts in samples.items():
        out.setdefault(norm(dict(labels)), []).extend(pts)
    return out


def metric_name(labels: Labels) -> str:
    return dict(labels).get("__name__", "?")


@dataclass
class Diff:
    """Ledger vs one receiver, matched on (labels, timestamp), then value."""

    receiver: str
    missing: list[tuple[Labels, int, float]] = field(default_factory=list)  # in the ledger, not there
    extra: list[tuple[Labels, int, float]] = field(default_factory=list)  # there, not in the ledger
    duplicates: int = 0  # stored copies beyond the first (VictoriaMetrics keeps resent samples)
    nan_skipped: int = 0  # ledger NaNs VictoriaMetrics drops by design
    matched: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra

    def missing_set(self) -> set[tuple[Labels, int, float | str]]:
        return {(lb, ts, value_key(v)) for lb, ts, v in self.missing}

    def describe(self) -> str:
        def show(items: list[tuple[Labels, int, float]]) -> str:
            by_name = Counter(metric_name(lb) for lb, _, _ in items)
            examples = "; ".join(f"{dict(lb)} @{ts} = {v!r}" for lb, ts, v in sorted(items, key=lambda i: i[1])[:5])
            span = f"ts {min(i[1] for i in items)}..{max(i[1] for i in items)}" if items else ""
            return f"{len(items)} {span} by metric {dict(by_name.most_common(8))}; e.g. {examples}"

        return (f"{self.receiver}: matched {self.matched}, missing {show(self.missing)}, extra {show(self.extra)}, "
                f"duplicates {self.duplicates}, NaN not expected {self.nan_skipped}")


def diff(ledger: Samples, got: Samples, receiver: str) -> Diff:
    """Which ledger samples the receiver lacks or holds differently. VictoriaMetrics drops NaN
    and keeps ~15 significant digits of a block's largest value, so its values are compared
    with a relative tolerance of 1e-12 and ledger NaNs are not expected there."""
    tolerant = receiver == VICT
    want: dict[tuple[Labels, int], list[float]] = {}
    for labels, pts in ledger.items():
        for ts, v in pts:
            want.setdefault((labels, ts), []).append(v)
    have: dict[tuple[Labels, int], list[float]] = {}
    for labels, pts in renorm(got).items():
        for ts, v in pts:
            have.setdefault((labels, ts), []).append(v)

    def same(a: float, b: float) -> bool:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or (tolerant and math.isclose(a, b, rel_tol=1e-12))

    d = Diff(receiver)
    for key, values in want.items():
        labels, ts = key
        stored = have.get(key, [])
        for v in values:
            if tolerant and math.isnan(v):
                d.nan_skipped += 1
            elif any(same(v, s) for s in stored):
                d.matched += 1
            else:
                d.missing.append((labels, ts, v))
    for key, stored in have.items():
        labels, ts = key
        values = want.get(key, [])
        distinct: list[float] = []
        for s in stored:
            if any(same(s, x) for x in distinct):
                d.duplicates += 1
            else:
                distinct.append(s)
        for s in distinct:
            if not any(same(s, v) for v in values):
                d.extra.append((labels, ts, s))
    return d


def points(samples: Samples) -> set[tuple[Labels, int, float | str]]:
    return {(lb, ts, value_key(v)) for lb, pts in renorm(samples).items() for ts, v in pts}


# -- the collector's /metrics -------------------------------------------------------------------

@dataclass(frozen=True)
class TargetView:
    samples: float
    refused: dict[str, float]
    pending: float
    lag: float
    last_success: float | None


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def target_view(rows: list[tuple[str, dict[str, str], float]], target: str) -> TargetView:
    def one(name: str) -> float | None:
        vals = [v for n, lb, v in rows if n == name and lb.get("target") == target]
        return sum(vals) if vals else None

    refused = {lb.get("reason", ""): v for n, lb, v in rows
               if n == "waystation_remote_write_samples_refused_total" and lb.get("target") == target}
    samples = one("waystation_remote_write_samples_total")
    pending = one("waystation_remote_write_pending_batches")
    lag = one("waystation_remote_write_lag_seconds")
    assert samples is not None and pending is not None and lag is not None, \
        f"/metrics lacks waystation_remote_write_* for target {target!r}"
    return TargetView(samples, refused, pending, lag, one("waystation_remote_write_last_success_timestamp_seconds"))


# -- the stack ----------------------------------------------------------------------------------

def collector_toml(targets: list[dict[str, Any]]) -> str:
    lines = ['[ledger]', 'retention = "30d"']
    for t in targets:
        lines.append("[[remote_write]]")
        for k, v in t.items():
            lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
    return "\n".join(lines) + "\n"


@dataclass
class Stack:
    tmp: Path
    prom: PrometheusReceiver
    vm: VictoriaMetricsReceiver
    collector: KillableCollector
    agent: Agent
    proxy: FaultProxy
    started_ms: int

    def logs(self) -> str:
        parts = [f"--- collector log:\n{self.collector.log_tail(3000)}"]
        try:
            parts.append(f"--- agent log:\n{self.agent.log.read_text(errors='replace')[-2000:]}")
        except OSError:
            pass
        parts.append(f"--- prometheus log:\n{self.prom.log_tail(1500)}")
        parts.append(f"--- victoria-metrics log:\n{self.vm.log_tail(1500)}")
        return "\n".join(parts)

    def wait(self, cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
        try:
            return wait_for(cond, timeout, what, interval)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def check_agent(self) -> None:
        assert self.agent.proc is not None and self.agent.proc.poll() is None, \
            f"agent exited: {self.agent.log.read_text(errors='replace')[-3000:]}"

    def check_alive(self, receivers: tuple[str, ...] = TARGETS, collector: bool = True) -> None:
        self.check_agent()
        if collector:
            self.collector.check_alive()
        if PROM in receivers:
            self.prom.check_alive()
        if VICT in receivers:
            self.vm.check_alive()

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        return parse_metrics(self.collector.metrics())

    def view(self, target: str) -> TargetView:
        return target_view(self.metrics(), target)

    def ledger(self) -> Samples:
        return ledger_samples(self.collector)

    def receiver(self, target: str) -> PrometheusReceiver | VictoriaMetricsReceiver:
        return self.prom if target == PROM else self.vm

    def compare(self, selector: str, start_ms: int, end_ms: int, name: str | None = None,
                targets: tuple[str, ...] = TARGETS) -> tuple[Samples, dict[str, Diff]]:
        ledger = window(self.ledger(), start_ms, end_ms, name)
        return ledger, {t: diff(ledger, self.receiver(t).samples(selector, start_ms, end_ms), t) for t in targets}

    def wait_equal(self, selector: str, start_ms: int, end_ms: int, name: str | None = None,
                   timeout: float = 120.0, what: str = "") -> tuple[Samples, dict[str, Diff]]:
        """Poll (bounded) until both receivers hold exactly the ledger's samples in the range."""
        last: list[tuple[Samples, dict[str, Diff]]] = []

        def equal() -> bool:
            last[:] = [self.compare(selector, start_ms, end_ms, name)]
            return all(d.ok for d in last[0][1].values())

        try:
            wait_for(equal, timeout, what or f"receivers == ledger for {selector} in [{start_ms}, {end_ms}]",
                     interval=2.0)
        except AssertionError as exc:
            diffs = "\n".join(d.describe() for d in last[0][1].values()) if last else "(no comparison made)"
            raise AssertionError(f"{exc}\n{diffs}\n{self.logs()}") from None
        return last[0]

    def wait_caught_up(self, timeout: float = 120.0) -> None:
        """Both targets show pending 0 and lag 0 in /metrics (read some seconds after the caller
        saw the data arrive, so the figures are recomputed ones, not a saved row from before)."""
        def caught_up() -> bool:
            views = [self.view(t) for t in TARGETS]
            return all(v.pending == 0 and v.lag == 0 for v in views)

        self.wait(caught_up, timeout, "pending_batches == 0 and lag_seconds == 0 for both targets", interval=0.25)

    def wait_flowing(self) -> None:
        def flowing() -> bool:
            self.check_alive()
            t = now_ms()
            have = [self.receiver(x).samples(PROBE_SELECTOR, self.started_ms, t) for x in TARGETS]
            return all(sum(len(p) for p in h.values()) >= 3 for h in have)

        self.wait(flowing, 90, f"{PROBE} arriving at both receivers", interval=1.0)

    def every_second(self, ledger: Samples, start_ms: int, end_ms: int) -> str | None:
        """None if the probe has ~one sample per second over [start, end] with no hole, else why not."""
        probe = window(ledger, start_ms, end_ms, PROBE)
        if len(probe) != 1:
            return f"expected one {PROBE} series, got {list(probe)}"
        (pts,) = probe.values()
        seconds = (end_ms - start_ms) / 1000
        ts = [t for t, _ in pts]
        gap = max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0)
        if not 0.9 * seconds - 3 <= len(pts) <= seconds + 3:
            return f"{len(pts)} {PROBE} samples over {seconds:.0f}s (expected about one a second)"
        if ts[0] - start_ms > 3000 or end_ms - ts[-1] > 3000 or gap > 3000:
            return (f"holes in {PROBE}: first {ts[0] - start_ms}ms in, last {end_ms - ts[-1]}ms before the end, "
                    f"largest gap {gap}ms")
        return None

    def wait_ledger_every_second(self, start_ms: int, end_ms: int, what: str, timeout: float = 180.0) -> None:
        """The ledger holds the probe for every second of [start, end] (the agent has sent it all)."""
        why: list[str | None] = [None]

        def complete() -> bool:
            why[0] = self.every_second(self.ledger(), start_ms, end_ms)
            return why[0] is None

        try:
            wait_for(complete, timeout, f"the ledger complete for {what}", interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {why[0]}\n{self.logs()}") from None


@contextmanager
def make_stack(tmp_path: Path, victoria_samples_per_request: int | None = None) -> Iterator[Stack]:
    """Prometheus and VictoriaMetrics (behind a FaultProxy in "pass" mode, which drops the
    connection while VictoriaMetrics is stopped, as a stopped receiver would), a collector
    forwarding to both, an agent feeding it. Everything is stopped at the end, whatever happens."""
    with ExitStack() as stack:
        prom = PrometheusReceiver(tmp_path)
        stack.callback(prom.stop)
        prom.start()
        vm = VictoriaMetricsReceiver(tmp_path)
        stack.callback(vm.stop)
        vm.start()
        proxy = FaultProxy(vm.write_url)
        stack.callback(proxy.close)
        victoria: dict[str, Any] = {"name": VICT, "url": proxy.url}
        if victoria_samples_per_request:
            victoria["samples_per_request"] = victoria_samples_per_request
        config = tmp_path / "collector.toml"
        config.write_text(collector_toml([{"name": PROM, "url": prom.write_url}, victoria]))
        collector = KillableCollector(tmp_path / "collector", config=config)
        agent = Agent(tmp_path / "agent", collector.url, extra_toml=AGENT_TOML, site=SITE, node=NODE)
        collector.enroll(agent.site, agent.node, agent.keygen())
        started_ms = now_ms()
        stack.callback(collector.stop)
        collector.start()
        stack.callback(agent.stop)
        agent.start()
        yield Stack(tmp_path, prom, vm, collector, agent, proxy, started_ms)


def sleep_checking(st: Stack, seconds: float, check: Callable[[], None],
                   observe: Callable[[], None] | None = None, every: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check()
        if observe is not None:
            observe()
        time.sleep(min(every, max(left, 0)))


# -- the scenarios ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(int(RECEIVER_OUTAGE_S + OUTAGE_S + 600))
def test_receiver_outage_crash_during_catch_up_and_collector_outage(tmp_path: Path) -> None:
    with make_stack(tmp_path, victoria_samples_per_request=CATCH_UP_SAMPLES_PER_REQUEST) as st:
        proxy = st.proxy
        st.wait_flowing()
        st.wait_caught_up()

        # b. VictoriaMetrics down while ingest goes on --------------------------------------
        vm_down = now_ms()
        st.vm.stop()
        seen: list[tuple[float, TargetView, TargetView]] = []

        def observe() -> None:
            rows = st.metrics()
            seen.append((time.time(), target_view(rows, VICT), target_view(rows, PROM)))

        sleep_checking(st, RECEIVER_OUTAGE_S, lambda: st.check_alive((PROM,)), observe)
        observe()
        vm_up = now_ms()
        outage_s = (vm_up - vm_down) / 1000

        late = [s for s in seen if s[0] * 1000 - vm_down >= 6000]  # stats are recomputed every ~2s
        assert len(late) >= 2, f"too few /metrics observations during the outage: {seen}"
        vic = [v for _, v, _ in late]
        summary = [(round(t - vm_down / 1000), v.pending, round(v.lag), p.pending) for t, v, p in seen]
        assert all(b.pending >= a.pending for a, b in zip(vic, vic[1:], strict=False)), \
            f"victoria pending_batches must only grow while it is down: (s, pending, lag, prom pending) {summary}"
        assert vic[-1].pending > vic[0].pending and vic[-1].pending >= 0.5 * outage_s / FLUSH_S - 2, summary
        assert vic[-1].lag > vic[0].lag and vic[-1].lag >= 0.8 * outage_s - 10, summary
        assert vic[-1].last_success is None or vic[-1].last_success <= vm_down / 1000 + 2, \
            f"victoria last success {vic[-1].last_success} after it went down at {vm_down / 1000}"
        # Prometheus was not held back by the dead target.
        assert all(p.pending <= 3 for _, _, p in late), f"prometheus fell behind: {summary}"
        prom_last = late[-1][2].last_success
        assert prom_last is not None and prom_last >= time.time() - 15, f"prometheus last success {prom_last}"
        prom_during: list[Diff] = []

        def prom_complete() -> bool:
            prom_during[:] = [st.compare(PROBE_SELECTOR, vm_down, vm_up - 3000, PROBE, targets=(PROM,))[1][PROM]]
            return prom_during[0].ok

        st.wait(prom_complete, 20, "prometheus holding what arrived during victoria's outage", interval=1.0)

        # c. SIGKILL of the collector (serve and its forwarder) during the catch-up -----------
        # The link to victoria is made slow for the catch-up (as a remote receiver's would be),
        # so that the kill lands after a few of its requests and before the last: one of them
        # is then likely on its way, forwarded after the sender is gone (outcome unknown to it).
        proxy.delay_s = CATCH_UP_DELAY_S
        vm_restarted = time.time()
        st.vm.start()
        st.wait(lambda: proxy.accepted_since(vm_restarted) >= 3, 90,
                "victoria taking requests again after its restart", interval=0.01)
        killed = st.collector.kill()
        killed_ms = now_ms()
        rows_at_kill = proxy.accepted_since(vm_restarted)
        proxy.delay_s = 0.0
        # Nothing forwards now; what victoria lacks of its outage proves the kill hit the catch-up.
        ledger_at_kill, at_kill = st.compare(PROBE_SELECTOR, vm_down, vm_up, PROBE, targets=(VICT,))
        assert at_kill[VICT].missing, (
            f"the catch-up had finished before the SIGKILL ({rows_at_kill} requests taken since victoria's "
            f"restart): raise CATCH_UP_DELAY_S. {at_kill[VICT].describe()}")
        print(f"SIGKILL at {killed_ms} (children {killed}) after victoria took {rows_at_kill} requests; "
              f"{len(at_kill[VICT].missing)} of {sum(map(len, ledger_at_kill.values()))} {PROBE} samples "
              f"of its outage still missing")
        st.collector.start()
        caught = now_ms()
        st.wait_ledger_every_second(vm_down, vm_up, "victoria's outage")
        _, diffs = st.wait_equal(PROBE_SELECTOR, st.started_ms, caught, PROBE, timeout=180,
                                 what="both receivers complete after the receiver outage and the SIGKILL")
        time.sleep(3)
        st.wait_caught_up()
        print("after b+c:", "; ".join(d.describe() for d in diffs.values()))

        # a. the collector down ---------------------------------------------------------------
        st.collector.stop()
        c_down = now_ms()
        sleep_checking(st, OUTAGE_S, lambda: st.check_alive(collector=False))
        c_up = now_ms()
        st.collector.start()
        st.wait_ledger_every_second(c_down, c_up, "the collector's outage (the agent's backfill)")
        _, diffs = st.wait_equal(PROBE_SELECTOR, c_down, c_up, PROBE, timeout=180,
                                 what="both receivers complete for the collector outage")
        for target, d in diffs.items():
            assert d.matched >= 0.9 * OUTAGE_S - 3, d.describe()
            print(f"collector outage, {target}: {d.describe()}")
        time.sleep(3)
        st.wait_caught_up()

        # Everything, every series, over the whole run ---------------------------------------
        st.agent.stop()
        end = now_ms() + 60_000
        _, diffs = st.wait_equal(EVERYTHING, st.started_ms - 3_600_000, end, timeout=180,
                                 what="ledger == prometheus == victoria over the whole run")
        for d in diffs.values():
            print("whole run:", d.describe())
        assert diffs[PROM].duplicates == 0
        time.sleep(3)
        st.wait_caught_up()
        for target in TARGETS:
            v = st.view(target)
            assert sum(v.refused.values()) == 0, f"{target} refused samples: {v.refused}"
            assert v.samples >= diffs[target].matched, (target, v, diffs[target].describe())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_refused_request_is_counted_and_skipped(tmp_path: Path) -> None:
    with make_stack(tmp_path) as st:
        proxy = st.proxy
        st.wait_flowing()
        st.wait_caught_up()  # steady state: the next request carries one new batch

        proxy.mode = "refuse_next_400"
        st.wait(lambda: proxy.refused, 30, "the proxy refusing a request", interval=0.05)
        (refusal,) = proxy.refused
        assert refusal.status == 400 and refusal.request_body is not None
        refused = decode_request(refusal.request_body)
        refused_points = points(refused)
        refused_ts = [ts for pts in refused.values() for ts, _ in pts]
        assert refused_points, "the refused request carried no samples"
        assert all(("site", SITE) in lb and ("node", NODE) in lb for lb in refused), list(refused)[:3]

        # The position moves on: later batches arrive.
        st.wait(lambda: sum(1 for r in proxy.requests if r.at > refusal.at and r.status == 204) >= 3, 60,
                "three requests accepted after the refused one")
        newest = max(refused_ts)
        st.wait(lambda: any(ts > newest + 2 * FLUSH_S * 1000 for pts in
                            st.vm.samples(PROBE_SELECTOR, newest, now_ms() + 60_000).values() for ts, _ in pts),
                60, f"{PROBE} newer than the refused request arriving at victoria")

        st.agent.stop()
        end = now_ms() + 60_000
        final: list[tuple[Samples, dict[str, Diff]]] = []

        def settled() -> bool:
            final[:] = [st.compare(EVERYTHING, st.started_ms - 3_600_000, end)]
            d = final[0][1]
            return d[PROM].ok and not d[VICT].extra and d[VICT].missing_set() == refused_points

        try:
            wait_for(settled, 60, "victoria lacking exactly the refused samples, prometheus complete", interval=2.0)
        except AssertionError:
            if not final:
                raise
            # else: the assertions below say what differs
        ledger, diffs = final[0]
        assert diffs[PROM].ok, diffs[PROM].describe()
        vic = diffs[VICT]
        assert not vic.extra and vic.duplicates == 0, vic.describe()
        assert refused_points <= points(ledger), "the refused request carried samples the ledger does not hold"
        assert vic.missing_set() == refused_points, (
            "victoria must lack exactly the refused request's samples "
            f"({len(refused_points)} refused, ts {min(refused_ts)}..{newest}; if it lacks none, the forwarder "
            f"resent them in a smaller request after the 400): {vic.describe()}\n{st.logs()}")

        time.sleep(3)
        st.wait_caught_up()
        v = st.view(VICT)
        n_refused = sum(len(p) for p in refused.values())
        assert v.refused == {REASON_FOR_PLAIN_400: n_refused}, (v.refused, n_refused)
        assert v.pending == 0 and v.lag == 0, v
        assert sum(st.view(PROM).refused.values()) == 0
        assert [r.status for r in proxy.refused] == [400], "the proxy refused anything else"
