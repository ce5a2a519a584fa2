"""Helpers of the liveness suite (tests/e2e/test_liveness.py): the stores NOC staff read, and
the dashboards' queries as Grafana would send them.

- `ScrapingVictoriaMetrics`: the dashboards' data source. VictoriaMetrics (dedup 1ms) that
  receives the collector's remote-written history and ALSO scrapes the collector's own
  `waystation_(node|ingest|exposition|collector|remote_write|ledger)_*` families itself
  (`-promscrape.config`, README "Which to use"). No rules are evaluated there (README
  "The setup they expect": the dashboards need none).
- `ScrapingPrometheus`: Prometheus scraping the collector's full /metrics (honor_labels)
  every second with a copy of rules/ loaded: what the alerts are evaluated on.
- `RecordedAgent`: a real agent process (tests/fakes/recorded_agent.py) with recorded GPUs,
  an optional XID raised after some seconds, and SMART through tests/fakes/smartctl-replay.
- `dashboard_targets()`, `GrafanaVars`, `evaluate()`: every panel target of dashboards/*.json,
  its template variables substituted as Grafana substitutes them, run against a store.

Only loopback is listened on or queried. Every wait is bounded.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO
from tests.e2e.receivers import PROMETHEUS, ReceiverProcess, VictoriaMetricsReceiver, http_request
from tests.integration.harness import ENV, Agent

RECORDED_AGENT = REPO / "tests" / "fakes" / "recorded_agent.py"
SMARTCTL_REPLAY = REPO / "tests" / "fakes" / "smartctl-replay"
# README "Which to use": the families a store holding the remote-written history scrapes.
COLLECTOR_FAMILIES = "waystation_(node|ingest|exposition|collector|remote_write|ledger)_.*"


# -- queries ------------------------------------------------------------------------------------

class QueryError(AssertionError):
    """The store refused the query (it does not parse, or cannot be evaluated)."""


def api(base_url: str, path: str, params: Mapping[str, str]) -> Any:
    """POST a Prometheus-API query (form-encoded: long expressions fit); the `data` part."""
    status, _, body = http_request("POST", base_url + path, urllib.parse.urlencode(params).encode(),
                                   {"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    if status != 200 or doc.get("status") != "success":
        raise QueryError(f"{base_url}{path} {dict(params)} -> {status}: {body[:500]!r}")
    return doc["data"]


def instant(base_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = api(base_url, "/api/v1/query", params)
    if data["resultType"] == "scalar":  # a scalar answer, as one label-less sample
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]  # type: ignore[no-any-return]


def query_range(base_url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    data = api(base_url, "/api/v1/query_range",
               {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}s"})
    return data["result"]  # type: ignore[no-any-return]


def values(result: Sequence[Mapping[str, Any]]) -> list[float]:
    """Every value of an instant or range answer, as floats (NaN included)."""
    out: list[float] = []
    for series in result:
        if "value" in series:
            out.append(float(series["value"][1]))
        out.extend(float(v) for _, v in series.get("values", []))
    return out


def finite(result: Sequence[Mapping[str, Any]]) -> list[float]:
    return [v for v in values(result) if not math.isnan(v)]


def settle(cond: Callable[[], Any], timeout: float, interval: float = 2.0) -> bool:
    """Poll `cond` until it holds or `timeout` passes (bounded); whether it held. For checks
    that then assert with their own, more telling message."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# -- processes ----------------------------------------------------------------------------------

class ScrapingVictoriaMetrics(VictoriaMetricsReceiver):
    """VictoriaMetrics with dedup at 1ms (a resent sample counts once, README) that also scrapes
    the collector's own families every `scrape_interval` (keep-relabel of README)."""

    name = "victoria-metrics"

    def __init__(self, tmp_dir: Path, collector_port: int, scrape_interval: str = "1s") -> None:
        super().__init__(tmp_dir)
        self.scrape_config = self.dir / "scrape.yml"
        self.scrape_config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": scrape_interval},
            "scrape_configs": [{
                "job_name": "waystation", "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{collector_port}"]}],
                "metric_relabel_configs": [{"source_labels": ["__name__"], "action": "keep",
                                            "regex": COLLECTOR_FAMILIES}],
            }],
        }))

    def args(self) -> list[str]:
        args = [a for a in super().args() if not a.startswith("-dedup.minScrapeInterval")]
        return [*args, "-dedup.minScrapeInterval=1ms", f"-promscrape.config={self.scrape_config}"]


