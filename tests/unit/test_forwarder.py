"""Forwarding pieces over real SQLite ledgers: reply classes, order, positions, retention."""

from __future__ import annotations

import struct
import tempfile
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

import wire
from collector import remote_write as rw
from collector import trust
from collector.ledger import IntervalSet, Ledger, Submission
from tests.unit.test_ledger import NODE, SITE, Chain
from tests.unit.test_wire_v2 import series_lists


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
    # No state saved for "prom" yet: it has none of the ledger's batches (not a false 0).
    assert values[("waystation_remote_write_pending_batches", (("target", "prom"),))] == 3
    (oldest,) = ledger.conn.execute("SELECT MIN(window_start_ms) FROM batches").fetchone()
    later = rw.ForwardingMetrics(ledger.conn, ["prom"], clock=lambda: oldest / 1000 + 100.0).collect()
    lag = [s.value for f in later for s in f.samples if s.name == "waystation_remote_write_lag_seconds"]
    assert lag == [pytest.approx(100.0)]
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


# ---------------------------------------------------------------- wire v2: encoded from columns


def _commit_v2(ledger: Ledger, batches: list[list[wire.Series]]) -> tuple[list[int], list[list[wire.Series]]]:
    """Sign each batch as an agent does in wire v2 (its table sent with it) and commit it, as
    ingest does: the batches' row ids, and their series in the order the batches hold them
    (by table index)."""
    key = SigningKey.generate()
    record = trust.enroll(ledger.conn, SITE, NODE, bytes(key.verify_key))
    chain = Chain(key)
    builder = wire.TableBuilder(zstd_level=1)
    tables = wire.MemoryTables()
    in_order = []
    for seq, series in enumerate(batches, start=1):
        table, placed = builder.place(series)
        in_order.append([s for _, s in placed])
        chain.frames[seq] = wire.sign_batch(wire.prepare_columns(table, placed, 1, T0), chain._ctx(seq))
        opened = wire.open_batch(chain.frames[seq], lambda k: trust.lookup(ledger.conn, k), wire.OpenLimits(),
                                 series_tables=tables, attached_table=table.blob)
        assert isinstance(opened, wire.VerifiedBatch), opened
        (outcome,) = ledger.commit([Submission(opened.frame, record, time.time(), table=opened.table)])
        assert outcome.result == "accepted", outcome
    return [r[0] for r in ledger.conn.execute("SELECT rowid FROM batches ORDER BY seq")], in_order


def _by_series_path(ledger: Ledger, rowid: int) -> rw.Encoded:
    """The batch as the forwarder encoded every batch before wire v2 had its columns path:
    opened to wire.Series, then one encode_timeseries per series."""
    (frame,) = ledger.conn.execute("SELECT frame FROM batches WHERE rowid = ?", (rowid,)).fetchone()
    encoder = rw.Encoder(ledger.conn, wire.OpenLimits())
    opened = wire.open_batch(bytes(frame), encoder.keys, encoder.limits, series_tables=encoder.series_tables)
    assert isinstance(opened, wire.VerifiedBatch) and opened.columns is not None and opened.series
    return encoder.encode_series(rowid, opened.header.site, opened.header.node, opened.series)


def _bodies(encoded: list[rw.Encoded], budget: int) -> list[bytes]:
    return [rw.proto.encode_write_request([s for _, s, _ in q.series])
            for q in rw.requests_for(encoded, lambda name: True, budget)]


def _f64_bits(value: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", value))[0])


T0 = 1_700_000_000_000
SPECIAL = wire.Series("node_special", (("site", "elsewhere"), ("node", "x"), ("zone", "a")), wire.MetricType.GAUGE,
                      (T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4),
                      (0.0, -0.0, float("inf"), struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0], 1.5))
