"""Forwarding pieces over real SQLite ledgers: reply classes, order, positions, retention."""

from __future__ import annotations

import time
from email.utils import formatdate
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import wire
from collector import remote_write as rw
from collector import trust
from collector.ledger import IntervalSet, Ledger, Submission
from tests.unit.test_ledger import NODE, SITE, Chain


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, "", ("ok", "")),
        (204, "", ("ok", "")),
        (429, "slow down", ("retry", "http_429")),
        (503, "unavailable", ("retry", "http_5xx")),
        (500, "some storage error", ("retry", "http_5xx")),
        # Prometheus 2.42 answers a sample older than its out-of-order window with a 500.
        (500, "too old sample\n", ("refused", "too_old")),
        (500, "out of bounds", ("refused", "out_of_bounds")),
        (400, "out of order sample", ("refused", "out_of_order")),
        (400, "duplicate sample for timestamp", ("refused", "duplicate")),
        (400, "cannot parse", ("refused", "bad_request")),
        (409, "", ("refused", "http_409")),
        (413, "", ("split", "too_large")),
        # The target's configuration, not the batch: retried until someone fixes it.
        (401, "", ("retry", "http_401")),
        (403, "", ("retry", "http_403")),
        (404, "remote write receiver needs to be enabled", ("retry", "http_404")),
    ],
)
def test_replies_are_classified_as_the_spec_and_real_receivers_need(
    status: int, body: str, expected: tuple[str, str]
) -> None:
    assert rw.classify(status, body) == expected


def test_retry_after_takes_seconds_or_a_date_and_is_capped() -> None:
    now = time.time()
    assert rw.retry_after_s("7", now) == 7.0
    assert rw.retry_after_s(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1.5)
    assert rw.retry_after_s("99999", now) == rw.RETRY_AFTER_MAX_S
    assert rw.retry_after_s("-3", now) == 0.0
    assert rw.retry_after_s("soon", now) is None
    assert rw.retry_after_s(None, now) is None
    assert rw.retry_after_s("nan", now) is None


def test_name_filter_matches_whole_names() -> None:
    f = rw.NameFilter(["node_.*", "DCGM_FI_DEV_GPU_UTIL"], ["node_network_.*"])
    assert f("node_load1")
    assert not f("node_network_receive_bytes_total")
    assert f("DCGM_FI_DEV_GPU_UTIL")
    assert not f("DCGM_FI_DEV_GPU_UTIL_extra")  # whole-name match, as in relabelling
    assert not f("up")
    assert rw.NameFilter([], []).passes_all
    assert rw.NameFilter([], ["x"])("y") and not rw.NameFilter([], ["x"])("x")


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    yield led  # type: ignore[misc]
    led.close()


def _fill(ledger: Ledger, n: int, received_at: float | None = None) -> tuple[Chain, trust.KeyRecord]:
    key = SigningKey.generate()
    record = trust.enroll(ledger.conn, SITE, NODE, bytes(key.verify_key))
    chain = Chain(key)
    at = received_at or time.time()
    subs = [Submission(wire.parse_frame(chain.data(seq)), record, at) for seq in range(1, n + 1)]
    assert {o.result for o in ledger.commit(subs)} == {"accepted"}
    return chain, record


def test_new_arrivals_go_newest_first_and_the_backlog_oldest_first_in_turn(ledger: Ledger) -> None:
    _fill(ledger, 10)  # each batch: 2 samples
    done = IntervalSet()
    done.add(1, 4)  # the target had 1..4 when it went away; 5..10 arrived since
    rows, live = rw.pick(ledger.conn, done, budget=4, live=True)
    assert live and [r.rowid for r in rows] == [10, 9]
    for r in rows:
        done.add(r.rowid, r.rowid)
    rows, live = rw.pick(ledger.conn, done, budget=4, live=False)
    assert not live and [r.rowid for r in rows] == [5, 6]
    for r in rows:
        done.add(r.rowid, r.rowid)
    # Nothing newer than 10 arrived: the backlog goes on even when live is preferred.
    rows, live = rw.pick(ledger.conn, done, budget=100, live=True)
    assert not live and [r.rowid for r in rows] == [7, 8]
    for r in rows:
        done.add(r.rowid, r.rowid)
    assert rw.pick(ledger.conn, done, budget=100, live=True) == ([], False)


def test_one_batch_bigger_than_the_budget_is_still_picked(ledger: Ledger) -> None:
    _fill(ledger, 3)
    rows, _ = rw.pick(ledger.conn, IntervalSet(), budget=1, live=True)
    assert [r.rowid for r in rows] == [3]


