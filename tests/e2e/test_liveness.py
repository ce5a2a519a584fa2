"""What NOC staff see is true: the dashboards and alerts over a live, all-real stack.

One stack for the module, everything real on loopback:
- a collector with one [[remote_write]] target, VictoriaMetrics (dedup 1ms), which also
  scrapes the collector's own families itself (README "Which to use"): the dashboards' data
  source, with no rules evaluated there (README "The setup they expect");
- Prometheus scraping the collector's full /metrics every second (honor_labels) with a fast
  copy of rules/ (test_alerting.fast_rules: no `for:`, 1s evaluation): what alerts fire on;
- two real agents (tests/fakes/recorded_agent.py), 2s windows, every source on, each source
  every second (SMART every few seconds):
  * "healthy": recorded GPUs without XIDs, recorded healthy disks (smart_fleet.HEALTHY), a
    vLLM page whose counters move (tests/fakes/vllm_page.py) and that never aborts;
  * "failing": the same GPUs with a first-ever critical XID (79) raised on GPU 0 after
    XID_AFTER_S, recorded failing and worn disks (smart_fleet.FAILING), a vLLM page that
    aborts ABORT_RATIO of its requests.

The contracts:
1. every dashboard panel target, its variables substituted as Grafana substitutes them,
   returns data from the dashboards' data source, or is in EMPTY_TARGETS with its reason;
   a renamed metric or a broken aggregation is caught (the negative check);
2. every recording rule produces series in Prometheus, or is in EMPTY_RECORDINGS; the vLLM
   abort ratio is 0 on the node that never aborts, and the page's share on the other;
3. on "failing" exactly the alerts its recordings imply fire (DISK_ALERTS and
   OTHER_FAILING_ALERTS: data), on "healthy" none ever fires (HEALTHY_EXCEPTIONS);
4. CPU busy stays within [0, 100] % and per-CPU time adds up to 1 s/s, over the history
   (VictoriaMetrics) and over the scrape of /metrics (Prometheus): at every flush interval
   of the last minute and at "now", the newest point a dashboard shows.

The stack is warm after about a minute (a minute of history); the module takes about 80 s.

    .venv/bin/python -m pytest -q -x tests/e2e/test_liveness.py -p no:cacheprovider
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.sources.smart import device_label
from tests.conftest import REPO, free_port
from tests.e2e.liveness import (
    SMARTCTL_REPLAY,
    GrafanaVars,
    Outcome,
    PanelTarget,
    RecordedAgent,
    ScrapingPrometheus,
    ScrapingVictoriaMetrics,
    dashboard_targets,
    dashboard_variables,
    evaluate,
    finite,
    instant,
    label_values,
    query_range,
    settle,
    unfiltered,
    variable_queries,
)
from tests.e2e.receivers import PROMETHEUS, VICTORIA_METRICS, KillableCollector
from tests.e2e.test_alerting import fast_rules
from tests.fakes import smart_fleet
from tests.fakes.vllm_page import VllmPage
from tests.integration.harness import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or VICTORIA_METRICS is None,
        reason="needs prometheus and victoria-metrics (apt-get install prometheus victoria-metrics; "
               "scripts/test.sh does)"),
]

SITE = "lab"
HEALTHY, FAILING = "healthy", "failing"
NODES = (HEALTHY, FAILING)
FLUSH_S = 2.0  # [summary] window = flush interval: what the data source's scrape interval is set to
SMART_INTERVAL_S = 4
XID_GPU, XID_CODE, XID_AFTER_S = 0, 79, 8.0
ABORT_RATIO = 0.1  # of the failing node's vLLM requests
RANGE_S = 300.0  # the dashboards' time range in these checks ("last 5 minutes")
# Grafana's variables for this data source (scrape interval = the agents' flush interval).
GV_ALL = GrafanaVars(site=".*", node=".*", range_s=RANGE_S, scrape_interval_s=FLUSH_S)
# The rate window the dashboards use at this flush interval ($__rate_interval), >= 2 x flush.
W_S = GV_ALL.rate_interval_s
NODE_DOWN_AFTER_S = 60  # NodeDown/SiteDown in the fast rules: far above the 2s flush, below the run

AGENT_TOML = """
[summary]
window = "{flush:g}s"
[sources.system]
interval = "1s"
[sources.gpu]
interval = "1s"
[sources.network]
interval = "1s"
probe_count = 1
probe_timeout = "1s"
[sources.smart]
interval = "{smart}s"
smartctl = "{smartctl}"
output = "json"
{devices}
[[sources.scrape]]
preset = "vllm"
url = "{vllm}"
interval = "1s"
"""

# -- what the recordings imply (data) -----------------------------------------------------------

# Recorded disk (../shared/fixtures/smartctl/json) -> the alerts it must raise, on its device.
# Every fixture smart_fleet puts on a node must be listed here.
DISK_ALERTS: dict[str, frozenset[str]] = {
    # FAILED, critical warning 0x10 (volatile memory backup failed)
    "nvme_failed_critical-warning_samsung-mzwll3t2hajq.json": frozenset({"SmartStatusFailed",
                                                                          "NvmeCriticalWarning"}),
    # 75 % of its rated endurance used
    "nvme_datacenter_worn-75pct_intel-ssdpe2kx020t7.json": frozenset({"DiskWearHigh"}),
    # PASSED, but 304 / 387 reallocated sectors
    "hdd_sata_reallocated-304_passed_seagate-st3500418as.json": frozenset({"DiskReallocatedSectors"}),
    "hdd_megaraid-sat_reallocated-387_wdc-wd4000fyyx.json": frozenset({"DiskReallocatedSectors"}),
    # FAILED: Reallocated_Sector_Ct 1975 FAILING_NOW, 8 pending
    "hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json": frozenset({"SmartStatusFailed",
                                                                              "DiskReallocatedSectors"}),
    # healthy
    "nvme_datacenter_healthy_samsung-pm9a3.json": frozenset(),
    "nvme_client_healthy_full-a-j_corsair-mp510.json": frozenset(),
    "sata-ssd_datacenter_healthy_samsung-mz7lh1t9hmlt.json": frozenset(),
    "sata-ssd_client_healthy_full-x-j_samsung-860evo.json": frozenset(),
    "hdd_sata_healthy_seagate-exos-x16.json": frozenset(),
    "hdd_sata_healthy_full-a-j_wdc-wd140edfz.json": frozenset(),
    "sas-hdd_healthy_hitachi-h109060sesun600g.json": frozenset(),
}
# Alerts beyond the disks', on node "failing": (alertname, labels the alert must carry).
OTHER_FAILING_ALERTS: tuple[tuple[str, dict[str, str]], ...] = (
    # a first-ever critical XID: the counter is born at its first event
    ("GpuXidCritical", {"gpu": str(XID_GPU), "xid": str(XID_CODE)}),
    # the vLLM page aborts ABORT_RATIO (10 %) of its requests; the SLO is 5 %
    ("ModelServerErrorRatioHigh", {"server": "vllm"}),
)
# Alerts allowed on node "healthy", with the reason. None: nothing may fire there.
HEALTHY_EXCEPTIONS: dict[str, str] = {}

# Panel targets empty in this stack, and why. Scope "healthy": empty only on the node
# dashboard for node "healthy" (node "failing" must show data); "all": empty everywhere here.
# Keys: (dashboard file stem, panel title, refId).
EMPTY_TARGETS: dict[tuple[str, str, str], tuple[str, str]] = {
    ("node", "GPU XID and ECC errors", "A"): (HEALTHY, "no XID ever on this node: the counter is born at its "
                                                       "first event"),
    ("pipeline", "Remote write refused samples/s", "A"): ("all", "nothing refused: the counter is born at a "
                                                                 "first refusal"),
    ("pipeline", "Remote write retries/s by reason", "A"): ("all", "nothing retried: the counter is born at a "
                                                                   "first retry"),
    ("fleet", "Model-server p99 latency (worst 10)", "B"): ("all", "no TGI server recorded"),
    ("fleet", "Model-server p99 latency (worst 10)", "C"): ("all", "no Triton server recorded"),
    ("fleet", "Model-server queue depth (worst 10)", "B"): ("all", "no TGI server recorded"),
    ("fleet", "Model-server queue depth (worst 10)", "C"): ("all", "no Triton server recorded"),
    ("node", "TGI and Triton latency", "A"): ("all", "no TGI server recorded"),
    ("node", "TGI and Triton latency", "B"): ("all", "no TGI server recorded"),
    ("node", "TGI and Triton latency", "C"): ("all", "no Triton server recorded"),
    ("node", "Queue depth and running", "C"): ("all", "no TGI server recorded"),
    ("node", "Queue depth and running", "D"): ("all", "no Triton server recorded"),
}
# Recording rules that produce no series in this stack, and why.
EMPTY_RECORDINGS: dict[str, str] = {
    "site_node:tgi_request_duration_seconds:p99_rate5m": "no TGI server recorded",
    "site_node:tgi_request_failure:ratio_rate10m": "no TGI server recorded",
    "site_node_model:triton_request_duration_seconds:p99": "no Triton server recorded",
    "site_node_model:triton_request_failure:ratio_rate10m": "no Triton server recorded",
}


# -- the stack ----------------------------------------------------------------------------------

@dataclass
class Stack:
    tmp: Path
    vm: ScrapingVictoriaMetrics
    prom: ScrapingPrometheus
    collector: KillableCollector
    agents: dict[str, RecordedAgent]
    pages: dict[str, VllmPage]
    disks: dict[str, dict[str, tuple[str, str]]]  # node -> device path -> (fixture, -d type)
    rule_files: list[Path]
    started: float
    ready: float = 0.0

    def check_alive(self) -> None:
        for agent in self.agents.values():
            agent.check_alive()
        self.collector.check_alive()
        self.vm.check_alive()
        self.prom.check_alive()

    def logs(self) -> str:
        parts = [f"--- collector:\n{self.collector.log_tail(2000)}"]
        for node, agent in self.agents.items():
            parts.append(f"--- agent {node}:\n{agent.log.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)


def relax_silence_thresholds(path: Path, seconds: int) -> None:
    """fast_rules cuts NodeDown/SiteDown to 5 s; here agents flush every 2 s on 2 busy cores, so
    the healthy node must not flap: put the threshold back to `seconds` (still far below 600)."""
    doc = yaml.safe_load(path.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in ("NodeDown", "SiteDown"):
                rule["expr"], n = re.subn(r">\s*\d+\s*$", f"> {seconds}", rule["expr"].strip())
                assert n == 1, rule["expr"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def agent_toml(vllm_url: str, devices: list[tuple[str, str]]) -> str:
    dev = "".join(f'[[sources.smart.devices]]\nname = "{name}"\ntype = "{kind}"\n' for name, kind in devices)
    return AGENT_TOML.format(flush=FLUSH_S, smart=SMART_INTERVAL_S, smartctl=SMARTCTL_REPLAY, devices=dev,
                             vllm=vllm_url)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("liveness")
    with ExitStack() as es:
        rules_dir = tmp / "rules"
        rules_dir.mkdir()
        rule_files = []
        for src in sorted((REPO / "rules").glob("*.rules.yml")):
            fast_rules(src, rules_dir / src.name)
            relax_silence_thresholds(rules_dir / src.name, NODE_DOWN_AFTER_S)
            rule_files.append(rules_dir / src.name)

        collector_port = free_port()
        vm = ScrapingVictoriaMetrics(tmp, collector_port)
        vm.start()
        es.callback(vm.stop)
        config = tmp / "collector.toml"
        config.write_text(f'[[remote_write]]\nname = "victoria"\nurl = "{vm.write_url}"\n')
        collector = KillableCollector(tmp / "collector", port=collector_port, config=config)

        pages = {HEALTHY: VllmPage(abort_ratio=0.0), FAILING: VllmPage(abort_ratio=ABORT_RATIO)}
        for page in pages.values():
            es.callback(page.close)
        fleets = {HEALTHY: smart_fleet.HEALTHY, FAILING: smart_fleet.FAILING}
        agents: dict[str, RecordedAgent] = {}
        disks: dict[str, dict[str, tuple[str, str]]] = {}
        for node in NODES:
            replay = tmp / f"smart-{node}"
            pairs = smart_fleet.replay_folder(replay, fleets[node])
            kinds = dict(pairs)
            disks[node] = {dev: (fixture, kinds.get(dev, "")) for dev, fixture in fleets[node].items()}
            agents[node] = RecordedAgent(
                tmp / f"agent-{node}", collector.url, agent_toml(pages[node].url, pairs), site=SITE, node=node,
                xids=[(XID_GPU, XID_CODE, XID_AFTER_S)] if node == FAILING else [], smart_replay=replay)
            collector.enroll(SITE, node, agents[node].keygen())

        started = time.time()
        es.callback(collector.stop)
        collector.start()
        for agent in agents.values():
            es.callback(agent.stop)
            agent.start()
        prom = ScrapingPrometheus(tmp, collector_port, rule_files)
        prom.start()
        es.callback(prom.stop)
        st = Stack(tmp, vm, prom, collector, agents, pages, disks, rule_files, started)
        warm_up(st)
        yield st
        st.check_alive()  # nothing died while the tests ran


def history_windows(st: Stack, node: str) -> int:
    """Summary windows of one CPU counter VictoriaMetrics holds for the node (last 5 min)."""
    st.check_alive()
    st.vm.flush()
    r = instant(st.vm.base_url, f'count_over_time(node_cpu_seconds_total{{node="{node}",cpu="0",mode="idle"}}[5m])')
    return int(float(r[0]["value"][1])) if r else 0


def warm_up(st: Stack) -> None:
    """Bounded waits until every path carries data: history windows of both nodes in
    VictoriaMetrics (enough for the dashboards' rate windows and several evaluations), the
    collector's own families scraped into it, and Prometheus scraping both nodes."""
    windows = int(60 / FLUSH_S)  # a minute of history
    try:
        for node in NODES:
            wait_for(lambda n=node: history_windows(st, n) >= windows, 180,
                     f"{windows} history windows of node {node} in VictoriaMetrics", interval=2)
        wait_for(lambda: instant(st.vm.base_url, "waystation_node_last_seen_timestamp_seconds"), 30,
                 "VictoriaMetrics scraping the collector's own families")
        for node in NODES:
            wait_for(lambda n=node: instant(st.prom.base_url,
                                            f'node_cpu_seconds_total{{node="{n}"}}'), 30,
                     f"Prometheus scraping node {node}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{st.logs()}") from None
    st.ready = time.time()
    print(f"\nliveness stack warm after {st.ready - st.started:.0f}s")


# -- 1. dashboards ------------------------------------------------------------------------------

def evaluations(targets: list[PanelTarget]) -> Iterator[tuple[PanelTarget, GrafanaVars, str]]:
    """Each target with the variables Grafana would use: the fleet-wide dashboards with their
    site variable at All; the node dashboard once per node. Yields (target, vars, scope)."""
    variables = dashboard_variables()
    for t in targets:
        if "node" in variables[t.dashboard]:
            for node in NODES:
                yield t, GrafanaVars(SITE, node, RANGE_S, FLUSH_S), node
        else:
            yield t, GV_ALL, "all"


def empty_targets(store_url: str, targets: list[PanelTarget], at: float,
                  hidden: list[str] | None = None) -> list[tuple[Outcome, str]]:
    """Targets without data that EMPTY_TARGETS does not excuse: [(outcome, scope)]. A target
    that shows only what is wrong (`X > 0`) passes when X itself has data: its filter hides
    healthy values, not a dead query (listed in `hidden` if given)."""
    problems = []
    for t, gv, scope in evaluations(targets):
        allowed = EMPTY_TARGETS.get(t.key)
        if allowed and (allowed[0] == "all" or allowed[0] == scope):
            continue
        outcome = evaluate(store_url, t, gv, at)
        if outcome.has_data:
            continue
        live = unfiltered(t)
        if live is not None and evaluate(store_url, live, gv, at).has_data:
            if hidden is not None:
                hidden.append(f"[node={scope}] {t}")
            continue
        problems.append((outcome, scope))
    return problems


def test_every_empty_target_exception_names_a_panel_that_exists() -> None:
    keys = {t.key for t in dashboard_targets()}
    stale = [k for k in EMPTY_TARGETS if k not in keys]
    assert not stale, f"EMPTY_TARGETS names panel targets no dashboard has: {stale}"
    assert all(scope in ("all", HEALTHY) and reason for scope, reason in EMPTY_TARGETS.values())


def test_every_dashboard_panel_shows_data_from_the_dashboards_data_source(stack: Stack) -> None:
    stack.vm.flush()
    hidden: list[str] = []
    problems = empty_targets(stack.vm.base_url, dashboard_targets(), time.time(), hidden)
    print(f"\n{len(hidden)} targets empty only through their filter (their series are live):\n  "
          + "\n  ".join(hidden))
    assert not problems, (
        f"{len(problems)} panel targets show nothing on the dashboards' data source (VictoriaMetrics: history + "
        f"the collector's own families) over the last {RANGE_S:g}s, $__rate_interval={W_S:g}s:\n"
        + "\n".join(f"[node={scope}] {o.describe()}" for o, scope in problems))


def test_dashboard_variables_offer_the_site_and_both_nodes(stack: Stack) -> None:
    """The site and node drop-downs, resolved on the data source as Grafana resolves them."""
    at = time.time()
    gv = GrafanaVars(SITE, ".*", RANGE_S, FLUSH_S)  # $site as picked in its drop-down
    got = {(dash, name): label_values(stack.vm.base_url, gv.substitute(query), at - RANGE_S, at)
           for dash, name, query in variable_queries()}
    want = {key: [SITE] if key[1] == "site" else sorted(NODES) for key in got}
    assert got == want


def test_a_renamed_metric_or_a_broken_aggregation_is_reported(stack: Stack) -> None:
    """The checker above is not blind: the same targets, mutated, are reported empty, also
    where a panel's filter would excuse an empty answer."""
    targets = {t.key: t for t in dashboard_targets()}
    mutations = [  # (target, renamed or broken in it, as)
        (("node", "Interface throughput", "A"), "node_network_receive_bytes_total", "node_network_receive_bytes"),
        (("node", "vLLM latency", "A"), "(model_name, le)", "(model_name)"),  # quantile without buckets
        (("fleet", "Disks failing SMART or with a critical warning", "A"), "smartctl_device_smart_status",
         "smartctl_device_smart_passed"),
    ]
    originals, mutated = [], []
    for key, old, new in mutations:
        t = targets[key]
        assert old in t.expr, f"{t} no longer holds {old!r}: pick another mutation"
        originals.append(t)
        mutated.append(replace(t, expr=t.expr.replace(old, new)))
    stack.vm.flush()
    at = time.time()
    assert not empty_targets(stack.vm.base_url, originals, at)  # the originals pass ...
    reported = empty_targets(stack.vm.base_url, mutated, at)  # ... the mutations are reported, everywhere
    want = sorted((t.expr, scope) for t, _, scope in evaluations(mutated))
    assert sorted((o.target.expr, scope) for o, scope in reported) == want, [o.describe() for o, _ in reported]


# -- 2. recording rules -------------------------------------------------------------------------

def recording_names(rule_files: list[Path]) -> list[str]:
    return [r["record"] for p in rule_files for g in yaml.safe_load(p.read_text())["groups"]
            for r in g["rules"] if "record" in r]


def test_every_recording_rule_produces_series_in_prometheus(stack: Stack) -> None:
    names = recording_names(stack.rule_files)
    assert set(EMPTY_RECORDINGS) <= set(names), f"EMPTY_RECORDINGS names no rule: {set(EMPTY_RECORDINGS) - set(names)}"
    since = max(1, int(time.time() - stack.started))

    def missing() -> list[str]:
        return [n for n in names if n not in EMPTY_RECORDINGS
                and not instant(stack.prom.base_url, f'count(last_over_time({{__name__="{n}"}}[{since}s]))')]

    settle(lambda: not missing(), 30)
    empty = missing()
    assert not empty, f"recording rules without series in Prometheus: {empty}"
    stale = [n for n in EMPTY_RECORDINGS
             if instant(stack.prom.base_url, f'count(last_over_time({{__name__="{n}"}}[{since}s]))')]
    assert not stale, f"EMPTY_RECORDINGS lists rules that do produce series: {stale}"


def test_abort_ratio_is_zero_on_a_node_that_never_aborts_and_the_share_on_one_that_does(stack: Stack) -> None:
    """A ratio over a counter that was never born (no abort ever) is 0, not nothing."""
    rule = "site_node_model:vllm_requests_aborted:ratio_rate10m"

    def ratio(node: str) -> list[float]:
        return finite(instant(stack.prom.base_url, f'{rule}{{node="{node}"}}'))

    settle(lambda: ratio(HEALTHY) and ratio(FAILING), 30)
    got = {node: ratio(node) for node in NODES}
    assert got[HEALTHY] == [0.0], f"{rule} on the node that never aborts: {got[HEALTHY]} (want [0.0])"
    assert len(got[FAILING]) == 1 and math.isclose(got[FAILING][0], ABORT_RATIO, rel_tol=0.2), (
        f"{rule} on the node aborting {ABORT_RATIO:.0%}: {got[FAILING]}")


# -- 3. alerts ----------------------------------------------------------------------------------

def rule_alertnames(rule_files: list[Path]) -> set[str]:
    return {r["alert"] for p in rule_files for g in yaml.safe_load(p.read_text())["groups"]
            for r in g["rules"] if "alert" in r}


def expected_failing_alerts(st: Stack) -> list[tuple[str, dict[str, str]]]:
    want: list[tuple[str, dict[str, str]]] = []
    unlisted = []
    for device, (fixture, kind) in sorted(st.disks[FAILING].items()):
        if fixture not in DISK_ALERTS:
            unlisted.append(fixture)
            continue
        want += [(name, {"device": device_label(device, kind)}) for name in sorted(DISK_ALERTS[fixture])]
    for fixture, _ in st.disks[HEALTHY].values():
        if fixture not in DISK_ALERTS:
            unlisted.append(fixture)
        elif DISK_ALERTS[fixture]:
            raise AssertionError(f"smart_fleet.HEALTHY holds {fixture}, which raises {set(DISK_ALERTS[fixture])}")
    assert not unlisted, f"add these recorded disks to DISK_ALERTS (fixture -> alerts): {unlisted}"
    return want + list(OTHER_FAILING_ALERTS)


def firing(st: Stack, node: str) -> list[dict[str, str]]:
    return [a["labels"] for a in st.prom.alerts() if a["state"] == "firing" and a["labels"].get("node") == node]


def matches(labels: dict[str, str], name: str, want: dict[str, str]) -> bool:
    return labels.get("alertname") == name and all(labels.get(k) == v for k, v in want.items())


def test_the_failing_node_raises_exactly_the_alerts_its_recordings_imply(stack: Stack) -> None:
    want = expected_failing_alerts(stack)

    def missing() -> list[tuple[str, dict[str, str]]]:
        now = firing(stack, FAILING)
        return [(n, lb) for n, lb in want if not any(matches(a, n, lb) for a in now)]

    settle(lambda: not missing(), 45)
    now = firing(stack, FAILING)
    print("\nfiring on node failing:", sorted((a.get("alertname"), a.get("device") or a.get("gpu") or "")
                                             for a in now))
    absent = missing()
    unexpected = [a for a in now if not any(matches(a, n, lb) for n, lb in want)]
    known = rule_alertnames(stack.rule_files)
    lines = [f"missing: {n} {lb}" + ("" if n in known else f"  (no alert rule named {n} in rules/)")
             for n, lb in absent]
    lines += [f"unexpected: {a.get('alertname')} { {k: v for k, v in a.items() if k != 'alertname'} }"
              for a in unexpected]
    assert not lines, "alerts on node failing:\n" + "\n".join(lines)


def test_nothing_ever_fires_on_the_healthy_node(stack: Stack) -> None:
    since = max(1, int(time.time() - stack.started))
    ever = instant(stack.prom.base_url,
                   f'max_over_time(ALERTS{{node="{HEALTHY}", alertstate="firing"}}[{since}s])')
    names = {s["metric"].get("alertname", "?"): s["metric"] for s in ever}
    now = {a.get("alertname", "?"): a for a in firing(stack, HEALTHY)}
    fired = {**names, **now}
    unexcused = {n: lb for n, lb in fired.items() if n not in HEALTHY_EXCEPTIONS}
    assert not unexcused, f"alerts that fired on node healthy during the run: {unexcused}"


# -- 4. CPU -------------------------------------------------------------------------------------

# The CPU checks' window: the dashboards' $__rate_interval at this flush, but at least 20 s.
# The agent stamps a reading with its scheduled tick (sources sharing an interval then share
# one timestamp column on the wire), so a source thread woken late on a loaded machine
# (~0.1 s) is off by that much of the window: 2% of 8 s, 0.5% of 20 s. In production the
# window is four flush intervals (4 minutes by default).
CPU_W_S = max(W_S, 20.0)
# As the node dashboard's "CPU busy" panel computes it (a share of the CPU time counted).
CPU_BUSY = (f'1 - sum by (site, node) (rate(node_cpu_seconds_total{{mode="idle"}}[{CPU_W_S:g}s]))'
            f" / sum by (site, node) (rate(node_cpu_seconds_total[{CPU_W_S:g}s]))")
CPU_SUM = f"sum by (site, node, cpu) (rate(node_cpu_seconds_total[{CPU_W_S:g}s]))"
EVAL_SPAN_S = 60.0  # several evaluations: every flush interval over the last minute
EDGE_EVALUATIONS = 20


def cpu_samples(base_url: str, at: float, span_s: int) -> dict[str, list[float]]:
    """Timestamps of one CPU counter's raw samples per node in (at - span, at]."""
    raw = instant(base_url, f'node_cpu_seconds_total{{cpu="0", mode="idle"}}[{span_s}s]', at)
    return {s["metric"]["node"]: sorted(float(t) for t, _ in s["values"]) for s in raw}


def out_of_bounds(what: str, result: list[dict[str, Any]], at: float) -> dict[str, list[str]]:
    """CPU busy outside [0, 1], or a per-CPU sum outside 1 +- 0.02, in an instant or range
    answer: {series: ["value@now-Ns", ...]}."""
    out: dict[str, list[str]] = {}
    for s in result:
        for t, v in s.get("values") or [s["value"]]:
            x = float(v)
            if not (0.0 <= x <= 1.0 if what == "busy" else abs(x - 1.0) <= 0.02):
                out.setdefault(f"{what} {s['metric']}", []).append(f"{x:.3f}@now-{at - float(t):.1f}s")
    return out


def cpu_problems(base_url: str, st: Stack, edge_sums: bool = True) -> list[str]:
    """CPU busy and per-CPU time, two ways:
    - the history: at every flush interval over the last EVAL_SPAN_S of complete data (from
      the first evaluation whose window lies wholly after both nodes' first sample: a
      counter's rate over a window reaching back before its birth is partial by definition);
    - the live edge: at "now", as a dashboard's newest point, EDGE_EVALUATIONS times over
      2.5 flush intervals, so that "now" falls at every phase between two deliveries.
      `edge_sums=False`: per-CPU sums (rates against the clock) are not checked there; see
      test_cpu_busy_and_per_cpu_time_are_true_over_the_scrape."""
    at = time.time()
    stamps = cpu_samples(base_url, at, int(at - st.started) + 10)
    if set(stamps) != set(NODES) or not all(stamps.values()):
        return [f"node_cpu_seconds_total samples only for nodes {sorted(stamps)}"]
    # History: windows wholly after both nodes' first sample and up to the newest sample the
    # store holds of both (later points are the live edge's, checked below).
    end = min(ts[-1] for ts in stamps.values())
    start = max(end - EVAL_SPAN_S, max(ts[0] for ts in stamps.values()) + CPU_W_S + FLUSH_S)
    out = []
    for what, expr in (("busy", CPU_BUSY), ("per-CPU sum", CPU_SUM)):
        result = query_range(base_url, expr, start, end, FLUSH_S)
        nodes = {s["metric"].get("node") for s in result}
        if nodes != set(NODES):
            out.append(f"{what}: series for nodes {sorted(n for n in nodes if n)}, want {list(NODES)}")
        if len(finite(result)) < len(result) * ((end - start) / FLUSH_S) / 2:
            out.append(f"{what}: only {len(finite(result))} finite values in {len(result)} series")
        out += [f"history: {series} out of bounds at {len(bad)} of {int((end - start) / FLUSH_S) + 1} evaluations: "
                f"{', '.join(bad[:4])}" for series, bad in out_of_bounds(what, result, at).items()]
    edge: dict[str, list[str]] = {}
    ages: list[float] = []
    for _ in range(EDGE_EVALUATIONS):
        now = time.time()
        newest = cpu_samples(base_url, now, int(4 * CPU_W_S))
        ages.append(round(now - min(ts[-1] for ts in newest.values()), 1) if newest else math.inf)
        for what, expr in (("busy", CPU_BUSY), ("per-CPU sum", CPU_SUM))[:2 if edge_sums else 1]:
            for series, bad in out_of_bounds(what, instant(base_url, expr, now), now).items():
                edge.setdefault(series, []).extend(v.split("@")[0] for v in bad)
        time.sleep(2.5 * FLUSH_S / EDGE_EVALUATIONS)
    out += [f"live edge: {series} out of bounds at {len(v)} of {EDGE_EVALUATIONS} evaluations at now: "
            f"{', '.join(v[:4])}" for series, v in edge.items()]
    if edge:
        out.append(f"(age of the older node's newest sample at each live-edge evaluation: {ages})")
    if out:
        out.append(f"(history evaluated from now-{at - start:.0f}s to now-{at - end:.0f}s every {FLUSH_S:g}s)")
    return out


def test_cpu_busy_and_per_cpu_time_are_true_over_the_history(stack: Stack) -> None:
    stack.vm.flush()
    problems = cpu_problems(stack.vm.base_url, stack)
    assert not problems, f"VictoriaMetrics (remote-written history), W={CPU_W_S:g}s:\n" + "\n".join(problems)


def test_cpu_busy_and_per_cpu_time_are_true_over_the_scrape(stack: Stack) -> None:
    """At the live edge only CPU busy (a share) is checked: a node's newest point reaches the
    collector a flush interval after it was sampled, and Prometheus' rate() extrapolates at
    most half a sample interval past the newest sample, so a rate against the clock reads low
    there (README, "Dashboards and alert rules"); every earlier evaluation is checked whole."""
    problems = cpu_problems(stack.prom.base_url, stack, edge_sums=False)
    assert not problems, f"Prometheus (scrape of /metrics), W={CPU_W_S:g}s:\n" + "\n".join(problems)