class ScrapingPrometheus(ReceiverProcess):
    """Prometheus scraping the collector's full /metrics every second (honor_labels) with rules."""

    name = "prometheus"
    ready_path = "/-/ready"

    def __init__(self, tmp_dir: Path, collector_port: int, rule_files: Sequence[Path]) -> None:
        if PROMETHEUS is None:
            raise AssertionError("prometheus not installed (apt-get install prometheus)")
        super().__init__(tmp_dir)
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "waystation", "honor_labels": True,
                                "static_configs": [{"targets": [f"127.0.0.1:{collector_port}"]}]}],
        }))

    def args(self) -> list[str]:
        assert PROMETHEUS is not None
        return [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts Prometheus holds now (pending and firing), as /api/v1/alerts lists them."""
        self.check_alive()
        status, _, body = http_request("GET", self.base_url + "/api/v1/alerts", timeout=10)
        assert status == 200, body[:300]
        return json.loads(body)["data"]["alerts"]  # type: ignore[no-any-return]


class RecordedAgent(Agent):
    """harness.Agent run through tests/fakes/recorded_agent.py (recorded GPUs, optional XIDs),
    with SMARTCTL_REPLAY pointing the replaying smartctl at its folder."""

    def __init__(self, workdir: Path, collector_url: str, extra_toml: str, site: str, node: str,
                 xids: Sequence[tuple[int, int, float]] = (), smart_replay: Path | None = None) -> None:
        super().__init__(workdir, collector_url, extra_toml=extra_toml, site=site, node=node)
        self.xids = tuple(xids)
        self.smart_replay = smart_replay

    def start(self) -> None:
        assert self.proc is None
        env = dict(ENV)
        if self.smart_replay is not None:
            env["SMARTCTL_REPLAY"] = str(self.smart_replay)
        args = [sys.executable, str(RECORDED_AGENT), "--config", str(self.config)]
        for gpu, xid, after in self.xids:
            args += ["--xid", f"{gpu}:{xid}:{after:g}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"agent {self.node} exited ({rc}): {self.log.read_text()[-3000:]}")


# -- dashboards as Grafana queries them ---------------------------------------------------------

@dataclass(frozen=True)
class PanelTarget:
    dashboard: str  # file stem: fleet, node, pipeline
    panel: str  # title
    panel_type: str
    ref_id: str
    expr: str
    instant: bool

    @property
    def key(self) -> tuple[str, str, str]:
        return self.dashboard, self.panel, self.ref_id

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r} / {self.ref_id}"


def _panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_targets(folder: Path = REPO / "dashboards") -> list[PanelTarget]:
    out = []
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        for p in _panels(doc.get("panels", [])):
            for t in p.get("targets", []):
                out.append(PanelTarget(path.stem, p["title"], p["type"], t["refId"], t["expr"],
                                       bool(t.get("instant"))))
    return out


def dashboard_variables(folder: Path = REPO / "dashboards") -> dict[str, list[str]]:
    """Dashboard stem -> the names of its template variables."""
    return {path.stem: [v["name"] for v in json.loads(path.read_text())["templating"]["list"]]
            for path in sorted(folder.glob("*.json"))}


def variable_queries(folder: Path = REPO / "dashboards") -> list[tuple[str, str, str]]:
    """(dashboard stem, variable name, query) of every query variable."""
    return [(path.stem, v["name"], v["query"]) for path in sorted(folder.glob("*.json"))
            for v in json.loads(path.read_text())["templating"]["list"] if v["type"] == "query"]


def label_values(base_url: str, query: str, start: float, end: float) -> list[str]:
    """A `label_values(selector, label)` variable as Grafana's Prometheus data source resolves
    it: the series matching the selector over the dashboard's range, that label's values."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
    if m is None:
        raise AssertionError(f"not a label_values(selector, label) query: {query!r}")
    series = api(base_url, "/api/v1/series", {"match[]": m.group(1), "start": f"{start:.3f}", "end": f"{end:.3f}"})
    return sorted({s[m.group(2)] for s in series if m.group(2) in s})


def grafana_step(range_s: float, min_interval_s: float, max_data_points: int = 1000) -> float:
    """Grafana's query interval ($__interval, the range query's step): the range over the
    panel's data points, never below the data source's scrape interval (its min interval),
    rounded up to whole seconds (Grafana rounds to "nice" values; at these sizes, seconds)."""
    return float(max(min_interval_s, math.ceil(range_s / max_data_points)))


@dataclass(frozen=True)
class GrafanaVars:
    """Template variables as Grafana substitutes them for one query."""

    site: str  # a site name, or ".*" (the multi-value variable's All)
    node: str
    range_s: float  # the dashboard's time range
    scrape_interval_s: float  # the data source's "Scrape interval" setting

    @property
    def interval_s(self) -> float:
        return grafana_step(self.range_s, self.scrape_interval_s)

    @property
    def rate_interval_s(self) -> float:
        """Grafana: max($__interval + scrape interval, 4 x scrape interval)."""
        return max(self.interval_s + self.scrape_interval_s, 4 * self.scrape_interval_s)

    def substitute(self, expr: str) -> str:
        table = {
            "$__rate_interval": f"{self.rate_interval_s:g}s",
            "$__interval": f"{self.interval_s:g}s",
            "$__range": f"{self.range_s:g}s",
            "${site}": self.site, "$site": self.site,
            "${node}": self.node, "$node": self.node,
        }
        for var, value in table.items():  # longest names first: $__rate_interval before $__range
            expr = expr.replace(var, value)
        if "$" in expr:
            raise AssertionError(f"a template variable left unsubstituted in {expr!r}")
        return expr


@dataclass(frozen=True)
class Outcome:
    target: PanelTarget
    query: str
    series: int
    finite_values: int
    error: str = ""

    @property
    def has_data(self) -> bool:
        return not self.error and self.finite_values > 0

    def describe(self) -> str:
        if self.error:
            return f"{self.target}: query failed: {self.error[:300]}\n    {self.query}"
        what = "no series" if self.series == 0 else f"{self.series} series, all NaN"
        return f"{self.target}: {what}\n    {self.query}"


# A comparison with a constant at the very end of a query (inside trailing parentheses):
# `X > 0`, `topk(10, X > 0)`, `X == 1`. It hides the series whose value is nominal.
_TRAILING_FILTER = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?=\)*\s*$)")


def unfiltered(target: PanelTarget) -> PanelTarget | None:
    """The target without its trailing filter (`X > 0` -> `X`), or None if it has none. A panel
    that shows only what is wrong is empty on healthy hardware; its unfiltered query must
    still show the live series the filter looks at."""
    expr, n = _TRAILING_FILTER.subn("", target.expr, count=1)
    return replace(target, expr=expr) if n else None


def evaluate(base_url: str, target: PanelTarget, gv: GrafanaVars, now: float) -> Outcome:
    """One panel target as Grafana runs it: an instant query at `now`, or a range query over
    the dashboard's range with Grafana's step."""
    query = gv.substitute(target.expr)
    try:
        if target.instant:
            result = instant(base_url, query, now)
        else:
            result = query_range(base_url, query, now - gv.range_s, now, gv.interval_s)
    except QueryError as exc:
        return Outcome(target, query, 0, 0, str(exc))
    return Outcome(target, query, len(result), len(finite(result)))
