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