def test_a_position_survives_a_restart_and_pruned_rows_count_as_done(ledger: Ledger, tmp_path: Path) -> None:
    _fill(ledger, 6)
    state = rw.TargetState()
    state.done.add(4, 6)
    state.samples_sent = 6
    state.refused = {"too_old": 2}
    rw.save_target(ledger.conn, "vm", state, time.time())
    ledger.conn.execute("DELETE FROM batches WHERE rowid IN (1, 2)")  # as pruning would
    loaded = rw.load_target(ledger.conn, "vm")
    assert list(zip(loaded.done.starts, loaded.done.ends, strict=True)) == [(1, 2), (4, 6)]
    assert (loaded.samples_sent, loaded.refused) == (6, {"too_old": 2})
    assert rw.pending_stats(ledger.conn, loaded.done)[0] == 1  # only rowid 3 is missing
    assert rw.load_target(ledger.conn, "other").done.prefix_end() == 2


def test_retention_removes_old_batches_counts_what_a_target_lacked_and_keeps_the_chain_head(
    ledger: Ledger, tmp_path: Path
) -> None:
    old = time.time() - 40 * 86400
    _fill(ledger, 5, received_at=old)
    has_all = rw.TargetState()
    has_all.done.add(1, 5)
    rw.save_target(ledger.conn, "prom", has_all, time.time())
    lacks = rw.TargetState()
    lacks.done.add(1, 2)
    rw.save_target(ledger.conn, "vm", lacks, time.time())

    pruned = ledger.prune(time.time(), 30 * 86400, 0, ["prom", "vm"], limit=2)
    assert (pruned.batches, pruned.more) == (2, True)
    pruned = ledger.prune(time.time(), 30 * 86400, 0, ["prom", "vm"], limit=100)
    # seq 5 is the node's newest batch (and the newest of all): kept for the chain head.
    assert (pruned.batches, pruned.more) == (2, False)
    assert pruned.expired == {"vm": (2, 4)}  # seqs 3 and 4, two samples each
    assert [r[0] for r in ledger.conn.execute("SELECT seq FROM batches")] == [5]
    assert ledger.conn.execute("SELECT target, batches, samples FROM expired").fetchall() == [("vm", 2, 4)]

    # The node's accounting does not regress when the ledger is opened again.
    reopened = Ledger(tmp_path / "ledger.db")
    try:
        state = reopened.state(SITE, NODE)
        assert state is not None and (state.complete_through, state.gap_seqs) == (5, 0)
    finally:
        reopened.close()


def test_retention_leaves_young_batches_alone(ledger: Ledger) -> None:
    _fill(ledger, 4)
    pruned = ledger.prune(time.time(), 30 * 86400, 0, ["vm"])
    assert (pruned.batches, pruned.more, pruned.expired) == (0, False, {})


def test_the_size_cap_removes_the_oldest_batches_beyond_it(ledger: Ledger) -> None:
    _fill(ledger, 50)
    pruned = ledger.prune(time.time(), 30 * 86400, 1, ["vm"], limit=20)
    assert pruned.batches == 20 and pruned.more
    assert pruned.expired == {"vm": (20, 40)}
    assert ledger.conn.execute("SELECT MIN(seq) FROM batches").fetchone()[0] == 21


def test_forwarding_metrics_read_the_ledger(ledger: Ledger) -> None:
    _fill(ledger, 3)
    state = rw.TargetState(samples_sent=42, refused={"too_old": 3}, retries={"http_5xx": 2},
                           last_success=1_700_000_000.0, pending_batches=2, oldest_pending_ms=1_000_000)
    rw.save_target(ledger.conn, "vm", state, time.time())
    families = {f.name: f for f in rw.ForwardingMetrics(ledger.conn, ["vm", "prom"], lambda: 1,
                                                          clock=lambda: 2000.0).collect()}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("waystation_remote_write_samples_total", (("target", "vm"),))] == 42
    assert values[("waystation_remote_write_samples_total", (("target", "prom"),))] == 0
    assert values[("waystation_remote_write_samples_refused_total", (("reason", "too_old"), ("target", "vm")))] == 3
    assert values[("waystation_remote_write_retries_total", (("reason", "http_5xx"), ("target", "vm")))] == 2
    assert values[("waystation_remote_write_pending_batches", (("target", "vm"),))] == 2
    assert values[("waystation_remote_write_lag_seconds", (("target", "vm"),))] == 1000.0
    assert values[("waystation_remote_write_lag_seconds", (("target", "prom"),))] == 0.0
    assert values[("waystation_remote_write_forwarder_restarts_total", ())] == 1
    assert values[("waystation_ledger_bytes", ())] > 0


