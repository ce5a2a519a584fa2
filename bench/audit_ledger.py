"""Audit at ledger scale: wall time, batches per second, and the audit process's peak RSS.

Builds a real ledger (SQLite, through Ledger.commit as ingest records it) with many nodes,
each a signed hash chain with a drop receipt over an evicted range and a key rotation, then
runs `waystation-collector audit` as a child process on it and on a ledger 1/100 of the
size, sampling each child's RSS. Bounded memory means the two peaks are about the same.

    python bench/audit_ledger.py --batches 1000000 --nodes 20
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

import wire  # noqa: E402
from bench.common import ENV  # noqa: E402
from collector import trust  # noqa: E402
from collector.ledger import Ledger, Submission  # noqa: E402

T0 = 1_700_000_000_000


def build(path: Path, batches: int, nodes: int, series: int) -> float:
    """Fill a ledger with `batches` batches over `nodes` nodes; returns seconds taken."""
    started = time.monotonic()
    ledger = Ledger(path)
    per_node = max(10, batches // nodes)
    try:
        for n in range(nodes):
            node = f"node-{n:04d}"
            key = SigningKey.generate()
            record = trust.enroll(ledger.conn, "bench", node, bytes(key.verify_key), now=0.0)
            prev = wire.ZERO_HASH
            group: list[Submission] = []
            rotate_at, evicted = per_node // 2, (per_node // 3, per_node // 3 + 4)
            for seq in range(1, per_node + 1):
                ctx = wire.BatchContext(key, "bench", node, seq, prev, T0 + seq * 10_000, seq, 1)
                drop = rotation = None
                if seq == evicted[1] + 1:
                    drop = wire.DropReceipt((evicted,), T0, T0 + 1, 5, 5 * series, 1000, "quota")
                    raw = wire.encode_drop_receipt(ctx, drop)
                elif seq == rotate_at:
                    new_key = SigningKey.generate()
                    raw = wire.encode_key_rotation(ctx, new_key)
                    rotation = wire.decode_key_rotation(
                        wire.parse_frame(raw), wire.decompress_payload(wire.parse_frame(raw), 1 << 20)
                    )
                else:
                    raw = wire.encode_data_batch(
                        ctx,
                        [
                            wire.Series(
                                f"bench_metric_{i}",
                                (("i", str(i)),),
                                wire.MetricType.GAUGE,
                                (T0 + seq * 10_000,),
                                (float(seq + i),),
                            )
                            for i in range(series)
                        ],
                    )
                prev = wire.batch_hash(raw)
                if evicted[0] <= seq <= evicted[1]:
                    continue  # evicted from the spool: never delivered
                group.append(Submission(wire.parse_frame(raw), record, 1.0, drop=drop, rotation=rotation))
                if rotation is not None or len(group) >= 2000:
                    ledger.commit(group)
                    group = []
                if rotation is not None:
                    new_record = trust.lookup(ledger.conn, wire.key_id(rotation.new_public_key))
                    assert new_record is not None
                    key, record = new_key, new_record
            ledger.commit(group)
    finally:
        ledger.close()
    return time.monotonic() - started


def audit(data_dir: Path) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS bytes, last stdout line) of `waystation-collector audit`."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "audit", "--data-dir", str(data_dir), "--progress-every", "10"],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    proc.wait()
    return proc.returncode, time.monotonic() - started, peak, out.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200_000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--series", type=int, default=20, help="series per data batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for label, batches in (("small", max(args.nodes * 10, args.batches // 100)), ("large", args.batches)):
            data_dir = Path(tmp) / label
            built = build(data_dir / "ledger.db", batches, args.nodes, args.series)
            size = (data_dir / "ledger.db").stat().st_size
            rc, secs, peak, last = audit(data_dir)
            results.append((label, batches, size, built, rc, secs, peak))
            print(f"{label}: {batches:,} batches, {size / 2**20:.0f} MiB ledger (built in {built:.0f} s)")
            print(
                f"  audit exit {rc} in {secs:.1f} s ({batches / secs:,.0f} batches/s), peak RSS {peak / 2**20:.1f} MiB"
            )
            print(f"  {last}")
        small, large = results
        print(
            f"peak RSS large/small: {large[6] / small[6]:.2f} for {large[1] / small[1]:.0f}x the batches "
            "(reference: bounded memory keeps this near 1)"
        )


if __name__ == "__main__":
    main()
