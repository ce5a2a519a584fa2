"""dashboards/: committed JSON matches its .dashboard.py, only current panel types, a data
source variable everywhere, and every query parses and names only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.__main__ import json_path, render, sources
from tests.unit.test_rules_promql import KNOWN, check

PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "bargauge"}
DS = "${datasource}"
# Grafana's built-in and our template variables, replaced by something PromQL accepts.
SUBSTITUTE = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${site}": "s1", "$site": "s1",
              "${node}": "n1", "$node": "n1"}
SOURCES = sources()


def load(source: Path) -> dict[str, Any]:
    return json.loads(json_path(source).read_text())  # type: ignore[no-any-return]


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in doc.get("panels", []):
        yield p
        yield from panels(p)


def exprs(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for p in panels(doc):
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTE.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown template variable in {expr!r}"
    return expr


def test_there_are_dashboards() -> None:
    assert {s.name for s in SOURCES} >= {"fleet.dashboard.py", "node.dashboard.py", "pipeline.dashboard.py"}


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_committed_json_is_what_the_source_generates(source: Path) -> None:
    assert json_path(source).exists(), f"run `python -m dashboards` to create {json_path(source).name}"
    assert json_path(source).read_text() == render(source), (
        f"{json_path(source).name} is stale: run `python -m dashboards`")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_only_current_panel_types_and_the_datasource_variable(source: Path) -> None:
    doc = load(source)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DS, v["name"]
    found = list(panels(doc))
    assert found
    for p in found:
        assert p["type"] in PANEL_TYPES, f"{p['title']}: {p['type']}"
        assert p["datasource"] == DS, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, p["title"]
    ids = [p["id"] for p in found]
    assert len(ids) == len(set(ids))


def test_detail_dashboard_has_site_and_node_variables() -> None:
    doc = load(next(s for s in SOURCES if s.name == "node.dashboard.py"))
    names = [v["name"] for v in doc["templating"]["list"]]
    assert names == ["datasource", "site", "node"]
    for p in panels(doc):
        for t in p["targets"]:
            assert 'site="$site"' in t["expr"] and 'node="$node"' in t["expr"], (p["title"], t["expr"])


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_queries_name_only_metrics_and_labels_that_exist(source: Path) -> None:
    doc = load(source)
    problems = [f"{title}: {p}" for title, expr in exprs(doc) for p in check(substitute(expr), KNOWN)]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), *(\w+)\)", v["query"])
            assert m, v["query"]
            problems += [f"${v['name']}: {p}" for p in check(substitute(m.group(1)), KNOWN)]
            if m.group(2) not in KNOWN[m.group(1).split("{")[0]].labels:
                problems.append(f"${v['name']}: no label {m.group(2)}")
    assert not problems, "\n".join(problems)


def test_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as the expression of a recording rule)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; scripts/test.sh does)")
    rules = [{"record": f"dashboard:query_{i}:check", "expr": substitute(expr)}
             for i, (_, expr) in enumerate(e for s in SOURCES for e in exprs(load(s)))]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_dashboard_with_a_renamed_metric_fails() -> None:
    assert check(substitute('rate(node_network_receive_bytes{site="$site"}[$__rate_interval])'), KNOWN) == [
        "unknown metric node_network_receive_bytes"
    ]


def test_inlined_rule_expressions_mean_what_their_recording_rules_record(tmp_path: Path) -> None:
    """The dashboards read stores that evaluate no rules (the remote-written history), so they
    write the recording rules out; promtool evaluates each beside its rule over the same
    series, including an idle interface, and finds no difference."""
    from dashboards import common

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; scripts/test.sh does)")
    sel = 'site="s1"'
    pairs = [
        (common.node_age(sel), "site_node:waystation_node_last_seen:age_seconds", "site, node", 2),
        (common.backlog_age(sel), "site_node:waystation_agent_spool_oldest_unsent:age_seconds", "site, node", 2),
        (common.watermark_lag(sel), "site_node:waystation_watermark_lag:seqs", "site, node", 2),
        (common.clock_offset(sel), "site_node:waystation_clock_offset_seconds:estimate", "site, node", 2),
        (common.interface_ratio(sel, "errors", "10m"), "site_node_device:node_network_errors:ratio_rate10m",
         "site, node, device", 2),
        (common.interface_ratio(sel, "drops", "10m"), "site_node_device:node_network_drops:ratio_rate10m",
         "site, node, device", 2),
    ]
    series = []
    for node, k in (("n1", 1), ("n2", 3)):
        base = f'site="s1",node="{node}"'
        series += [
            (f"waystation_node_last_seen_timestamp_seconds{{{base}}}", f"0+{60 * k}x40"),
            (f"waystation_agent_spool_oldest_unsent_timestamp_seconds{{{base}}}", f"0+{30 * k}x40"),
            (f"waystation_node_highest_seq{{{base}}}", f"0+{2 * k}x40"),
            (f"waystation_node_complete_through_seq{{{base}}}", f"0+{k}x40"),
            (f"waystation_agent_uplink_last_ack_timestamp_seconds{{{base}}}", f"0+{55 * k}x40"),
        ]
    for device, errs, packets in (("eth0", 7, 1000), ("eth1", 0, 0)):  # eth1 idle
        for direction in ("receive", "transmit"):
            lab = f'site="s1",node="n1",device="{device}"'
            series += [(f"node_network_{direction}_packets_total{{{lab}}}", f"0+{packets}x40"),
                       (f"node_network_{direction}_errs_total{{{lab}}}", f"0+{errs}x40"),
                       (f"node_network_{direction}_drop_total{{{lab}}}", f"0+{errs * 2}x40")]
    tests = []
    for inline, record, by, count in pairs:
        diff = f"count(abs(({inline}) - on ({by}) ({record})) < 1e-9)"
        tests.append({"expr": diff, "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": count}]})
    doc = {
        "rule_files": [str(p) for p in sorted((Path(__file__).resolve().parents[2] / "rules").glob("*.rules.yml"))],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                   "promql_expr_test": tests}],
    }
    path = tmp_path / "inline.test.yml"
    path.write_text(yaml.safe_dump(doc))
    run = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
