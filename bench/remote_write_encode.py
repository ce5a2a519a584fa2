"""Remote-write encoding speed: the hand-written encoder against protoc's generated code.

Encodes one WriteRequest of 1000 series x 1, 6 and 60 points and prints samples
per second (best of several rounds). Label bytes / Label messages are built once
per series outside the timing, as the collector caches them.

"shared timestamps" is the usual collector input (every series of a scrape or an
agent batch carries the same timestamps, so the encoder's timestamp caches hit);
"own timestamps" gives every series, in every round, timestamps never seen before.

Then a wire v2 batch of the same data (1000 series x 1 and 60 points), decoded to
columns once outside the timing, is encoded both ways the forwarder can, and samples
per CPU second are printed side by side: the series path (Columns.to_series, then
one encode_timeseries per series: what the forwarder did) and the columns path
(encode_timeseries_columns: array operations over the whole batch). Both give the
same bytes; the bench checks that before it times them.

Usage: .venv/bin/python bench/remote_write_encode.py [--rounds N]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from google.protobuf.internal import api_implementation  # noqa: E402

from collector import remote_write_proto as rw  # noqa: E402
from collector.prompb import remote_write_pb2 as pb  # noqa: E402
from collector.remote_write import Encoded, Encoder  # noqa: E402
from wire import Limits, MetricType, OpenLimits, Series, TableBuilder, open_table  # noqa: E402
from wire.columns import encode_columns  # noqa: E402
from wire.columns_np import Columns, decode_columns  # noqa: E402

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


def _v2_batch(batch: Batch) -> Columns:
    """The batch as the forwarder meets it in wire v2: its series table, then its columns."""
    series = []
    for i, ts, vs in batch:
        (_, name), *labels = _labels(i)
        series.append(Series(name, tuple(labels), MetricType.GAUGE, tuple(ts), tuple(vs)))
    current, placed = TableBuilder(zstd_level=1).place(series)
    table = open_table(current.blob, Limits(), 1 << 30)
    return decode_columns(encode_columns(current, placed), table, Limits())


def _label_blob(columns: Columns) -> tuple[bytes, list[bytes], list[int]]:
    """Each table index's label bytes: joined (the columns path), one by one (the series
    path), and where each starts in the joined bytes (plus the end)."""
    table = columns.table
    encoded = [rw.encode_labels(sorted((("__name__", name), *labels)))
               for name, labels in zip(table.names, table.labels, strict=True)]
    bounds = [0]
    for e in encoded:
        bounds.append(bounds[-1] + len(e))
    return b"".join(encoded), encoded, bounds


def _cpu_best(run: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return max(best, 1e-9)


def _columns_rows(points: int, encoder: Encoder, rounds: int, rng: random.Random) -> None:
    columns = _v2_batch(_batch(points, NOW_MS, False, rng))
    blob, by_index, bounds = _label_blob(columns)
    index = columns.index
    label_starts = np.array(bounds[:-1], dtype=np.int64)[index]
    label_ends = np.array(bounds[1:], dtype=np.int64)[index]
    cached = {(columns.table.names[i], columns.table.labels[i]): by_index[i] for i in index.tolist()}

    def series_path() -> list[bytes]:
        return [rw.encode_timeseries(cached[(s.name, s.labels)], s.timestamps_ms, s.values)
                for s in columns.to_series()]

    def columns_path() -> list[bytes]:
        return rw.encode_timeseries_columns(blob, label_starts, label_ends, columns.starts,
                                            columns.timestamps_ms, columns.values)

    def forwarder_series() -> Encoded:
        return encoder.encode_series(1, "site", "node", columns.to_series())

    def forwarder_columns() -> Encoded:
        return encoder.encode_columns(1, "site", "node", columns.table, columns)

    assert series_path() == columns_path(), "the two encoders disagree"
    assert forwarder_series() == forwarder_columns(), "the two forwarder paths disagree"  # also warms the caches
    samples = columns.sample_count
    for name, old_run, new_run in (
        ("encoder alone, labels given", series_path, columns_path),
        ("forwarder's Encoder after open_batch", forwarder_series, forwarder_columns),
    ):
        old, new = _cpu_best(old_run, rounds), _cpu_best(new_run, rounds)
        print(f"{points:>6} {name:<38} {samples / old:>14,.0f} {samples / new:>14,.0f} {old / new:>8.1f}x")


def columns_side_by_side(rounds: int, rng: random.Random) -> None:
    """The encoder alone (labels given), then the forwarder's whole step after open_batch
    (collector.remote_write.Encoder, its label caches warm: merged labels, reserved names,
    the (name, field, samples) list), the series path beside the columns path."""
    print(f"\nwire v2 columns, {SERIES} series; best of {rounds} rounds; samples per CPU second")
    print(f"{'points':>6} {'':<38} {'series path':>14} {'columns path':>14} {'speed-up':>9}")
    encoder = Encoder(sqlite3.connect(":memory:"), OpenLimits())
    for points in (1, 60):
        _columns_rows(points, encoder, rounds, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--columns-only", action="store_true", help="only the wire v2 columns comparison")
    parser.add_argument("--skip-columns", action="store_true", help="without the wire v2 columns comparison")
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
    if args.columns_only:
        columns_side_by_side(args.rounds, rng)
        return
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
    if not args.skip_columns:
        columns_side_by_side(args.rounds, rng)


if __name__ == "__main__":
    main()
