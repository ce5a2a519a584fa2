"""Collector ingest: samples per second per core verified, decoded and durably committed.

Many simulated nodes (each with its own enrolled key and hash chain) post realistic
batches over loopback from separate load processes. Batches are built before the clock
starts, from series shaped like node_exporter's (counters creeping, gauges wandering,
many constants). The figure is samples accepted / CPU seconds the collector process
used, so the load generators' CPU does not count against it; wall-clock throughput is
printed beside it. For reference, the same batches are verified+decoded in-process
with no HTTP or SQLite, which is the ceiling the server can approach.

The same batches are then posted again to a collector with one remote_write target, a real
VictoriaMetrics (Debian's victoria-metrics) on loopback: its ingest figures beside the first
run's, the forwarder child's CPU, the wall time until every sample reached VictoriaMetrics,
and VictoriaMetrics' own CPU for receiving them.

"Collector CPU" is the serve process's plus, with `--workers N` (the collector's `workers`
setting), its N front processes' (`collector.fronts`); never the forwarder child's or
VictoriaMetrics'.

With --scaling, the same batches are then posted to fresh collectors (no remote_write) whose
process tree is pinned with taskset: 1 core with workers 0, 1 core with workers 1 (what the
handoff to fronts costs when there is no second core), 2 cores with workers 1 and, where the
machine has more, all cores with workers = cores - 1; a table of the runs side by side follows.
The load generators are not pinned: they share those cores.

    python bench/collector_ingest.py --nodes 50 --batches 20
    python bench/collector_ingest.py --points 1 --batches 60 --no-forwarding --scaling
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

import wire  # noqa: E402
from agent import keys  # noqa: E402
from bench.common import ENV, cpu_seconds, free_port, get, metric_value, need, process, wait_http  # noqa: E402
from wire.columns_np import decode_columns  # noqa: E402


def node_series(rng: random.Random, n_series: int, points: int, t0_ms: int) -> list[wire.Series]:
    ts = tuple(t0_ms + i * 1000 for i in range(points))
    out = []
    for i in range(n_series):
        # Each series its own identity (name i % 40, cpu i // 40), as an agent sends them.
        labels = (("job", "node"), ("cpu", str(i // 40)), ("mode", ("user", "system", "idle")[i % 3]),
                  ("instance", "10.0.0.1:9100"))
        kind = i % 4
        if kind == 0:
            vals = tuple(float(i) for _ in ts)
        elif kind == 1:
            base = rng.randint(0, 10**9)
            acc, vals_l = base, []
            for _ in ts:
                acc += rng.randint(0, 4096)
                vals_l.append(float(acc))
            vals = tuple(vals_l)
        elif kind == 2:
            v, vals_l = rng.uniform(0, 1000), []
            for _ in ts:
                v += rng.choice((-0.25, 0.0, 0.5))
                vals_l.append(round(v, 2))
            vals = tuple(vals_l)
        else:
            vals = tuple(round(rng.random(), 6) for _ in ts)
        mtype = wire.MetricType.COUNTER if kind == 1 else wire.MetricType.GAUGE
        out.append(wire.Series(f"node_bench_metric_{i % 40}", labels, mtype, ts, vals))
    return out


def build_node(args: tuple[int, int, int, int, int]) -> tuple[str, list[bytes]]:
    """One node's request bodies, oldest first: with wire v2 the first carries the node's
    series table (as an agent's first batch after a start does), the rest name it."""
    node_i, batches, n_series, points, version = args
    rng = random.Random(node_i)
    key = SigningKey(bytes([node_i % 256, node_i // 256]) + bytes(30))
    prev = wire.ZERO_HASH
    bodies = []
    tables = wire.TableBuilder(zstd_level=3)
    sent: set[bytes] = set()
    t0 = int(time.time() * 1000) - batches * points * 1000
    for seq in range(1, batches + 1):
        ctx = wire.BatchContext(key, "bench", f"node-{node_i}", seq, prev, t0, 0, zstd_level=3)
        series = node_series(rng, n_series, points, t0 + seq * points * 1000)
        if version == 1:
            frame = wire.encode_data_batch(ctx, series)
            body = frame
        else:
            table, placed = tables.place(series)
            frame = wire.sign_batch(wire.prepare_columns(table, placed, 3, t0), ctx)
            body = wire.with_table(None if table.id in sent else table.blob, frame)
            sent.add(table.id)
        prev = wire.batch_hash(frame)
        bodies.append(body)
    return keys.public_key_text(bytes(key.verify_key)), bodies


def post_all(args: tuple[int, list[bytes]]) -> int:
    port, frames = args
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ok = 0
    for frame in frames:
        conn.request("POST", "/v1/batches", body=frame,
                     headers={"Content-Type": "application/x-waystation-batch"})
        resp = conn.getresponse()
        resp.read()
        ok += resp.status == 200
    conn.close()
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=40)
    ap.add_argument("--batches", type=int, default=10, help="batches per node")
    ap.add_argument("--series", type=int, default=1000, help="series per batch")
    ap.add_argument("--points", type=int, default=60, help="points per series per batch")
    ap.add_argument("--senders", type=int, default=8, help="concurrent posting connections")
    ap.add_argument("--no-forwarding", action="store_true", help="skip the run with a VictoriaMetrics target")
    ap.add_argument("--wire-version", type=int, default=2, choices=(1, 2), help="the batches' wire version")
    ap.add_argument("--workers", type=int, default=0,
                    help="the collector's workers setting (front processes) for its runs; 0: serve takes HTTP itself")
    ap.add_argument("--scaling", action="store_true",
                    help="then the same batches on 1 core (workers 0 and 1), 2 cores (workers 1) and all cores")
    args = ap.parse_args()
    if args.workers < 0:
        ap.error("--workers must be >= 0")
    print(f"wire v{args.wire_version}: building {args.nodes} nodes x {args.batches} batches x {args.series} series x "
          f"{args.points} points ...", flush=True)
    with multiprocessing.Pool(2) as pool:
        nodes = pool.map(build_node, [(i, args.batches, args.series, args.points, args.wire_version)
                                      for i in range(args.nodes)])
    total_samples = args.nodes * args.batches * args.series * args.points
    total_bytes = sum(len(f) for _, frames in nodes for f in frames)

    # Ceiling: verify + decompress + decode in this process, no HTTP, no SQLite.
    t = time.process_time()
    for pub, bodies in nodes[: max(1, args.nodes // 4)]:
        raw_pub = keys.parse_public_key(pub)
        cache = wire.SeriesTableCache()  # as the collector keeps one per node
        series_table = None
        for body in bodies:
            attached, frame = wire.split_body(body)
            f = wire.parse_frame(frame)
            wire.verify_signature(f, raw_pub)
            payload = wire.decompress_payload(f, 1 << 30)
            if f.header.version == wire.WIRE_VERSION_2:
                if attached is not None:
                    series_table = wire.open_table(attached, wire.Limits(), 1 << 30)
                assert series_table is not None
                decode_columns(payload, series_table, wire.Limits())
            else:
                wire.decode_series(payload, cache=cache)
                cache.confirm()
    ceiling = (total_samples / 4 if args.nodes >= 4 else total_samples) / (time.process_time() - t)

    try:
        runs = [ingest_run(nodes, args.senders, total_samples, forward=False, workers=args.workers)]
        if not args.no_forwarding:
            runs.append(ingest_run(nodes, args.senders, total_samples, forward=True, workers=args.workers))
    except RunFailed as exc:
        raise SystemExit(f"run failed: {exc}") from None

    n_batches = args.nodes * args.batches
    print(f"\n{total_samples} samples in {n_batches} batches, {total_bytes / 1e6:.1f} MB on the wire")
    fronts = f" and its {args.workers} front process{'es' if args.workers > 1 else ''}" if args.workers else ""
    print(f"collector workers = {args.workers}: collector CPU is the serve process{fronts} (not the forwarder's)")
    for r in runs:
        print(f"  {r['label']}: accepted {r['accepted']}/{n_batches} batches")
    print(f"\n{'measure':<58}" + "".join(f"{r['label']:>22}" for r in runs))
    rows = [
        ("collector: samples / collector CPU second (per core)", "per_cpu"),
        (f"collector: samples / wall second ({len(os.sched_getaffinity(0))} cores shared)", "per_wall"),
        ("forwarder child: samples / CPU second", "fw_per_cpu"),
        ("all forwarded: samples / wall second, ingest + forward", "fw_per_wall"),
        ("VictoriaMetrics: samples received / its CPU second", "vm_per_cpu"),
    ]
    for title, key in rows:
        cells = "".join(f"{r[key]:>22,.0f}" if r.get(key) else f"{'-':>22}" for r in runs)
        print(f"{title:<58}{cells}")
    print(f"{'ceiling: verify+decode in-process, no HTTP/SQLite':<58}{ceiling:>22,.0f}")
    if len(runs) == 2:
        both = runs[1]["both_per_cpu"]
        print(f"{'with VictoriaMetrics: samples / CPU s, collector + forwarder':<58}{'-':>22}{both:>22,.0f}")
    if len(runs) == 2:
        print(f"\nforwarding keeps {runs[1]['per_wall'] / runs[0]['per_wall']:.0%} of the collector's wall "
              f"throughput and {runs[1]['per_cpu'] / runs[0]['per_cpu']:.0%} of its per-CPU throughput "
              "(goal: not halved)")
    print("(targets at one point per series: >= 1,500,000 samples / collector CPU s without remote_write, "
          ">= 1,000,000 with one VictoriaMetrics target; >= 8,000,000 at 60 points)")
    complete = all(r["accepted"] == n_batches for r in runs)
    if args.scaling:
        complete = scaling(nodes, args.senders, total_samples, n_batches) and complete
    if not complete:
        print("\nFAILED: a run did not accept every batch; its figures do not stand")
        return 1
    return 0


def scaling(nodes: list[tuple[str, list[bytes]]], senders: int, total_samples: int, n_batches: int) -> bool:
    """The same batches on fresh collectors pinned to 1, 2 and all cores; True if every run
    came up and accepted every batch."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        print(f"\nscaling cannot be measured: this bench may run on 1 CPU only ({cpu_list(usable)})")
        return True
    plan = [("1 core, workers 0", usable[:1], 0), ("1 core, workers 1", usable[:1], 1),
            ("2 cores, workers 1", usable[:2], 1)]
    if len(usable) > 2:
        plan.append((f"{len(usable)} cores, workers {len(usable) - 1}", usable, len(usable) - 1))
    print(f"\n== scaling: the same {n_batches} batches, no remote_write, each on a fresh collector pinned "
          "with taskset", flush=True)
    runs: list[dict[str, Any]] = []
    for label, cpus, workers in plan:
        try:
            runs.append(ingest_run(nodes, senders, total_samples, forward=False, workers=workers, cpus=cpus,
                                   label=label))
        except RunFailed as exc:
            print(f"   {label}: FAILED: {exc}", flush=True)
            runs.append({"label": label, "failed": exc.reason, "accepted": 0})

    print(f"\nscaling: {total_samples} samples in {n_batches} batches per run, no remote_write")
    print(f"  the {senders} load-generating senders are not pinned: they share CPUs {cpu_list(usable)} with the "
          "collector, so wall figures include their contention")
    for r in runs:
        state = f"FAILED: {r['failed']}" if "failed" in r else f"accepted {r['accepted']}/{n_batches} batches"
        print(f"  {r['label']}: {state}")
    base = runs[0].get("per_wall") if "failed" not in runs[0] else None
    for r in runs:
        if "per_wall" in r and base:
            r["vs_first"] = f"{r['per_wall'] / base:.2f}x"
    print(f"\n{'measure':<44}" + "".join(f"{r['label']:>22}" for r in runs))
    text_rows = [("collector ran on CPUs", "cpus"), ("collector processes", "procs"),
                 ("serve's share of the collector CPU", "serve_share")]
    for title, key in text_rows:
        print(f"{title:<44}" + "".join(f"{r.get(key, '-'):>22}" for r in runs))
    number_rows = [("samples / collector CPU second", "per_cpu", ",.0f"), ("samples / wall second", "per_wall", ",.0f"),
                   ("collector processes' CPU seconds", "cpu_s", ",.2f")]
    for title, key, fmt in number_rows:
        print(f"{title:<44}" + "".join(f"{r[key]:>22{fmt}}" if key in r else f"{'-':>22}" for r in runs))
    print(f"{'wall throughput vs ' + runs[0]['label']:<44}" + "".join(f"{r.get('vs_first', '-'):>22}" for r in runs))
    print("(with fronts, serve's share is what stays on one core: with enough cores and load generators elsewhere, "
          "ingest can grow to about 1 / that share of one serve's)")
    return all("failed" not in r and r["accepted"] == n_batches for r in runs)


def cpu_list(cpus: list[int] | set[int]) -> str:
    """CPU numbers as taskset writes them: 0-3,6."""
    spans: list[list[int]] = []
    for c in sorted(cpus):
        if spans and c == spans[-1][1] + 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


class RunFailed(Exception):
    """A collector run that could not be measured (it did not come up, or its fronts did not)."""

    def __init__(self, reason: str, log: Path) -> None:
        super().__init__(f"{reason}; {log_tail(log)}")
        self.reason = reason


SAMPLES_PER_REQUEST = int(os.environ.get("BENCH_SAMPLES_PER_REQUEST", "5000"))


def ingest_run(nodes: list[tuple[str, list[bytes]]], senders: int, total_samples: int, forward: bool,
               workers: int = 0, cpus: list[int] | None = None, label: str | None = None) -> dict[str, Any]:
    """Post every batch to a fresh collector with `workers` fronts; with `forward`, one
    VictoriaMetrics target on; with `cpus`, the collector's process tree confined to them."""
    label = label or ("with VictoriaMetrics" if forward else "no remote_write")
    print(f"\n== run: {label}" + (f" (collector on CPUs {cpu_list(cpus)})" if cpus else ""), flush=True)
    out: dict[str, Any] = {"label": label}
    with tempfile.TemporaryDirectory(prefix="ws-ingest-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        port = free_port()
        # taskset execs the collector, so the pid is serve's, and its children inherit the mask.
        pin = ["taskset", "-c", cpu_list(cpus)] if cpus else []
        cmd = [*pin, sys.executable, "-m", "collector", "serve", "--data-dir", str(work / "c"), "--listen",
               f"127.0.0.1:{port}"]
        # workers = 0 is the default: left out, the config is the same with or without the setting.
        config_text = f"workers = {workers}\n" if workers else ""
        vm = None
        if forward:
            vm_bin = need("victoria-metrics", "victoria-metrics")
            vm_port = free_port()
            vm = stack.enter_context(process(
                [vm_bin, f"-storageDataPath={work / 'vm'}", f"-httpListenAddr=127.0.0.1:{vm_port}",
                 "-retentionPeriod=100y"], work / "vm.log"))
            wait_http(f"http://127.0.0.1:{vm_port}/health")
            config_text += (f'[[remote_write]]\nname = "vm"\nurl = "http://127.0.0.1:{vm_port}/api/v1/write"\n'
                            f"samples_per_request = {SAMPLES_PER_REQUEST}\n")
        if config_text:
            config = work / "collector.toml"
            config.write_text(config_text)
            cmd += ["--config", str(config)]
        fleet = work / "fleet.txt"
        fleet.write_text("".join(f"bench node-{i} {pub}\n" for i, (pub, _) in enumerate(nodes)))
        subprocess.run([sys.executable, "-m", "collector", "enroll", "--data-dir", str(work / "c"), "--from",
                        str(fleet)], env=ENV, check=True, capture_output=True)
        proc = stack.enter_context(process(cmd, work / "collector.log"))
        log = work / "collector.log"
        wait_up(proc, f"http://127.0.0.1:{port}/healthz", log)
        serve = psutil.Process(proc.pid)
        fronts: list[psutil.Process] = []
        deadline = time.monotonic() + 30
        while len(fronts) < workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"{len(fronts)} of {workers} front processes started", log)
            time.sleep(0.1)
            fronts = children_running(serve, "collector.fronts")
        if len(fronts) > workers:
            raise RunFailed(f"{len(fronts)} front processes for workers = {workers}", log)
        # The collector's start-up (imports, the fronts' too) is not ingest: the baseline is
        # read once its CPU stops rising (at most 10 s).
        settled, last = time.monotonic() + 10, -1.0
        while time.monotonic() < settled and (now := sum(collector_cpu(serve, fronts).values())) != last:
            last = now
            time.sleep(0.5)
        forwarder = None
        if forward:
            deadline = time.monotonic() + 30
            while forwarder is None and time.monotonic() < deadline:
                kids = children_running(serve, "collector.remote_write")
                forwarder = kids[0] if kids else None
                time.sleep(0.1)
            assert forwarder is not None, "the forwarder child did not start"
            # Its start-up (imports, TLS context) is not forwarding: the baseline is read once
            # its CPU stops rising (at most 30 s).
            settled, last = time.monotonic() + 30, -1.0
            while time.monotonic() < settled and _cpu(forwarder) != last:
                last = _cpu(forwarder)
                time.sleep(0.5)
        # Each sender takes whole nodes so every node's batches arrive in chain order.
        per_sender: list[list[bytes]] = [[] for _ in range(senders)]
        for i, (_, frames) in enumerate(nodes):
            per_sender[i % senders].extend(frames)
        cpu0 = collector_cpu(serve, fronts)
        fw0 = _cpu(forwarder) if forwarder else 0.0
        vm0 = cpu_seconds(vm.pid) if vm else 0.0
        t0 = time.monotonic()
        with multiprocessing.Pool(senders) as pool:
            out["accepted"] = sum(pool.map(post_all, [(port, fr) for fr in per_sender]))
        wall = time.monotonic() - t0
        cpu1 = collector_cpu(serve, children_running(serve, "collector.fronts"))
        if set(cpu1) != set(cpu0):
            # A front that exited took its CPU seconds with it; one that replaced it counts from 0.
            print(f"   note: the collector's processes changed during the run ({sorted(cpu0)} -> {sorted(cpu1)}); "
                  "its CPU figure is not exact", flush=True)
        cpu = sum(cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1)
        if cpu <= 0:
            raise RunFailed(f"the collector's CPU time did not move in {wall:.2f} s", log)
        out["cpu_s"] = cpu
        # serve's own part: what does not spread over fronts (commit, latest state, answers).
        out["serve_share"] = f"{(cpu1[serve.pid] - cpu0.get(serve.pid, 0.0)) / cpu:.0%}"
        out["per_cpu"] = total_samples / cpu
        out["per_wall"] = total_samples / wall
        out["procs"] = "serve" + (f" + {workers} front" + ("s" if workers > 1 else "") if workers else "")
        ran_on: set[int] = set()
        for p in [serve, *children_running(serve, "collector.fronts")]:
            ran_on.update(p.cpu_affinity() or [])
        out["cpus"] = cpu_list(ran_on)
        if forward and forwarder is not None and vm is not None:
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 600
            while metric_value(get(url), "waystation_remote_write_samples_total", target="vm") < total_samples:
                if time.monotonic() > deadline:
                    raise SystemExit("forwarding did not finish within 10 minutes")
                time.sleep(0.05)
            fw_wall = time.monotonic() - t0
            out["fw_per_cpu"] = total_samples / (_cpu(forwarder) - fw0)
            collector_now = collector_cpu(serve, children_running(serve, "collector.fronts"))
            out["both_per_cpu"] = total_samples / (sum(collector_now[pid] - cpu0.get(pid, 0.0) for pid in collector_now)
                                                   + _cpu(forwarder) - fw0)
            out["fw_per_wall"] = total_samples / fw_wall
            out["vm_per_cpu"] = total_samples / max(cpu_seconds(vm.pid) - vm0, 1e-9)
    return out


def _cpu(p: psutil.Process) -> float:
    times = p.cpu_times()
    return float(times.user + times.system)


def children_running(serve: psutil.Process, module: str) -> list[psutil.Process]:
    """serve's descendants whose command line names `module` (collector.fronts, collector.remote_write)."""
    found = []
    for p in serve.children(recursive=True):
        try:
            if any(module in arg for arg in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def collector_cpu(serve: psutil.Process, fronts: list[psutil.Process]) -> dict[int, float]:
    """CPU seconds so far of serve (not its exited children's) and of each front, by pid."""
    out = {serve.pid: cpu_seconds(serve.pid, children=False)}
    for p in fronts:
        try:
            out[p.pid] = _cpu(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_up(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 30.0) -> None:
    """Until `url` answers; a collector that exits (a config it refuses, say) fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RunFailed(f"the collector exited with status {proc.returncode}", log)
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RunFailed(f"{url} did not answer in {timeout:.0f} s", log) from None
            time.sleep(0.1)


def log_tail(log: Path, n: int = 12) -> str:
    """The collector log's last lines (a front's traceback, say), for a run that failed."""
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return "its log ends:\n      " + "\n      ".join(lines[-n:]) if lines else "its log is empty"


if __name__ == "__main__":
    sys.exit(main())
