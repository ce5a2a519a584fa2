"""End to end on loopback: a real agent feeds a real collector, a real Prometheus scrapes it and
evaluates rules/ (a copy with short `for:` and staleness thresholds), and a real Alertmanager
receives the alerts. Stopping the agent makes NodeDown arrive; a tampered batch makes
BatchTamperingDetected arrive."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import wire
from tests.conftest import REPO, free_port
from tests.integration.harness import Agent, Collector, http_get, wait_for

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None or ALERTMANAGER is None,
                       reason="needs prometheus and prometheus-alertmanager (apt-get install; scripts/test.sh does)"),
]

FAST_AGENT = """
[summary]
window = "1s"
[sources.system]
interval = "1s"
"""
STALE_AFTER_S = 5  # NodeDown/SiteDown thresholds in the test's copy of the rules


def fast_rules(src: Path, dst: Path) -> None:
    """The shipped rules with every `for:` dropped, group intervals removed (global 1s applies)
    and the silence thresholds of NodeDown/SiteDown cut to seconds. The shipped files stay as they are."""
    doc = yaml.safe_load(src.read_text())
    for group in doc["groups"]:
        group.pop("interval", None)
        for rule in group["rules"]:
            rule.pop("for", None)
            if rule.get("alert") in ("NodeDown", "SiteDown"):
                rule["expr"], n = re.subn(r">\s*\d+\s*$", f"> {STALE_AFTER_S}", rule["expr"].strip())
                assert n == 1, rule["expr"]
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.log.name}: exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def get_json(url: str) -> Any:
    status, body = http_get(url, timeout=5)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def am_alerts(am_url: str) -> list[dict[str, Any]]:
    return get_json(f"{am_url}/api/v2/alerts?active=true&silenced=false&inhibited=false")  # type: ignore[no-any-return]


def arrived(am_url: str, alertname: str, **labels: str) -> list[dict[str, Any]]:
    return [a for a in am_alerts(am_url)
            if a["labels"].get("alertname") == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    procs: list[Proc] = []
    collector = Collector(tmp_path / "collector")
    agent = Agent(tmp_path / "agent", collector.url, extra_toml=FAST_AGENT, site="lab", node="node-1")
    collector.enroll(agent.site, agent.node, agent.keygen())
    collector.start()
    agent.start()
    try:
        am_port, prom_port = free_port(), free_port()
        am_dir = tmp_path / "alertmanager"
        am_dir.mkdir()
        (am_dir / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "noc", "group_by": ["alertname", "site", "node"],
                      "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "noc"}],
        }))
        procs.append(Proc([str(ALERTMANAGER), f"--config.file={am_dir / 'alertmanager.yml'}",
                           f"--storage.path={am_dir / 'data'}", f"--web.listen-address=127.0.0.1:{am_port}",
                           "--cluster.listen-address="], tmp_path / "alertmanager.log"))
        am_url = f"http://127.0.0.1:{am_port}"

        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        rule_files = []
        for src in sorted((REPO / "rules").glob("*.rules.yml")):
            fast_rules(src, prom_dir / src.name)
            rule_files.append(str(prom_dir / src.name))
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rule_files,
            "scrape_configs": [{"job_name": "waystation", "honor_labels": True,
                                "static_configs": [{"targets": [f"127.0.0.1:{collector.port}"]}]}],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        }))
        procs.append(Proc([str(PROMETHEUS), f"--config.file={prom_dir / 'prometheus.yml'}",
                           f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                          tmp_path / "prometheus.log"))
        prom_url = f"http://127.0.0.1:{prom_port}"

        def ready(url: str, proc: Proc) -> bool:
            proc.alive()
            try:
                return http_get(url, timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(lambda: ready(f"{am_url}/-/ready", procs[0]), 30, "alertmanager ready")
        wait_for(lambda: ready(f"{prom_url}/-/ready", procs[1]), 60, "prometheus ready")
        yield {"collector": collector, "agent": agent, "am": am_url, "prom": prom_url, "procs": procs}
    finally:
        agent.stop()
        for p in reversed(procs):
            p.stop()
        collector.stop()


def query(prom_url: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prom_url}/api/v1/query?query={urllib.request.quote(expr)}"
    return get_json(url)["data"]["result"]  # type: ignore[no-any-return]


def node_reports(stack: dict[str, Any]) -> None:
    """Prometheus has the node's last-seen series and the rule groups evaluate."""
    wait_for(lambda: query(stack["prom"], 'waystation_node_last_seen_timestamp_seconds{site="lab",node="node-1"}'),
             60, "prometheus scraping the node's last-seen series")
    wait_for(lambda: query(stack["prom"], "site_node:waystation_node_last_seen:age_seconds"), 30,
             "recording rules evaluated")


def test_stopping_the_agent_makes_node_down_arrive(stack: dict[str, Any]) -> None:
    node_reports(stack)
    # While the agent delivers every second, the node is not down.
    wait_for(lambda: query(stack["prom"], 'ALERTS{alertname="NodeDown"}') == [] and
             query(stack["prom"], "site_node:waystation_node_last_seen:age_seconds < 3"), 30,
             "fresh node, no NodeDown")
    assert arrived(stack["am"], "NodeDown") == []
    stack["agent"].stop()
    alerts = wait_for(lambda: arrived(stack["am"], "NodeDown", site="lab", node="node-1"), 90,
                      "NodeDown at Alertmanager")
    a = alerts[0]
    assert a["labels"]["severity"] == "warning"
    assert "node-1" in a["annotations"]["description"] and "lab" in a["annotations"]["description"]
    assert a["annotations"]["runbook_url"] == "docs/runbooks.md#nodedown"


def test_tampered_batch_makes_batch_tampering_detected_arrive(stack: dict[str, Any]) -> None:
    node_reports(stack)
    collector: Collector = stack["collector"]
    wait_for(lambda: collector.ledger_rows("SELECT frame FROM batches ORDER BY seq DESC LIMIT 1"), 30,
             "a recorded batch")
    assert arrived(stack["am"], "BatchTamperingDetected") == []
    frame = bytearray(collector.ledger_rows("SELECT frame FROM batches ORDER BY seq DESC LIMIT 1")[0][0])
    frame[-wire.SIGNATURE_LEN - 1] ^= 0x01  # one payload byte changed after signing
    req = urllib.request.Request(f"{collector.url}/v1/batches", data=bytes(frame), method="POST",
                                 headers={"Content-Type": "application/x-waystation-batch"})
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("tampered batch accepted")
    except urllib.error.HTTPError as exc:
        assert json.loads(exc.read())["result"] == "bad_signature"
    alerts = wait_for(lambda: arrived(stack["am"], "BatchTamperingDetected"), 90,
                      "BatchTamperingDetected at Alertmanager")
    a = alerts[0]
    assert a["labels"]["severity"] == "critical"
    assert a["labels"]["result"] == "bad_signature"
    assert a["annotations"]["runbook_url"] == "docs/runbooks.md#batchtamperingdetected"
    # The node itself keeps delivering: no NodeDown from a forged batch.
    assert arrived(stack["am"], "NodeDown") == []
