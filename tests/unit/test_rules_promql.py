"""The PromQL name checker used on rules/ and dashboards/, and tests of the checker itself.

`check(expr, known)` lists every problem with an expression: a metric name that nothing
emits, a label the metric does not carry, a grouping label no referenced metric carries,
an unknown function, or rate()/increase()/irate() over something that is not a counter.
The known names come from agent/catalog.py (everything the agent emits, with the
summarizer's `:window_*` series and histogram/summary sample names), the collector's own
families read from a live prometheus_client registry, and the recording rules in rules/.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import wire
from agent.catalog import CATALOG, OPTIONAL_LABELS
from agent.summarize import WINDOW_SUFFIXES
from collector.exposition import FleetCollector, FleetState
from collector.ingest import IngestMetrics
from collector.ledger import Ledger, NodeState
from collector.remote_write import ForwardingMetrics, TargetState, save_target

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "rules"
PROBE = "checker_probe_series"

# Every fleet series carries site and node (the collector adds them); Prometheus adds the
# scrape target's job and instance to everything it scrapes.
ALWAYS = frozenset({"site", "node", "job", "instance"})

FUNCTIONS = frozenset("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
deg delta deriv exp floor histogram_count histogram_fraction histogram_quantile histogram_stddev
histogram_stdvar histogram_sum holt_winters hour idelta increase irate label_join label_replace
last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh
sort sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp
vector year
sum min max avg group stddev stdvar count count_values bottomk topk quantile
""".split())
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan", "Inf", "NaN"})
COUNTER_FUNCS = frozenset({"rate", "irate", "increase", "resets"})
AGGREGATIONS = frozenset("sum min max avg group stddev stdvar count count_values bottomk topk quantile".split())

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<dur>\d+(?:ms|[smhdwy])(?![A-Za-z0-9_:]))
  | (?P<num>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
""", re.X)


@dataclass
class Known:
    """A metric name the checker accepts: its label names, type, and whether any label goes."""

    labels: frozenset[str]
    type: str
    any_labels: bool = False


@dataclass
class Refs:
    """What one expression references."""

    metrics: list[tuple[str, frozenset[str]]] = field(default_factory=list)  # (name, matcher labels)
    grouping: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    counter_args: list[str] = field(default_factory=list)  # metric names under rate()/increase()...


def tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            out.append((kind, m.group()))
    return out


def references(expr: str) -> Refs:
    """Metric names (with the label names their matchers use), grouping labels and functions."""
    toks = tokens(expr)
    refs = Refs()
    i = 0

    def matchers(j: int) -> tuple[frozenset[str], str | None, int]:
        """Parse `{a="x", b=~"y"}` starting at toks[j] == '{'; (label names, __name__, next index)."""
        names: set[str] = set()
        metric = None
        j += 1
        while toks[j][1] != "}":
            kind, label = toks[j]
            if kind == "str":  # quoted label name (Prometheus 3); treat like an identifier
                label = label[1:-1]
            value = toks[j + 2][1][1:-1]
            if label == "__name__":
                metric = value
            else:
                names.add(label)
            j += 3
            if toks[j][1] == ",":
                j += 1
        return frozenset(names), metric, j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "op" and text == "{":
            labels, metric, i = matchers(i)
            if metric is not None:
                refs.metrics.append((metric, labels))
            continue
        if kind != "ident":
            i += 1
            continue
        if text in GROUPING:
            i += 1
            if nxt == "(":
                i += 1
                while toks[i][1] != ")":
                    if toks[i][0] in ("ident", "str"):
                        refs.grouping.add(toks[i][1].strip("\"'`"))
                    i += 1
                i += 1
            continue
        if text in KEYWORDS:
            i += 1
            continue
        if nxt == "(" or (text in AGGREGATIONS and nxt in ("by", "without")):
            refs.functions.add(text)
            i += 1
            continue
        labels: frozenset[str] = frozenset()
        end = i + 1
        if nxt == "{":
            labels, _, end = matchers(i + 1)
        refs.metrics.append((text, labels))
        if i >= 2 and toks[i - 1][1] == "(" and toks[i - 2][1] in COUNTER_FUNCS:
            refs.counter_args.append(text)
        i = end
    return refs


def _add(known: dict[str, Known], name: str, labels: Iterable[str], kind: str, any_labels: bool = False) -> None:
    known[name] = Known(frozenset(labels) | ALWAYS, kind, any_labels)


def catalog_names() -> dict[str, Known]:
    """Everything the agent emits, as Prometheus sees it at the collector."""
    known: dict[str, Known] = {}
    for m in CATALOG:
        labels = set(m.labels) | set(OPTIONAL_LABELS.get(m.name, ()))
        free = m.server_labels  # a scraped server's own labels come along; we do not control them
        if m.type == "histogram":
            _add(known, m.name + "_bucket", labels | {"le"}, "counter", free)
            _add(known, m.name + "_sum", labels, "counter", free)
            _add(known, m.name + "_count", labels, "counter", free)
            continue
        if m.type == "summary":
            _add(known, m.name, labels | {"quantile"}, "gauge", free)
            _add(known, m.name + "_sum", labels, "counter", free)
            _add(known, m.name + "_count", labels, "counter", free)
            continue
        _add(known, m.name, labels, m.type, free)
        if m.type == "gauge":
            for suffix in WINDOW_SUFFIXES:
                _add(known, m.name + suffix, labels, "gauge", free)
    return known


def collector_names() -> dict[str, Known]:
    """The collector's own families, read from what its collectors really expose."""
    fleet = FleetState(max_series_per_node=10)
    fleet.update_node(NodeState(site="s", node="n", backlog_batches=1.0, backlog_bytes=1.0))
    fleet.apply("s", "n", [wire.Series(PROBE, (), wire.MetricType.GAUGE, (0,), (1.0,))])  # per-node families
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet))
    registry.register(IngestMetrics())
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.db")
        try:  # one target with a refusal and a retry on record, so the reason-labelled families show
            save_target(ledger.conn, "t", TargetState(refused={"too_old": 1}, retries={"http_5xx": 1},
                                                      last_success=1.0), 1.0)
            registry.register(ForwardingMetrics(ledger.conn, ["t"]))
            text = generate_latest(registry).decode()
        finally:
            ledger.close()
    known: dict[str, Known] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created") or sample.name == PROBE:
                continue
            kind = "counter" if family.type == "counter" else "gauge"
            prev = known.get(sample.name)
            labels = set(sample.labels) | (set(prev.labels) if prev else set())
            _add(known, sample.name, labels, kind)
    return known


