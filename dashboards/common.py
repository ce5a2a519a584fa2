"""Shared pieces of the Waystation dashboards: variables, panel builders, a row layout.

Every panel queries the `$datasource` variable (no hard-coded data source) and uses only
current panel types (TimeSeries, Stat, Gauge, Table, BarGauge).
"""

from __future__ import annotations

from collections.abc import Sequence

from grafanalib.core import (
    BarGauge,
    Dashboard,
    GaugePanel,
    GridPos,
    Stat,
    Table,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

DS = "${datasource}"
TAGS = ["waystation"]
LAST_SEEN = "waystation_node_last_seen_timestamp_seconds"

Query = tuple[str, str]  # (PromQL, legend)

# The dashboards read the history the collector remote-writes (original timestamps) plus the
# collector's own families, from one Prometheus-compatible data source. They need no rules
# evaluated there (VictoriaMetrics evaluates none), so what rules/ records is written out here
# with the same meaning; tests/unit/test_dashboards.py holds each to its recording rule.


# SMART is read every 10 minutes by default, beyond a Prometheus history store's 5-minute
# lookback: SMART panels show each disk's last reading within this span.
SMART_SPAN = "30m"


def node_age(sel: str) -> str:
    """site_node:waystation_node_last_seen:age_seconds"""
    return f"time() - max by (site, node) ({LAST_SEEN}{{{sel}}})"


def backlog_age(sel: str) -> str:
    """site_node:waystation_agent_spool_oldest_unsent:age_seconds"""
    return f"time() - max by (site, node) (waystation_agent_spool_oldest_unsent_timestamp_seconds{{{sel}}})"


def watermark_lag(sel: str) -> str:
    """site_node:waystation_watermark_lag:seqs"""
    return (f"max by (site, node) (waystation_node_highest_seq{{{sel}}}) - on (site, node) "
            f"max by (site, node) (waystation_node_complete_through_seq{{{sel}}})")


def clock_offset(sel: str) -> str:
    """site_node:waystation_clock_offset_seconds:estimate"""
    return (f"max by (site, node) (last_over_time(waystation_agent_uplink_last_ack_timestamp_seconds{{{sel}}}[1h]))"
            " - on (site, node) "
            f"max by (site, node) ({LAST_SEEN}{{{sel}}})")


def interface_ratio(sel: str, kind: str, window: str) -> str:
    """site_node_device:node_network_{errors,drops}:ratio_rate10m over `window`: bad frames /
    (good packets + bad frames), 0 on an idle interface."""
    metric = {"errors": "errs", "drops": "drop"}[kind]
    s = f'{sel}, device!="lo"'
    bad = (f"rate(node_network_receive_{metric}_total{{{s}}}[{window}])"
           f" + rate(node_network_transmit_{metric}_total{{{s}}}[{window}])")
    good = (f"rate(node_network_receive_packets_total{{{s}}}[{window}])"
            f" + rate(node_network_transmit_packets_total{{{s}}}[{window}])")
    return f"({bad}) / clamp_min({good} + {bad}, 1e-9)"


def datasource_var() -> Template:
    return Template(name="datasource", label="Data source", type="datasource", query="prometheus")


def site_var(multi: bool = True) -> Template:
    return Template(
        name="site", label="Site", dataSource=DS, query=f"label_values({LAST_SEEN}, site)",
        includeAll=multi, multi=multi, allValue=".*" if multi else None, refresh=2,
    )


def node_var() -> Template:
    return Template(
        name="node", label="Node", dataSource=DS, query=f'label_values({LAST_SEEN}{{site=~"$site"}}, node)',
        refresh=2,
    )


def _targets(queries: Sequence[Query], instant: bool = False, table: bool = False) -> list[Target]:
    return [
        Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i), datasource=DS, instant=instant,
               format="table" if table else "time_series")
        for i, (expr, legend) in enumerate(queries)
    ]


class Layout:
    """Places panels left to right in a 24-column grid, wrapping to a new line."""

    def __init__(self) -> None:
        self.x = self.y = self.line_h = 0

    def pos(self, w: int, h: int) -> GridPos:
        if self.x + w > 24:
            self.x, self.y, self.line_h = 0, self.y + self.line_h, 0
        p = GridPos(h=h, w=w, x=self.x, y=self.y)
        self.x += w
        self.line_h = max(self.line_h, h)
        return p

    def newline(self) -> None:
        if self.x:
            self.x, self.y, self.line_h = 0, self.y + self.line_h, 0


def timeseries(layout: Layout, title: str, queries: Sequence[Query], unit: str = "", w: int = 12, h: int = 8,
               description: str = "") -> TimeSeries:
    return TimeSeries(title=title, dataSource=DS, targets=_targets(queries), unit=unit,
                      gridPos=layout.pos(w, h), description=description or None,
                      legendDisplayMode="table", legendCalcs=["lastNotNull", "max"])


def stat(layout: Layout, title: str, query: Query, unit: str = "none", w: int = 4, h: int = 4,
         thresholds: Sequence[tuple[str, float | None]] = (("green", None),), description: str = "") -> Stat:
    steps = [{"color": c, "value": v} for c, v in thresholds]
    return Stat(title=title, dataSource=DS, targets=_targets([query], instant=True), format=unit,
                gridPos=layout.pos(w, h), reduceCalc="lastNotNull", thresholds=steps, graphMode="none",
                description=description or None)


def gauge(layout: Layout, title: str, query: Query, unit: str = "percent", w: int = 4, h: int = 6,
          max_value: float = 100, description: str = "") -> GaugePanel:
    return GaugePanel(title=title, dataSource=DS, targets=_targets([query], instant=True), format=unit,
                      gridPos=layout.pos(w, h), max=max_value, calc="lastNotNull",
                      thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.8 * max_value},
                                  {"color": "red", "value": 0.9 * max_value}],
                      description=description or None)


def bargauge(layout: Layout, title: str, query: Query, unit: str = "none", w: int = 8, h: int = 8,
             max_value: float = 100, description: str = "") -> BarGauge:
    return BarGauge(title=title, dataSource=DS, targets=_targets([query], instant=True), format=unit,
                    gridPos=layout.pos(w, h), max=max_value, calc="lastNotNull", orientation="horizontal",
                    displayMode="gradient", description=description or None)


def table(layout: Layout, title: str, queries: Sequence[Query], w: int = 24, h: int = 8,
          description: str = "") -> Table:
    """Instant queries joined on their labels, one column per query (Value #A, #B...)."""
    return Table(title=title, dataSource=DS, targets=_targets(queries, instant=True, table=True),
                 gridPos=layout.pos(w, h), description=description or None,
                 transformations=[{"id": "merge", "options": {}},
                                  {"id": "organize", "options": {"excludeByName": {"Time": True}}}])


def build(title: str, uid: str, panels: list, templates: list[Template], description: str) -> Dashboard:  # type: ignore[type-arg]
    return Dashboard(
        title=title, uid=uid, tags=TAGS, description=description, panels=panels,
        templating=Templating(list=templates), time=Time("now-6h", "now"), refresh="1m", timezone="browser",
    ).auto_panel_ids()
