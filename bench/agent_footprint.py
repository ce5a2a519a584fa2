"""Agent footprint: RSS and CPU per hour of waystation-agent beside node_exporter + Prometheus agent.

Both sides do the same job at 10s sampling: system metrics and a scrape of a Prometheus
endpoint (a real node_exporter stands in for a model server). Waystation: one agent process
(system source + scrape source), spooling and forwarding to a collector. Reference: the pair
node_exporter (system metrics) + Prometheus in agent mode scraping it and remote-writing.
The collector and the remote-write receiver are not counted.

With --all-sources the agent also runs GPU (recorded GPUs), SMART and network. SMART reads
run in a short-lived child process (agent/sources/smart_reader.py) over a replaying
smartctl, every 10 minutes as the product does. One read's CPU and peak RSS (which exists only
while a read runs) are measured apart, printed on their own line, and its CPU is added to
the agent's, amortized over the interval.

    python bench/agent_footprint.py --minutes 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ENV,
    REPO,
    cpu_seconds,
    enroll_agent,
    free_port,
    need,
    process,
    rss_bytes,
    wait_http,
)
from wire.config import parse_duration  # noqa: E402


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


SMART_RECORDING = REPO.parent / "shared" / "fixtures" / "smartctl" / "text" / "pysmart" / "tests" / "dataset" \
    / "singletests" / "nvme_0"


def smart_reader_cost(runs: int = 3) -> tuple[float, float]:
    """(CPU seconds, peak RSS bytes) of one SMART read in the reader child, the worst of `runs`."""
    request = json.dumps({"smartctl": str(REPO / "tests" / "fakes" / "smartctl-replay"), "timeout": 30,
                          "ts_ms": 0, "devices": [["/dev/nvme0", "nvme"]]}).encode()
    cpu, peak = 0.0, 0
    for _ in range(runs):
        proc = subprocess.Popen([sys.executable, "-m", "agent.sources.smart_reader"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, env=dict(ENV, SMARTCTL_REPLAY=str(SMART_RECORDING)))
        assert proc.stdin is not None
        proc.stdin.write(request)
        proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own usage, smartctl included
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"SMART reader exited {proc.returncode}")
        cpu = max(cpu, usage.ru_utime + usage.ru_stime)
        peak = max(peak, usage.ru_maxrss * 1024)
    return cpu, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--interval", default="10s")
    ap.add_argument("--all-sources", action="store_true",
                    help="also GPU (8+1+1 recorded GPUs), SMART (a recorded NVMe) and network, "
                         "via bench/agent_fixture_run.py")
    ap.add_argument("--smart-interval", default="10m", help="SMART read interval with --all-sources")
    args = ap.parse_args()
    prometheus = need("prometheus", "prometheus")
    node_exporter = need("prometheus-node-exporter", "prometheus-node-exporter")
    with tempfile.TemporaryDirectory(prefix="ws-footprint-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        ne_port, recv_port, pa_port, coll_port = free_port(), free_port(), free_port(), free_port()
        ne = stack.enter_context(process(
            [node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}"], work / "ne.log"))
        wait_http(f"http://127.0.0.1:{ne_port}/metrics")
        (work / "receiver.yml").write_text("global:\n  scrape_interval: 1h\n")
        (work / "pa.yml").write_text(
            f"global:\n  scrape_interval: {args.interval}\n"
            "scrape_configs:\n  - job_name: node\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{ne_port}']}}]\n"
            f"remote_write:\n  - url: http://127.0.0.1:{recv_port}/api/v1/write\n")
        stack.enter_context(process(
            [prometheus, "--config.file", str(work / "receiver.yml"), "--storage.tsdb.path",
             str(work / "recv"), "--web.enable-remote-write-receiver",
             f"--web.listen-address=127.0.0.1:{recv_port}"], work / "recv.log"))
        pa = stack.enter_context(process(
            [prometheus, "--enable-feature=agent", "--config.file", str(work / "pa.yml"),
             "--storage.agent.path", str(work / "pa"), f"--web.listen-address=127.0.0.1:{pa_port}"],
            work / "pa.log"))
        stack.enter_context(process(
            [sys.executable, "-m", "collector", "serve", "--data-dir", str(work / "collector"),
             "--listen", f"127.0.0.1:{coll_port}"], work / "collector.log"))
        wait_http(f"http://127.0.0.1:{coll_port}/healthz")
        cfg = work / "agent.toml"
        cfg.write_text(
            f'site = "bench"\nnode = "footprint"\nstate_dir = "{work}/agent"\n'
            f'[uplink]\nurl = "http://127.0.0.1:{coll_port}"\n'
            f'[sources.system]\ninterval = "{args.interval}"\n'
            + (f'[sources.gpu]\ninterval = "{args.interval}"\n'
               f'[sources.smart]\ninterval = "{args.smart_interval}"\n'
               f'smartctl = "{REPO}/tests/fakes/smartctl-replay"\n'
               'output = "text"\n'  # its recorded NVMe (SMART_RECORDING) is pySMART's plain text
               '[[sources.smart.devices]]\nname = "/dev/nvme0"\ntype = "nvme"\n'
               f'[sources.network]\ninterval = "{args.interval}"\n'
               if args.all_sources else
               '[sources.gpu]\nenabled = false\n[sources.smart]\nenabled = false\n'
               '[sources.network]\nenabled = false\n')
            + f'[[sources.scrape]]\nname = "node"\nurl = "http://127.0.0.1:{ne_port}/metrics"\n'
            f'interval = "{args.interval}"\n')
        enroll_agent(work, work / "collector", cfg, "bench", "footprint")
        runner = ([sys.executable, str(Path(__file__).parent / "agent_fixture_run.py")] if args.all_sources
                  else [sys.executable, "-m", "agent", "run"])
        ws = stack.enter_context(process([*runner, "--config", str(cfg)], work / "agent.log",
                                         env=dict(ENV, SMARTCTL_REPLAY=str(SMART_RECORDING))))
        time.sleep(20)  # start-up costs are not steady state
        pids = {"waystation-agent": [ws.pid], "node_exporter + Prometheus agent": [ne.pid, pa.pid]}
        # The agent's own CPU: a SMART read's child falls in a short window or not (every
        # 10 minutes, on the clock), so it is measured apart and added amortized below.
        cpu0 = {k: sum(cpu_seconds(p, children=False) for p in v) for k, v in pids.items()}
        t0 = time.monotonic()
        print(f"measuring for {args.minutes:g} minutes at {args.interval} sampling ...", flush=True)
        time.sleep(args.minutes * 60)
        elapsed_h = (time.monotonic() - t0) / 3600
        print(f"\n{'process':<44}{'RSS MB':>9}{'peak MB':>9}{'CPU s/hour':>12}")
        rows = {}
        for name, plist in pids.items():
            cpu_h = (sum(cpu_seconds(p, children=False) for p in plist) - cpu0[name]) / elapsed_h
            rss = sum(rss_bytes(p) for p in plist) / 1e6
            peak = sum(peak_rss(p) for p in plist) / 1e6
            rows[name] = (rss, cpu_h)
            print(f"{name:<44}{rss:>9.1f}{peak:>9.1f}{cpu_h:>12.1f}")
        ws_rss, ws_cpu = rows["waystation-agent"]
        ref_rss, ref_cpu = rows["node_exporter + Prometheus agent"]
        if args.all_sources:
            cpu, peak = smart_reader_cost()
            per_hour = cpu * 3600 / parse_duration(args.smart_interval)
            print(f"{'+ SMART reader child (one read, amortized)':<44}{'-':>9}{peak / 1e6:>9.1f}{per_hour:>12.1f}")
            print(f"  one read: {cpu:.2f} CPU s, {peak / 1e6:.1f} MB peak for its lifetime, "
                  f"every {args.smart_interval}")
            ws_cpu += per_hour
        print(f"\nwaystation/reference: RSS {ws_rss / ref_rss:.2f}x, CPU {ws_cpu / max(ref_cpu, 1e-9):.2f}x"
              f" (agent CPU {ws_cpu:.1f} s/hour)  (targets: RSS <= 40 MB, CPU <= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