def prometheus_names() -> dict[str, Known]:
    """Series Prometheus itself writes for every scrape target."""
    known: dict[str, Known] = {}
    for name in ("up", "scrape_duration_seconds", "scrape_samples_scraped"):
        _add(known, name, (), "gauge")
    return known


def rule_groups(rules_dir: Path = RULES_DIR) -> list[dict]:  # type: ignore[type-arg]
    groups = []
    for path in sorted(rules_dir.glob("*.rules.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def recorded_names(base: dict[str, Known], groups: list[dict]) -> dict[str, Known]:  # type: ignore[type-arg]
    """Recording rules' outputs: their labels are what their inputs and groupings carry."""
    known = dict(base)
    records = [r for g in groups for r in g["rules"] if "record" in r]
    for _ in range(len(records) + 1):  # rules may build on rules: iterate to a fixpoint
        changed = False
        for r in records:
            refs = references(r["expr"])
            labels: set[str] = set(refs.grouping)
            any_labels = False
            for name, _labels in refs.metrics:
                k = known.get(name)
                if k is not None:
                    labels |= k.labels
                    any_labels |= k.any_labels
            labels |= set(r.get("labels", {}))
            new = Known(frozenset(labels) | ALWAYS, "gauge", any_labels)
            if known.get(r["record"]) != new:
                known[r["record"]] = new
                changed = True
        if not changed:
            break
    return known


def known_names(rules_dir: Path = RULES_DIR) -> dict[str, Known]:
    base = {**catalog_names(), **collector_names(), **prometheus_names()}
    return recorded_names(base, rule_groups(rules_dir))


def check(expr: str, known: dict[str, Known]) -> list[str]:
    """Every problem with the names in one PromQL expression (empty when it is sound)."""
    problems = []
    refs = references(expr)
    for fn in sorted(refs.functions - FUNCTIONS):
        problems.append(f"unknown function {fn}()")
    carried: set[str] = set(ALWAYS)
    any_labels = False
    for name, labels in refs.metrics:
        k = known.get(name)
        if k is None:
            problems.append(f"unknown metric {name}")
            continue
        carried |= k.labels
        any_labels |= k.any_labels
        if not k.any_labels:
            for label in sorted(labels - k.labels):
                problems.append(f"{name} has no label {label}")
    for name in refs.counter_args:
        k = known.get(name)
        if k is not None and k.type != "counter":
            problems.append(f"rate()/increase() over {name}, a {k.type}")
    if not any_labels:
        for label in sorted(refs.grouping - carried - {"le"}):
            problems.append(f"grouping label {label} is on none of the metrics")
    return problems


# ---- tests of the checker itself ----

KNOWN = known_names()


def test_sound_expressions_pass() -> None:
    for expr in (
        'time() - waystation_node_last_seen_timestamp_seconds{site="s1"} > 600',
        'increase(waystation_ingest_batches_total{result="bad_signature"}[30m]) > 0',
        "sum by (site, node, le) (rate(vllm:e2e_request_latency_seconds_bucket[5m]))",
        'avg_over_time(DCGM_FI_DEV_GPU_TEMP:window_max{gpu="0"}[10m] offset 5m) > 1e2',
        "max by (site) (waystation_agent_spool_pending_bytes) / on (site) group_left sum(node_load1)",
        'smartctl_device_attribute{attribute_name="Reallocated_Sector_Ct",attribute_value_type="raw"}',
        "site_node:waystation_node_last_seen:age_seconds > 600",
        'nv_inference_request_summary_us{quantile="0.99", model="m"} / 1e6',
    ):
        assert check(expr, KNOWN) == [], expr


def test_a_renamed_metric_fails() -> None:
    assert check("time() - waystation_node_last_seen_seconds > 600", KNOWN) == [
        "unknown metric waystation_node_last_seen_seconds"
    ]
    assert check('rate(DCGM_FI_DEV_XID_ERRORS{gpu="0"}[5m])', KNOWN) == ["unknown metric DCGM_FI_DEV_XID_ERRORS"]
    assert check('{__name__="smartctl_device_wear"}', KNOWN) == ["unknown metric smartctl_device_wear"]


def test_a_wrong_label_fails() -> None:
    assert check('smartctl_device_temperature{disk="sda"}', KNOWN) == ["smartctl_device_temperature has no label disk"]
    assert check("sum by (hostname) (node_load1)", KNOWN) == ["grouping label hostname is on none of the metrics"]


def test_rate_over_a_gauge_fails() -> None:
    assert check("rate(smartctl_device_media_errors[1h])", KNOWN) == [
        "rate()/increase() over smartctl_device_media_errors, a gauge"
    ]


def test_unknown_function_fails() -> None:
    assert check("histogram_quantil(0.99, tgi_request_duration_bucket)", KNOWN) == [
        "unknown function histogram_quantil()"
    ]


def test_strings_and_durations_are_not_names() -> None:
    refs = references('label_replace(up{job="x"}, "dst", "$1", "instance", "(.*):.*")[5m:1m] offset 1h')
    assert [name for name, _ in refs.metrics] == ["up"]


def test_collector_and_agent_names_are_known() -> None:
    for name in ("waystation_node_last_seen_timestamp_seconds", "waystation_node_tamper_events_total",
                 "waystation_ingest_batches_total", "waystation_node_reported_backlog_batches",
                 "waystation_agent_uplink_last_ack_timestamp_seconds", "smartctl_device_smart_status",
                 "waystation_gpu_xid_errors_total", "DCGM_FI_DEV_GPU_TEMP:window_max",
                 "waystation_exposition_series_dropped_total", "waystation_node_gap_seqs"):
        assert name in KNOWN, name
    assert "result" in KNOWN["waystation_ingest_batches_total"].labels
