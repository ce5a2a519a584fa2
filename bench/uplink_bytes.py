"""Bytes on the uplink per sample: Waystation vs Prometheus agent mode and vmagent, one run.

One node_exporter is scraped every second by Prometheus in agent mode (remote_write to a
second Prometheus), by vmagent (Debian's victoria-metrics package; remote_write to a
single-node VictoriaMetrics, so it speaks its own zstd protocol) and by one Waystation
agent per flush interval (window = interval, so raw samples; wire v2 by default). Every
sender's upstream goes through its own counting TCP relay, so each figure is every byte
sent, request lines, HTTP headers, bodies, signatures and (for Waystation) series tables
included. Samples are what each sender says it delivered (Prometheus'
prometheus_remote_storage_samples_total, vmagent's rows sent) or, for Waystation, the
node_exporter samples in the batches the collector's ledger holds.

Targets (issue 13): Waystation at most 1/10 of Prometheus' bytes per sample at a 1 s
flush, 1/25 at 10 s, 1/50 at 60 s.

    python bench/uplink_bytes.py --minutes 3
    python bench/uplink_bytes.py --minutes 3 --wire-version 1   # the v1 format, for comparison
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ByteRelay,
    enroll_agent,
    free_port,
    get,
    ledger_batches,
    metric_value,
    need,
    process,
    wait_http,
)

TARGETS = {"1s": 10, "10s": 25, "60s": 50}


def waystation_samples(data_dir: Path, node: str) -> int:
    """node_exporter samples in the batches one agent delivered (from the collector's ledger)."""
    samples = 0
    for _frame, series in ledger_batches(data_dir / "ledger.db", node):
        for s in series:
            if dict(s.labels).get("job") == "node":  # type: ignore[attr-defined]
                samples += len(s.values)  # type: ignore[attr-defined]
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--flush", default="1s,10s,60s", help="Waystation batch intervals to measure")
    ap.add_argument("--wire-version", type=int, default=2, choices=(1, 2), help="the agents' [uplink] wire_version")
    args = ap.parse_args()
    prometheus = need("prometheus", "prometheus")
    node_exporter = need("prometheus-node-exporter", "prometheus-node-exporter")
    vmagent = need("vmagent", "victoria-metrics")
    victoria = need("victoria-metrics", "victoria-metrics")
    flushes = args.flush.split(",")

    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp, ExitStack() as relays:
        work = Path(tmp)
        ne_port, recv_port, agent_port, coll_port = free_port(), free_port(), free_port(), free_port()
        vm_port, vmagent_port = free_port(), free_port()
        prom_relay = ByteRelay(recv_port)
        vm_relay = ByteRelay(vm_port)
        ws_relays = {flush: ByteRelay(coll_port) for flush in flushes}
        for relay in (prom_relay, vm_relay, *ws_relays.values()):
            relays.callback(relay.close)
        ne_url = f"http://127.0.0.1:{ne_port}/metrics"
        scrape = ("global:\n  scrape_interval: 1s\n"
                  "scrape_configs:\n  - job_name: node\n"
                  f"    static_configs: [{{targets: ['127.0.0.1:{ne_port}']}}]\n")
        (work / "agent-mode.yml").write_text(
            scrape + f"remote_write:\n  - url: http://127.0.0.1:{prom_relay.port}/api/v1/write\n")
        (work / "vmagent.yml").write_text(scrape)
        (work / "receiver.yml").write_text("global:\n  scrape_interval: 1h\n")
        collector_dir = work / "collector"
        with ExitStack() as agents, process([node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}"],
                     work / "ne.log"):
            wait_http(ne_url)
            with process([prometheus, "--config.file", str(work / "receiver.yml"),
                          "--storage.tsdb.path", str(work / "recv-data"),
                          "--web.enable-remote-write-receiver",
                          f"--web.listen-address=127.0.0.1:{recv_port}"], work / "recv.log"), \
                 process([victoria, f"-storageDataPath={work / 'vm-data'}", f"-httpListenAddr=127.0.0.1:{vm_port}",
                          "-retentionPeriod=1d"], work / "vm.log"), \
                 process([sys.executable, "-m", "collector", "serve", "--data-dir",
                          str(collector_dir), "--listen", f"127.0.0.1:{coll_port}"],
                         work / "collector.log"):
                wait_http(f"http://127.0.0.1:{coll_port}/healthz")
                wait_http(f"http://127.0.0.1:{vm_port}/health")
                for i, flush in enumerate(flushes):
                    cfg = work / f"agent-{i}.toml"
                    cfg.write_text(
                        f'site = "bench"\nnode = "flush-{flush}"\nstate_dir = "{work}/agent-{i}"\n'
                        f'[uplink]\nurl = "http://127.0.0.1:{ws_relays[flush].port}"\n'
                        f"wire_version = {args.wire_version}\n"
                        f'[summary]\nwindow = "1s"\nflush_interval = "{flush}"\n'
                        # Only the scrape: every byte sent is charged to node_exporter's samples.
                        '[sources.system]\nenabled = false\n[sources.gpu]\nenabled = false\n'
                        '[sources.smart]\nenabled = false\n[sources.network]\nenabled = false\n'
                        f'[[sources.scrape]]\nname = "node"\nurl = "{ne_url}"\ninterval = "1s"\n'
                    )
                    enroll_agent(work, collector_dir, cfg, "bench", f"flush-{flush}")
                # The references and the agents start together and run for the same minutes.
                agents.enter_context(process([prometheus, "--enable-feature=agent", "--config.file",
                                              str(work / "agent-mode.yml"), "--storage.agent.path",
                                              str(work / "agent-data"),
                                              f"--web.listen-address=127.0.0.1:{agent_port}"], work / "pa.log"))
                agents.enter_context(process([vmagent, f"-promscrape.config={work / 'vmagent.yml'}",
                                              f"-remoteWrite.url=http://127.0.0.1:{vm_relay.port}/api/v1/write",
                                              f"-remoteWrite.tmpDataPath={work / 'vmagent-data'}",
                                              f"-httpListenAddr=127.0.0.1:{vmagent_port}"], work / "vmagent.log"))
                for i, _flush in enumerate(flushes):
                    agents.enter_context(process([sys.executable, "-m", "agent", "run", "--config",
                                                  str(work / f"agent-{i}.toml")], work / f"agent-{i}.log"))
                print(f"measuring for {args.minutes:g} minutes ...", flush=True)
                time.sleep(args.minutes * 60)
                # Stopping flushes what each sender holds (the agents send their last batch).
                prom_page = get(f"http://127.0.0.1:{agent_port}/metrics")
                vm_page = get(f"http://127.0.0.1:{vmagent_port}/metrics")
                agents.close()
                time.sleep(2)
        prom_samples = metric_value(prom_page, "prometheus_remote_storage_samples_total")
        prom_payload = metric_value(prom_page, "prometheus_remote_storage_bytes_total")
        vm_samples = metric_value(vm_page, "vmagent_remotewrite_block_size_rows_sum")
        vm_payload = metric_value(vm_page, "vmagent_remotewrite_bytes_sent_total")
        prom = prom_relay.upstream / max(prom_samples, 1)
        print()
        print(f"{'sender':<46}{'uplink bytes':>13}{'payload':>11}{'samples':>10}{'B/sample':>10}"
              f"{'vs Prom':>9}{'target':>8}")
        print(f"{'Prometheus agent mode (remote_write)':<46}{prom_relay.upstream:>13}{prom_payload:>11.0f}"
              f"{prom_samples:>10.0f}{prom:>10.2f}{1:>9.3f}{'':>8}")
        vm = vm_relay.upstream / max(vm_samples, 1)
        print(f"{'vmagent (VictoriaMetrics remote_write)':<46}{vm_relay.upstream:>13}{vm_payload:>11.0f}"
              f"{vm_samples:>10.0f}{vm:>10.2f}{vm / prom:>9.3f}{'':>8}")
        for flush in flushes:
            nsamples = waystation_samples(collector_dir, f"flush-{flush}")
            nbytes = ws_relays[flush].upstream
            per = nbytes / max(nsamples, 1)
            target = f"1/{TARGETS[flush]}" if flush in TARGETS else ""
            label = f"Waystation v{args.wire_version}, window 1s, batch every {flush}"
            print(f"{label:<46}{nbytes:>13}{'':>11}{nsamples:>10}{per:>10.2f}{per / prom:>9.3f}{target:>8}")
        print("\n(uplink bytes: everything each sender wrote to its relay; payload: the sender's own count "
              "of request bodies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
