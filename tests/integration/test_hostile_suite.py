"""The hostile-input suite (bench/hostile_suite.py) at CI size: a real collector process
takes a few thousand fuzzed requests over loopback and every check of the full-size suite
holds, HTTP-level lies included (aiohttp's parser refuses them; the collector's log gets
one line a minute for them, no traceback)."""

from __future__ import annotations

from bench.hostile_suite import parser, run_suite


def test_hostile_input_is_refused_with_reasons_and_leaves_the_collector_whole() -> None:
    args = parser().parse_args([
        "--requests", "4000", "--seed", "13", "--senders", "1", "--lanes", "4", "--minutes-cap", "2",
        "--slow", "4", "--body-read-timeout", "2", "--warmup", "1000", "--progress-every", "30",
    ])
    lines: list[str] = []
    report = run_suite(args, say=lines.append)
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, "\n".join([f"failed: {failed}", *lines])
    # Every fuzz kind ran, and the oracle was exercised (signed garbage it found valid, accepted).
    kinds = {kind for kind, _ in report["hist"]}
    assert {"mutate", "signed_raw", "signed_header", "signed_table", "bomb", "table_ref", "foreign_key", "chain",
            "endpoints", "transport", "slow_timeout", "slow_complete"} <= kinds
    assert report["hist"][("table_ref", "unknown_table")] > 0
    assert report["hist"][("slow_timeout", "timeout")] == 1
    assert report["requests"] >= 3500
    assert report["ledger_batches"] > 0
