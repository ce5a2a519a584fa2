"""Remote-write encoding speed: the hand-written encoder against protoc's generated code.

Encodes one WriteRequest of 1000 series x 1, 6 and 60 points and prints samples
per second (best of several rounds). Label bytes / Label messages are built once
per series outside the timing, as the collector caches them.

"shared timestamps" is the usual collector input (every series of a scrape or an
agent batch carries the same timestamps, so the encoder's timestamp caches hit);
"own timestamps" gives every series, in every round, timestamps never seen before.

Usage: .venv/bin/python bench/remote_write_encode.py [--rounds N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf.internal import api_implementation  # noqa: E402

from collector import remote_write_proto as rw  # noqa: E402
from collector.prompb import remote_write_pb2 as pb  # noqa: E402

SERIES = 1000
NOW_MS = 1_750_000_000_000
STEP_MS = 15_000

Batch = list[tuple[int, list[int], list[float]]]  # (series index, timestamps, values)


def _labels(i: int) -> list[tuple[str, str]]:
    return [
        ("__name__", f"node_metric_{i % 50}"),
        ("cpu", str(i % 64)),
        ("instance", f"host-{i // 64:04d}.dc1.example:9100"),
        ("job", "node"),
        ("mode", "user"),
    ]


def _batch(points: int, base: int, own: bool, rng: random.Random) -> Batch:
    return [
        (
            i,
            [base + (i * 7 if own else 0) + k * STEP_MS for k in range(points)],
            [rng.random() * 1000 for _ in range(points)],
        )
        for i in range(SERIES)
    ]


def _best(run: Callable[[Batch], bytes], points: int, own: bool, rounds: int, rng: random.Random) -> float:
    best = float("inf")
    for r in range(rounds):
        # With own timestamps, a new base each round keeps them out of the caches.
        batch = _batch(points, NOW_MS + (r + 1) * 10_000_000 * own, own, rng)
        start = time.perf_counter()
        run(batch)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    label_bytes = [rw.encode_labels(_labels(i)) for i in range(SERIES)]
    label_msgs = [[pb.Label(name=n, value=v) for n, v in _labels(i)] for i in range(SERIES)]

    def fast(batch: Batch) -> bytes:
        return rw.encode_write_request([rw.encode_timeseries(label_bytes[i], ts, vs) for i, ts, vs in batch])

    def generated(batch: Batch) -> bytes:
        request = pb.WriteRequest()
        for i, ts, vs in batch:
            series = request.timeseries.add()
            series.labels.extend(label_msgs[i])
            for t, v in zip(ts, vs, strict=True):
                series.samples.add(value=v, timestamp=t)
        return request.SerializeToString()

    rng = random.Random(1)
    print(f"protobuf backend: {api_implementation.Type()}; {SERIES} series; best of {args.rounds} rounds")
    print(f"{'points':>6} {'encoder':<34} {'samples/s':>12} {'ns/sample':>10} {'vs generated':>13}")
    for points in (1, 6, 60):
        samples = SERIES * points
        check = _batch(points, NOW_MS, False, rng)
        assert fast(check) == generated(check), "the encoders disagree"
        gen_s = _best(generated, points, False, args.rounds, rng)
        rows = [("generated code (" + api_implementation.Type() + ")", gen_s)]
        for name, own in (("fast, shared timestamps", False), ("fast, own timestamps (cold caches)", True)):
            rows.append((name, _best(fast, points, own, args.rounds, rng)))
        for name, secs in rows:
            print(
                f"{points:>6} {name:<34} {samples / secs:>12,.0f} {secs / samples * 1e9:>10.0f} {gen_s / secs:>12.1f}x"
            )
        body = fast(check)
        start = time.perf_counter()
        compressed = rw.compress(body)
        secs = time.perf_counter() - start
        print(
            f"{points:>6} {'snappy (raw) of the body':<34} {samples / secs:>12,.0f} {secs / samples * 1e9:>10.0f}"
            f"   {len(body):,} -> {len(compressed):,} bytes"
        )


if __name__ == "__main__":
    main()