def test_over_the_size_cap_batches_every_target_has_go_first(ledger: Ledger) -> None:
    _fill(ledger, 50)
    has = rw.TargetState()
    has.done.add(11, 50)  # forwarded newest first; 1..10 still missing at the target
    rw.save_target(ledger.conn, "vm", has, time.time())
    pruned = ledger.prune(time.time(), 30 * 86400, 1, ["vm"], limit=20)
    assert pruned.batches == 20 and pruned.expired == {}
    left = [r[0] for r in ledger.conn.execute("SELECT seq FROM batches ORDER BY seq")]
    assert left[:10] == list(range(1, 11))  # what the target lacks is still there


def test_a_batch_that_left_the_archive_is_not_taken_again(ledger: Ledger) -> None:
    chain, record = _fill(ledger, 5, received_at=time.time() - 40 * 86400)
    ledger.prune(time.time(), 30 * 86400, 0, [])
    again = ledger.commit([Submission(wire.parse_frame(chain.frames[2]), record, time.time())])
    assert [o.result for o in again] == ["duplicate"]
    state = ledger.state(SITE, NODE)
    assert state is not None and state.stored_batches == 5
    # A receipt naming a seq that left the archive does not count it as lost.
    receipt = wire.DropReceipt(((3, 3),), 0, 1, 1, 2, 10, "quota")
    chain.frames[6] = wire.encode_drop_receipt(chain._ctx(6), receipt)
    sub = Submission(wire.parse_frame(chain.frames[6]), record, time.time(), drop=receipt)
    assert [o.result for o in ledger.commit([sub])] == ["accepted"]
    state = ledger.state(SITE, NODE)
    assert state is not None and state.dropped_batches == 0


def test_a_key_revoked_while_its_batch_was_verified_stops_the_batch(ledger: Ledger) -> None:
    chain, record = _fill(ledger, 2)
    trust.revoke(ledger.conn, NODE, SITE)
    late = Submission(wire.parse_frame(chain.data(3)), record, time.time())  # verified before the revocation
    assert [o.result for o in ledger.commit([late])] == ["revoked"]
    rotation = Submission(wire.parse_frame(chain.rotation(3, SigningKey.generate())), record, time.time(),
                          rotation=wire.KeyRotation(b"\0" * 32, b"\0" * 64))
    assert [o.result for o in ledger.commit([rotation])] == ["revoked"]
    assert {k.state for k in trust.keys_of(ledger.conn, SITE, NODE)} == {"revoked"}


def test_a_refused_request_is_split_into_its_own_series_only() -> None:
    request = rw.Request([(7, b"a", 2), (7, b"b", 2), (8, b"c", 3)])
    parts = rw.split(request, "refused")
    assert [p.series for p in parts] == [[(7, b"a", 2), (7, b"b", 2)], [(8, b"c", 3)]]
    assert rw.split(parts[0], "refused") == []  # one batch: refused for good
    assert [p.samples for p in rw.split(parts[0], "split")] == [2, 2]  # 413: halves


def test_pending_counts_the_gaps_without_scanning(ledger: Ledger) -> None:
    _fill(ledger, 30)
    done = IntervalSet()
    done.add(1, 10)
    done.add(21, 25)
    count, oldest = rw.pending_stats(ledger.conn, done)
    assert count == 10 + 5
    first_pending = ledger.conn.execute("SELECT window_start_ms FROM batches WHERE rowid = 11").fetchone()[0]
    assert oldest == first_pending


def test_the_collector_s_own_names_are_never_forwarded_for_a_node(ledger: Ledger) -> None:
    key = SigningKey.generate()
    record = trust.enroll(ledger.conn, SITE, NODE, bytes(key.verify_key))
    chain = Chain(key)
    series = [
        wire.Series("node_load1", (("site", "elsewhere"),), wire.MetricType.GAUGE, (1000, 2000), (0.5, 1.5)),
        wire.Series("waystation_remote_write_lag_seconds", (("target", "vm"),), wire.MetricType.GAUGE,
                    (2000,), (0.0,)),
    ]
    chain.frames[1] = wire.encode_data_batch(chain._ctx(1), series)
    ledger.commit([Submission(wire.parse_frame(chain.frames[1]), record, time.time())])
    encoded = rw.Encoder(ledger.conn, wire.OpenLimits()).encoded(1)
    assert [name for name, _, _ in encoded.series] == ["node_load1"]
    assert encoded.reserved == 1
    body = rw.proto.encode_write_request([s for _, s, _ in encoded.series])
    (labels, points), = rw.proto.decode_write_request(body)
    # site and node come from the verified header, whatever the batch said.
    assert dict(labels) == {"__name__": "node_load1", "site": SITE, "node": NODE}
    assert points == [(1000, 0.5), (2000, 1.5)]
