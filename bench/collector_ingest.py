"""Collector ingest: samples per second per core verified, decoded and durably committed.

Many simulated nodes (each with its own enrolled key and hash chain) post realistic
batches over loopback from separate load processes. Batches are built before the clock
starts, from series shaped like node_exporter's (counters creeping, gauges wandering,
many constants). The figure is samples accepted / CPU seconds the collector process
used, so the load generators' CPU does not count against it; wall-clock throughput is
printed beside it. For reference, the same batches are verified+decoded in-process
with no HTTP or SQLite, which is the ceiling the server can approach.

    python bench/collector_ingest.py --nodes 50 --batches 20
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.signing import SigningKey  # noqa: E402

from agent import keys, wire  # noqa: E402
from bench.common import ENV, cpu_seconds, free_port, get, metric_value, process, wait_http  # noqa: E402


def node_series(rng: random.Random, n_series: int, points: int, t0_ms: int) -> list[wire.Series]:
    ts = tuple(t0_ms + i * 1000 for i in range(points))
    out = []
    for i in range(n_series):
        labels = (("job", "node"), ("cpu", str(i % 64)), ("mode", ("user", "system", "idle")[i % 3]),
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


def build_node(args: tuple[int, int, int, int]) -> tuple[str, list[bytes]]:
    node_i, batches, n_series, points = args
    rng = random.Random(node_i)
    key = SigningKey(bytes([node_i % 256, node_i // 256]) + bytes(30))
    prev = wire.ZERO_HASH
    frames = []
    t0 = int(time.time() * 1000) - batches * points * 1000
    for seq in range(1, batches + 1):
        ctx = wire.BatchContext(key, "bench", f"node-{node_i}", seq, prev, t0, 0, zstd_level=3)
        frame = wire.encode_data_batch(ctx, node_series(rng, n_series, points, t0 + seq * points * 1000))
        prev = wire.batch_hash(frame)
        frames.append(frame)
    return keys.public_key_text(bytes(key.verify_key)), frames


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
    args = ap.parse_args()
    print(f"building {args.nodes} nodes x {args.batches} batches x {args.series} series x "
          f"{args.points} points ...", flush=True)
    with multiprocessing.Pool(2) as pool:
        nodes = pool.map(build_node, [(i, args.batches, args.series, args.points)
                                      for i in range(args.nodes)])
    total_samples = args.nodes * args.batches * args.series * args.points
    total_bytes = sum(len(f) for _, frames in nodes for f in frames)

    # Ceiling: verify + decompress + decode in this process, no HTTP, no SQLite.
    t = time.process_time()
    for pub, frames in nodes[: max(1, args.nodes // 4)]:
        raw_pub = keys.parse_public_key(pub)
        table = wire.SeriesTableCache()  # as the collector keeps one per node
        for frame in frames:
            f = wire.parse_frame(frame)
            wire.verify_signature(f, raw_pub)
            wire.decode_series(wire.decompress_payload(f, 1 << 30), cache=table)
            table.confirm()
    ceiling = (total_samples / 4 if args.nodes >= 4 else total_samples) / (time.process_time() - t)

    with tempfile.TemporaryDirectory(prefix="ws-ingest-") as tmp:
        work = Path(tmp)
        port = free_port()
        for i, (pub, _) in enumerate(nodes):
            subprocess.run([sys.executable, "-m", "collector", "enroll", "--data-dir",
                            str(work / "c"), "--site", "bench", "--node", f"node-{i}", "--key", pub],
                           env=ENV, check=True, capture_output=True)
        with process([sys.executable, "-m", "collector", "serve", "--data-dir", str(work / "c"),
                      "--listen", f"127.0.0.1:{port}"], work / "collector.log") as proc:
            wait_http(f"http://127.0.0.1:{port}/healthz")
            # Each sender takes whole nodes so every node's batches arrive in chain order.
            per_sender: list[list[bytes]] = [[] for _ in range(args.senders)]
            for i, (_, frames) in enumerate(nodes):
                per_sender[i % args.senders].extend(frames)
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            with multiprocessing.Pool(args.senders) as pool:
                accepted = sum(pool.map(post_all, [(port, fr) for fr in per_sender]))
            wall = time.monotonic() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
            text = get(f"http://127.0.0.1:{port}/metrics")
        counted = metric_value(text, "waystation_ingest_batches_total", result="accepted")
    print(f"\naccepted {accepted}/{args.nodes * args.batches} batches ({counted:.0f} counted), "
          f"{total_samples} samples, {total_bytes / 1e6:.1f} MB on the wire")
    print(f"{'measure':<52}{'samples/s':>14}")
    print(f"{'collector: samples / collector CPU second (per core)':<52}{total_samples / cpu:>14,.0f}")
    print(f"{'collector: samples / wall second (2 cores shared)':<52}{total_samples / wall:>14,.0f}")
    print(f"{'ceiling: verify+decode in-process, no HTTP/SQLite':<52}{ceiling:>14,.0f}")
    print("(target: >= 1,000,000 samples/s on one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
