"""The crash proof suite (bench/crash_suite.py) at CI size: the same code as the full run
(real agents and collector, SIGKILLs, uplink and receiver outages, a spool that evicts),
with a handful of kills; and its wire witness, which every check of acks rests on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import wire
from bench.crash_suite import HttpMessages, Options, Witness, describe, run_suite

pytestmark = pytest.mark.timeout(300)


def _frame(seq: int, value: float) -> bytes:
    ctx = wire.BatchContext(SigningKey(bytes(32)), "crash", "node-1", seq, wire.ZERO_HASH, 1_700_000_000_000, seq)
    series = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (1_700_000_000_000,), (value,))]
    return wire.encode_data_batch(ctx, series)


def _post(body: bytes) -> bytes:
    return (b"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-waystation-batch\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def _answer(status: int, reply: dict[str, object], chunked: bool = False) -> bytes:
    body = json.dumps(reply).encode()
    if chunked:
        half = len(body) // 2
        return (b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                % (status, half, body[:half], len(body) - half, body[half:]))
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body


def _relay(witness: Witness, requests: bytes, answers: bytes, step: int = 7) -> None:
    """Both directions of one connection, fed in small pieces as a socket delivers them."""
    up, down = HttpMessages(), HttpMessages()
    sent = []
    for i in range(0, len(requests), step):
        sent += [witness.request(start, body) for start, _, body in up.feed(requests[i:i + step])]
    for i in range(0, len(answers), step):
        for start, _, body in down.feed(answers[i:i + step]):
            witness.answer(sent.pop(0), start, body)


def test_the_witness_records_exactly_the_batches_the_collector_acknowledged() -> None:
    witness = Witness()
    one, two, three = _frame(1, 1.0), _frame(2, 2.0), _frame(3, 3.0)
    requests = b"".join(_post(f) for f in (one, two, three))
    answers = (_answer(200, {"result": "accepted", "seq": 1})
               + _answer(503, {"result": "overloaded"})
               + _answer(200, {"result": "duplicate", "seq": 3}, chunked=True))
    _relay(witness, requests, answers)
    assert sorted(witness.acked) == [("crash", "node-1", 1), ("crash", "node-1", 3)]
    assert witness.acked[("crash", "node-1", 3)].hash == wire.batch_hash(three)
    assert witness.answers == {"200 accepted": 1, "503 overloaded": 1, "200 duplicate": 1}
    # The same seq acked again with other bytes: the suite's conflict check names it.
    _relay(witness, _post(_frame(1, 9.0)), _answer(200, {"result": "duplicate", "seq": 1}))
    assert len(witness.conflicting_acks) == 1 and "seq 1" in witness.conflicting_acks[0]
    # A 200 for another seq than the frame's is not an ack of that frame.
    _relay(witness, _post(_frame(4, 4.0)), _answer(200, {"result": "accepted", "seq": 5}))
    assert ("crash", "node-1", 4) not in witness.acked


def test_sigkills_and_outages_lose_no_acknowledged_sample(tmp_path: Path) -> None:
    # Ten kill steps on the collector's and the agents' timelines (about three of the
    # collector); the outage from step 3 lasts until both spools evict (a larger page fills
    # the 64 KiB quota sooner), so the gap check meets drop receipts.
    opts = Options(kills=10, seed=13, workdir=tmp_path / "crash", series=150, evict_every=10, minutes_cap=3)
    result = run_suite(opts, say=lambda *_: None)
    report = describe(result, opts)
    assert result.passed, report
    f = result.figures
    assert f["kill_steps"] == 10, report
    assert f["kills"].get("agent", 0) >= 1, report
    assert f["kills"].get("collector (serve alone)", 0) + f["kills"].get("collector (with its forwarder)", 0) >= 1
    assert f["outages"].get("evicting") == 1 and f["receipts"] >= 1 and f["seqs_dropped"] >= 1, report
    assert f["batches_acked"] >= 20 and f["samples_checked"] >= f["acked_samples"] > 0, report
    assert f["integrity_checks"] >= 10 + 3, report
    assert set(result.checks) == {
        "no acknowledged sample lost", "no seq acked twice with different frames, no 409",
        "PRAGMA integrity_check clean", "every gap explained by a drop receipt",
        "remote-write receiver holds everything the ledger holds",
        "no process exited by itself, no forwarder left behind",
    }
