"""A full state_dir filesystem: the agent keeps sampling, says so, and recovers without loss."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Agent, Collector, serve_page, wait_for


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a 3 MiB tmpfs as the agent's state_dir")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_sampling_reports_and_recovers(tmp_path: Path, small_fs: Path,
                                                       shared_fixtures: Path) -> None:
    page = (shared_fixtures / "metrics" / "node_exporter.prom").read_bytes()
    with serve_page(page) as url:
        collector = Collector(tmp_path / "collector")
        agent = Agent(tmp_path, collector.url, extra_toml=(
            '[spool]\nmax_bytes = "64MiB"\n[summary]\nwindow = "500ms"\n'
            f'[sources.system]\ninterval = "500ms"\n[[sources.scrape]]\nname = "node"\n'
            f'url = "{url}"\ninterval = "500ms"\n'))
        agent.state_dir = small_fs / "agent"
        agent.config.write_text(agent.config.read_text().replace(
            str(tmp_path / "agent-state"), str(agent.state_dir)))
        collector.enroll(agent.site, agent.node, agent.keygen())
        # Leave ~300 KiB free so the spool fills it within seconds.
        filler = small_fs / "filler"
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 300 * 1024))
        agent.start()
        try:
            wait_for(lambda: "cannot write spool" in agent.log.read_text(), 60,
                     "the agent to hit the full disk")
            full_at = time.time()
            st = agent.status()
            assert st["state_dir_problem"] and "full" in st["state_dir_problem"]
            time.sleep(5)
            assert agent.proc is not None and agent.proc.poll() is None, "the agent must not exit"
            freed_at = time.time()
            filler.unlink()
            collector.start()
            wait_for(lambda: "spool writable again" in agent.log.read_text(), 30,
                     "the agent to sign what it held")

            def write_errors() -> float:
                for fam in text_string_to_metric_families(collector.metrics()):
                    for s in fam.samples:
                        if s.name == "waystation_agent_spool_write_errors_total":
                            return s.value
                return 0.0

            assert wait_for(write_errors, 30, "the write errors reported at the collector") >= 1
            assert agent.proc is not None and agent.proc.poll() is None
            # What was sampled while the disk was full was held and delivered, not lost.
            def sampled_while_full() -> list[int]:
                stamps = set()
                for (frame,) in collector.ledger_rows("SELECT frame FROM batches WHERE kind = 0"):
                    for series in collector.ledger_series(frame):  # wire v1 or v2
                        if series.name == "node_load1":
                            stamps.update(series.timestamps_ms)
                return sorted(t for t in stamps if full_at + 0.5 < t / 1000 < freed_at - 0.5)

            # At 500 ms sampling, ~5 s of full disk holds about ten points; allow for edges.
            assert len(wait_for(lambda: (d := sampled_while_full()) and len(d) >= 5 and d, 60,
                                "samples from the full-disk period at the collector")) >= 5
        finally:
            agent.stop()
            collector.stop()