RESERVED = wire.Series("waystation_remote_write_lag_seconds", (("target", "vm"),), wire.MetricType.GAUGE,
                       (T0, T0 + 1), (0.0, 1.0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(series_lists(), min_size=1, max_size=3), st.integers(1, 40))
def test_a_v2_batch_gives_the_very_requests_the_series_path_gave(batches: list[list[wire.Series]], budget: int) -> None:
    batches = [[*b[:2], SPECIAL, *b[2:], RESERVED] for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.db")
        try:
            rowids, batches = _commit_v2(ledger, batches)
            encoder = rw.Encoder(ledger.conn, wire.OpenLimits())
            encoded = [encoder.encoded(r) for r in rowids]
            old = [_by_series_path(ledger, r) for r in rowids]
            assert encoded == old  # names, field bytes, samples, reserved: all of them, byte for byte
            assert _bodies(encoded, budget) == _bodies(old, budget)
            for enc, series in zip(encoded, batches, strict=True):
                assert enc.reserved == len(RESERVED.values) and not enc.problem
                decoded = rw.proto.decode_write_request(rw.proto.encode_write_request([f for _, f, _ in enc.series]))
                sent = [s for s in series if s is not RESERVED]
                assert [n for n, _, _ in enc.series] == [s.name for s in sent]
                for (labels, points), s in zip(decoded, sent, strict=True):
                    want = {k: v for k, v in s.labels if k not in ("site", "node")}
                    assert dict(labels) == {**want, "__name__": s.name, "site": SITE, "node": NODE}
                    assert [t for t, _ in points] == list(s.timestamps_ms)
                    assert [_f64_bits(v) for _, v in points] == [_f64_bits(v) for v in s.values]
        finally:
            ledger.close()


def test_v2_label_caches_stay_bounded_and_right(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each batch brings a new table (a fresh builder per batch): one cache entry each.
    builder_per_batch = [[wire.Series(f"m{i}_{j}", (("i", str(j)),), wire.MetricType.GAUGE, (T0 + i,), (float(j),))
                          for j in range(20)] for i in range(6)]
    key = SigningKey.generate()
    record = trust.enroll(ledger.conn, SITE, NODE, bytes(key.verify_key))
    chain = Chain(key)
    for seq, series in enumerate(builder_per_batch, start=1):
        table, placed = wire.TableBuilder(zstd_level=1).place(series)
        chain.frames[seq] = wire.sign_batch(wire.prepare_columns(table, placed, 1, T0), chain._ctx(seq))
        opened = wire.open_batch(chain.frames[seq], lambda k: trust.lookup(ledger.conn, k), wire.OpenLimits(),
                                 attached_table=table.blob, series_tables=wire.MemoryTables())
        assert isinstance(opened, wire.VerifiedBatch)
        ledger.commit([Submission(opened.frame, record, time.time(), table=opened.table)])
    rowids = [r[0] for r in ledger.conn.execute("SELECT rowid FROM batches ORDER BY seq")]
    encoder = rw.Encoder(ledger.conn, wire.OpenLimits())
    one_table = encoder.labels_of(encoder.series_tables.get(SITE, NODE, wire.table_id(
        ledger.conn.execute("SELECT blob FROM series_tables LIMIT 1").fetchone()[0])) or pytest.fail(), SITE, NODE)
    monkeypatch.setattr(rw, "LABEL_TABLES_MAX", 3)
    monkeypatch.setattr(rw, "LABEL_TABLE_BYTES_MAX", 2 * one_table.nbytes + 1)
    for _ in range(2):
        for r in rowids:
            encoder.cache.clear()
            assert encoder.encoded(r) == _by_series_path(ledger, r)
            assert len(encoder.table_labels) <= 2
            assert encoder.table_label_bytes == sum(t.nbytes for t in encoder.table_labels.values())
    monkeypatch.setattr(rw, "LABEL_TABLE_BYTES_MAX", 1)  # the entry being used stays, whatever its size
    encoder.cache.clear()
    assert encoder.encoded(rowids[0]) == _by_series_path(ledger, rowids[0])
    assert len(encoder.table_labels) == 1


def test_a_v1_batch_still_takes_the_series_path(ledger: Ledger) -> None:
    _fill(ledger, 1)
    encoder = rw.Encoder(ledger.conn, wire.OpenLimits())
    enc = encoder.encoded(1)
    assert [name for name, _, _ in enc.series] == ["node_load1", "waystation_agent_spool_pending_batches"]
    assert not encoder.table_labels and len(encoder.labels) == 2


def test_a_v2_batch_of_no_series_or_only_reserved_ones_sends_nothing(ledger: Ledger) -> None:
    rowids, _ = _commit_v2(ledger, [[RESERVED], [], [RESERVED, SPECIAL]])
    encoder = rw.Encoder(ledger.conn, wire.OpenLimits())
    assert [(e.series, e.reserved, e.problem) for e in map(encoder.encoded, rowids[:2])] == [([], 2, ""), ([], 0, "")]
    last = encoder.encoded(rowids[2])
    assert [name for name, _, n in last.series] == ["node_special"] and last.reserved == 2
    assert last == _by_series_path(ledger, rowids[2])
