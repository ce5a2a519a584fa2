"""A real Prometheus scraping a real collector fed by a real agent stores the fleet series at
the agent's own sample times, so rate() over them is right: per CPU, the modes' rates sum to
one second per second, and CPU busy stays within 0..100 %."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import wire
from tests.conftest import free_port
from tests.e2e.test_alerting import Proc
from tests.integration.harness import Agent, Collector, http_get, wait_for

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="needs prometheus (apt-get install; scripts/test.sh does)"),
]

# A batch every 2 s carrying 1 s samples: /metrics changes once per batch and shows only each
# series' newest point, the situation in which scrape-time stamps made rate() swing.
FAST_AGENT = """
[summary]
window = "2s"
[sources.system]
interval = "1s"
"""
NODE = 'site="lab",node="node-1"'
IDLE0 = f'node_cpu_seconds_total{{{NODE},cpu="0",mode="idle"}}'
SPAN_S = 24  # seconds of stored samples the checks need


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    collector = Collector(tmp_path / "collector")
    agent = Agent(tmp_path / "agent", collector.url, extra_toml=FAST_AGENT, site="lab", node="node-1")
    collector.enroll(agent.site, agent.node, agent.keygen())
    collector.start()
    agent.start()
    prom: Proc | None = None
    try:
        port = free_port()
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "waystation", "honor_labels": True,
                                "static_configs": [{"targets": [f"127.0.0.1:{collector.port}"]}]}],
        }))
        prom = Proc([str(PROMETHEUS), f"--config.file={prom_dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                    tmp_path / "prometheus.log")
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert prom is not None and prom.alive()
            try:
                return http_get(f"{url}/-/ready", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 60, "prometheus ready")
        yield {"collector": collector, "prom": url}
    finally:
        agent.stop()
        if prom is not None:
            prom.stop()
        collector.stop()


def query(prom: str, expr: str, at_ms: int | None = None) -> list[dict[str, Any]]:
    params = {"query": expr} | ({} if at_ms is None else {"time": f"{at_ms / 1000:.3f}"})
    status, body = http_get(f"{prom}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=5)
    assert status == 200, body[:300]
    return json.loads(body)["data"]["result"]  # type: ignore[no-any-return]


def stored(prom: str, selector: str) -> list[tuple[int, float]]:
    """The raw samples Prometheus stored for one series: (timestamp ms, value)."""
    result = query(prom, f"{selector}[10m]")
    return [(round(float(t) * 1000), float(v)) for t, v in result[0]["values"]] if result else []


def agent_sample_times(collector: Collector) -> set[int]:
    """Every time at which the agent sampled cpu 0's idle counter, from the recorded batches."""
    times: set[int] = set()
    for (raw,) in collector.ledger_rows("SELECT frame FROM batches WHERE kind = ?", (int(wire.Kind.DATA),)):
        for s in collector.ledger_series(bytes(raw)):  # wire v1 or v2
            if s.name == "node_cpu_seconds_total" and dict(s.labels) == {"cpu": "0", "mode": "idle"}:
                times.update(s.timestamps_ms)
    return times


def test_prometheus_stores_the_agents_sample_times_and_rates_add_up(stack: dict[str, Any]) -> None:
    prom, collector = stack["prom"], stack["collector"]
    samples = wait_for(lambda: (s := stored(prom, IDLE0)) and s[-1][0] - s[0][0] >= SPAN_S * 1000 and s,
                       90, f"{SPAN_S}s of stored samples")
    times = [t for t, _ in samples]
    # Stamped by the agent, not by the scrape: each stored time is one the agent sampled at.
    assert set(times) <= agent_sample_times(collector)
    assert times == sorted(set(times))
    # Every CPU series of the node was sampled together: the same times throughout.
    for cpu in query(prom, f'count by (cpu, mode) (node_cpu_seconds_total{{{NODE}}})'):
        labels = cpu["metric"]
        sel = f'node_cpu_seconds_total{{{NODE},cpu="{labels["cpu"]}",mode="{labels["mode"]}"}}'
        assert [t for t, _ in stored(prom, sel)][: len(times)] == times, sel

    # Several evaluations, each at a stored sample time over a range reaching back exactly to
    # an earlier one (plus 1 ms, so the range holds it whether its start is open or closed):
    # rate() then divides the increase by the agent's own time between the two samples.
    checks = 0
    for end in range(len(times) - 1, 0, -2):
        start = next((i for i in range(end, -1, -1) if times[end] - times[i] >= 10_000), None)
        if start is None or checks == 4:
            break
        window = f"{times[end] - times[start] + 1}ms"
        per_cpu = query(prom, f"sum by (cpu) (rate(node_cpu_seconds_total{{{NODE}}}[{window}]))", times[end])
        assert per_cpu, window
        for r in per_cpu:
            assert abs(float(r["value"][1]) - 1.0) <= 0.02, (window, r)
        # CPU busy as the node dashboard draws it.
        busy = query(prom, f'100 * (1 - avg by (node) (rate(node_cpu_seconds_total{{{NODE},mode="idle"}}'
                           f"[{window}])))", times[end])
        assert len(busy) == 1 and 0.0 <= float(busy[0]["value"][1]) <= 100.0, (window, busy)
        checks += 1
    assert checks == 4
