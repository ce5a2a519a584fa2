"""Freshness after an outage: from the collector answering again to the newest window there.

A real collector and two real agents (system source every second, a batch every
`--window`) on loopback, with the default [uplink] config except one knob: agent "probe"
probes the collector every `--probe-interval` while it cannot reach it (the default), agent
"noprobe" has probing off (`probe_interval = "0s"`), so it waits out its backoff: the
reference, measured in the same outages. Each trial stops the collector (SIGTERM, or
SIGKILL with --kill), waits `--outage` seconds, starts it again on the same port and data
dir, and polls its /healthz every 10 ms. The moment of the first 200 is "answering again";
at that moment the newest batch each agent has signed is read from its spool, and the
figure is the collector's received_at of that batch (or a newer one) minus that moment.

    python bench/uplink_freshness.py [--trials 5] [--outage 20] [--window 2s]

The quick run above takes about three minutes. The setup the freshness issue measured,
the agent's default window (a batch every 60 s) and minute-long outages, takes 10-15:

    python bench/uplink_freshness.py --trials 5 --outage 60 --window 60s

An outage shorter than the window may sign nothing new while the collector is down; such
a trial has no newest window to wait for and is reported as n/a.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.spool import Spool  # noqa: E402
from bench.common import ENV, enroll_agent, free_port, process, wait_http  # noqa: E402
from wire.config import parse_duration  # noqa: E402

SITE = "bench"
AGENTS = {"probe": "", "noprobe": 'probe_interval = "0s"\n'}


class Collector:
    """The collector process, stopped and started again on one port and data dir."""

    def __init__(self, work: Path, port: int, kill: bool) -> None:
        self.data_dir = work / "collector"
        self.port = port
        self.kill = kill
        self.log = work / "collector.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "collector", "serve", "--data-dir", str(self.data_dir),
                 "--listen", f"127.0.0.1:{self.port}"], stdout=fh, stderr=subprocess.STDOUT, env=ENV)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if self.kill else signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def answering_at(self, timeout: float = 60.0) -> float:
        """Poll /healthz every 10 ms; the wall time of its first 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return time.time()
            except OSError:
                pass
            time.sleep(0.01)
        raise SystemExit(f"the collector did not answer within {timeout}s (see {self.log})")

    def received_at(self, node: str, seq: int) -> float | None:
        """When the collector received `seq` of `node` or any newer batch, if it has."""
        db = sqlite3.connect(f"file:{self.data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
        try:
            row = db.execute("SELECT MIN(received_at) FROM batches WHERE site = ? AND node = ? AND seq >= ?",
                             (SITE, node, seq)).fetchone()
        finally:
            db.close()
        return None if row is None or row[0] is None else float(row[0])

    def complete(self, node: str) -> int:
        db = sqlite3.connect(f"file:{self.data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
        try:
            row = db.execute("SELECT complete_through FROM nodes WHERE site = ? AND node = ?",
                             (SITE, node)).fetchone()
        finally:
            db.close()
        return 0 if row is None else int(row[0])


def newest_signed(state_dir: Path) -> int:
    """The agent's newest seq so far (0 while its spool is still being created)."""
    try:
        spool = Spool(state_dir / "spool.db", timeout_s=5.0, readonly=True)
        try:
            return spool.stats().next_seq - 1
        finally:
            spool.close()
    except sqlite3.Error:
        return 0


def wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--outage", type=float, default=20.0, help="seconds the collector stays down")
    ap.add_argument("--window", default="2s",
                    help="the agents' summary window, a batch each (the agent's default: 60s)")
    ap.add_argument("--probe-interval", default="500ms", help="agent 'probe' (the default is 500ms)")
    ap.add_argument("--kill", action="store_true", help="SIGKILL the collector instead of SIGTERM")
    args = ap.parse_args()
    window_s = parse_duration(args.window)
    # Waits that span a window (the first batch, catching up) scale with it.
    patience = 60.0 + 3 * window_s
    with tempfile.TemporaryDirectory(prefix="ws-freshness-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        collector = Collector(work, free_port(), args.kill)
        stack.callback(collector.stop)
        collector.start()
        wait_http(f"http://127.0.0.1:{collector.port}/healthz")
        for node, uplink_extra in AGENTS.items():
            probe = f'probe_interval = "{args.probe_interval}"\n' if node == "probe" else uplink_extra
            cfg = work / f"{node}.toml"
            cfg.write_text(
                f'site = "{SITE}"\nnode = "{node}"\nstate_dir = "{work / node}"\n'
                f'[uplink]\nurl = "http://127.0.0.1:{collector.port}"\n{probe}'
                f'[summary]\nwindow = "{args.window}"\n[sources.system]\ninterval = "1s"\n'
                '[sources.gpu]\nenabled = false\n[sources.smart]\nenabled = false\n'
                '[sources.network]\nenabled = false\n')
            enroll_agent(work, collector.data_dir, cfg, SITE, node)
            stack.enter_context(process([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                        work / f"{node}.log"))
        print(f"{args.trials} outages of {args.outage:g} s, a batch every {args.window}, "
              f"probe every {args.probe_interval} (reference: probing off); default backoff 1s..10s")
        print(f"\n{'trial':>5}  {'probe s':>9}  {'noprobe s':>9}")
        figures: dict[str, list[float]] = {node: [] for node in AGENTS}
        for node in AGENTS:
            wait(lambda n=node: newest_signed(work / n) >= 1, patience, f"{node}'s first batch")
        for trial in range(1, args.trials + 1):
            current = {}
            for node in AGENTS:
                signed = newest_signed(work / node)
                wait(lambda n=node, s=signed: collector.complete(n) >= s, patience,
                     f"{node} to be current")
                current[node] = signed
            collector.stop()
            time.sleep(args.outage)
            collector.start()
            up = collector.answering_at()
            newest = {node: newest_signed(work / node) for node in AGENTS}
            row = []
            for node in AGENTS:
                if newest[node] <= current[node]:
                    row.append("n/a")  # nothing signed during the outage: nothing to be fresh
                    continue
                wait(lambda n=node, s=newest[node]: collector.received_at(n, s) is not None,
                     patience, f"{node}'s newest batch at the collector")
                got = collector.received_at(node, newest[node])
                assert got is not None
                figures[node].append(got - up)
                row.append(f"{got - up:.2f}")
            print(f"{trial:>5}  {row[0]:>9}  {row[1]:>9}", flush=True)
        print()
        for label, fn in (("median", statistics.median), ("max", max)):
            cells = [f"{fn(figures[n]):.2f}" if figures[n] else "n/a" for n in AGENTS]
            print(f"{label:>6} {cells[0]:>9}  {cells[1]:>9}")
        print("\n(seconds from the collector's first /healthz 200 to the newest window there; target <= 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
