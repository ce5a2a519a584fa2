"""Bytes on the wire per sample: Waystation vs Prometheus agent mode, same node_exporter, same minutes.

Prometheus (Debian package, --enable-feature=agent) scrapes node_exporter every 1s and
remote-writes to a second Prometheus (--web.enable-remote-write-receiver); its own
prometheus_remote_storage_bytes_total / _samples_total give its figure. Waystation's agent
scrapes the same node_exporter every 1s with window = interval (raw samples) and signs
batches every --flush seconds; its figure is every byte of every batch the collector
received (header, signature and framing included) over the node_exporter samples in them.

    python bench/uplink_bytes.py --minutes 3
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wire  # noqa: E402
from bench.common import (  # noqa: E402
    enroll_agent,
    free_port,
    get,
    metric_value,
    need,
    process,
    wait_http,
)


def waystation_figures(data_dir: Path, node: str) -> tuple[int, int]:
    """(every batch byte, node_exporter samples) one agent delivered, from the collector's ledger."""
    db = sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True)
    total_bytes = samples = 0
    for (frame,) in db.execute("SELECT frame FROM batches WHERE node = ?", (node,)):
        f = wire.parse_frame(frame)
        total_bytes += len(frame)
        if f.header.kind != wire.Kind.DATA:
            continue
        for s in wire.decode_series(wire.decompress_payload(f, 1 << 30)):
            if dict(s.labels).get("job") == "node":
                samples += len(s.values)
    db.close()
    return total_bytes, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--flush", default="60s,10s", help="Waystation batch intervals to measure")
    args = ap.parse_args()
    prometheus = need("prometheus", "prometheus")
    node_exporter = need("prometheus-node-exporter", "prometheus-node-exporter")
    flushes = args.flush.split(",")

    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        work = Path(tmp)
        ne_port, recv_port, agent_port, coll_port = free_port(), free_port(), free_port(), free_port()
        ne_url = f"http://127.0.0.1:{ne_port}/metrics"
        (work / "agent-mode.yml").write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: node\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{ne_port}']}}]\n"
            f"remote_write:\n  - url: http://127.0.0.1:{recv_port}/api/v1/write\n"
        )
        (work / "receiver.yml").write_text("global:\n  scrape_interval: 1h\n")
        collector_dir = work / "collector"
        with ExitStack() as agents, process([node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}"],
                     work / "ne.log"):
            wait_http(ne_url)
            with process([prometheus, "--config.file", str(work / "receiver.yml"),
                          "--storage.tsdb.path", str(work / "recv-data"),
                          "--web.enable-remote-write-receiver",
                          f"--web.listen-address=127.0.0.1:{recv_port}"], work / "recv.log"), \
                 process([prometheus, "--enable-feature=agent", "--config.file",
                          str(work / "agent-mode.yml"), "--storage.agent.path",
                          str(work / "agent-data"),
                          f"--web.listen-address=127.0.0.1:{agent_port}"], work / "pa.log"), \
                 process([sys.executable, "-m", "collector", "serve", "--data-dir",
                          str(collector_dir), "--listen", f"127.0.0.1:{coll_port}"],
                         work / "collector.log"):
                wait_http(f"http://127.0.0.1:{coll_port}/healthz")
                for i, flush in enumerate(flushes):
                    cfg = work / f"agent-{i}.toml"
                    cfg.write_text(
                        f'site = "bench"\nnode = "flush-{flush}"\nstate_dir = "{work}/agent-{i}"\n'
                        f'[uplink]\nurl = "http://127.0.0.1:{coll_port}"\n'
                        f'[summary]\nwindow = "1s"\nflush_interval = "{flush}"\n'
                        # Only the scrape: every byte sent is charged to node_exporter's samples.
                        '[sources.system]\nenabled = false\n[sources.gpu]\nenabled = false\n'
                        '[sources.smart]\nenabled = false\n[sources.network]\nenabled = false\n'
                        f'[[sources.scrape]]\nname = "node"\nurl = "{ne_url}"\ninterval = "1s"\n'
                    )
                    enroll_agent(work, collector_dir, cfg, "bench", f"flush-{flush}")
                    agents.enter_context(process([sys.executable, "-m", "agent", "run", "--config",
                                                  str(cfg)], work / f"agent-{i}.log"))
                print(f"measuring for {args.minutes:g} minutes ...", flush=True)
                time.sleep(args.minutes * 60)
                page = get(f"http://127.0.0.1:{agent_port}/metrics")
                agents.close()
                time.sleep(2)
        prom_bytes = metric_value(page, "prometheus_remote_storage_bytes_total")
        prom_samples = metric_value(page, "prometheus_remote_storage_samples_total")
        prom = prom_bytes / max(prom_samples, 1)
        print()
        print(f"{'sender':<44}{'bytes':>12}{'samples':>12}{'B/sample':>10}{'vs Prom':>9}")
        print(f"{'Prometheus agent mode (remote_write)':<44}{prom_bytes:>12.0f}{prom_samples:>12.0f}"
              f"{prom:>10.2f}{1:>9.2f}")
        for flush in flushes:
            nbytes, nsamples = waystation_figures(collector_dir, f"flush-{flush}")
            per = nbytes / max(nsamples, 1)
            label = f"Waystation, window 1s, batch every {flush}"
            print(f"{label:<44}{nbytes:>12}{nsamples:>12}{per:>10.2f}{per / prom:>9.3f}")
        print("\n(target: <= 1.0 B/sample for Waystation, signatures and framing included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
