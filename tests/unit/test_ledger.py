"""Ledger and trust over real SQLite files: idempotency, chain, watermark, drops, keys."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

import wire
from collector import trust
from collector.ledger import IntervalSet, Ledger, Submission, connect, read_nodes

SITE, NODE = "s1", "n1"
T0 = 1_700_000_000_000


class Chain:
    """Builds a node's batches the way the agent signs them: seq +1, prev_hash = hash of seq-1."""

    def __init__(self, key: SigningKey, site: str = SITE, node: str = NODE) -> None:
        self.key, self.site, self.node = key, site, node
        self.frames: dict[int, bytes] = {}

    def _ctx(self, seq: int, key: SigningKey | None = None) -> wire.BatchContext:
        prev = wire.batch_hash(self.frames[seq - 1]) if seq > 1 else wire.ZERO_HASH
        return wire.BatchContext(key or self.key, self.site, self.node, seq, prev, T0 + seq, seq, 3)

    def data(self, seq: int, value: float = 1.0, key: SigningKey | None = None) -> bytes:
        series = [
            wire.Series("node_load1", (), wire.MetricType.GAUGE, (T0 + seq * 1000,), (value,)),
            wire.Series(
                "waystation_agent_spool_pending_batches", (), wire.MetricType.GAUGE,
                (T0 + seq * 1000,), (float(seq),),
            ),
        ]
        self.frames[seq] = wire.encode_data_batch(self._ctx(seq, key), series)
        return self.frames[seq]

    def drop(self, seq: int, ranges: tuple[tuple[int, int], ...], samples: int = 10) -> bytes:
        batches = sum(b - a + 1 for a, b in ranges)
        receipt = wire.DropReceipt(ranges, T0, T0 + 1, batches, samples, 1234, "quota")
        self.frames[seq] = wire.encode_drop_receipt(self._ctx(seq), receipt)
        return self.frames[seq]

    def rotation(self, seq: int, new_key: SigningKey) -> bytes:
        self.frames[seq] = wire.encode_key_rotation(self._ctx(seq), new_key)
        return self.frames[seq]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    yield led  # type: ignore[misc]
    led.close()


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def record(ledger: Ledger, key: SigningKey) -> trust.KeyRecord:
    return trust.enroll(ledger.conn, SITE, NODE, bytes(key.verify_key))


def submit(ledger: Ledger, record: trust.KeyRecord, *frames: bytes) -> list[str]:
    subs = []
    for raw in frames:
        frame = wire.parse_frame(raw)
        payload = wire.decompress_payload(frame, 1 << 20)
        drop = rotation = None
        if frame.header.kind == wire.Kind.DROP_RECEIPT:
            drop = wire.decode_drop_receipt(payload)
        elif frame.header.kind == wire.Kind.KEY_ROTATION:
            rotation = wire.decode_key_rotation(frame, payload)
        subs.append(Submission(frame, record, time.time(), drop=drop, rotation=rotation))
    return [o.result for o in ledger.commit(subs)]


def test_in_order_batches_advance_the_watermark(ledger: Ledger, record: trust.KeyRecord, key: SigningKey) -> None:
    chain = Chain(key)
    assert submit(ledger, record, chain.data(1), chain.data(2), chain.data(3)) == ["accepted"] * 3
    state = ledger.state(SITE, NODE)
    assert state is not None
    assert (state.complete_through, state.highest_seq, state.gap_seqs) == (3, 3, 0)
    assert ledger.frame(SITE, NODE, 2) == chain.frames[2]


def test_identical_resend_is_a_duplicate_and_changes_nothing(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    assert submit(ledger, record, chain.data(1)) == ["accepted"]
    assert submit(ledger, record, chain.frames[1]) == ["duplicate"]
    # Within one group as well: the second copy sees the first.
    assert submit(ledger, record, chain.data(2), chain.frames[2]) == ["accepted", "duplicate"]
    state = ledger.state(SITE, NODE)
    assert state is not None and state.stored_batches == 2 and state.tamper_events == 0


def test_same_seq_with_other_content_is_a_conflict(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    original = chain.data(1, value=1.0)
    assert submit(ledger, record, original) == ["accepted"]
    assert submit(ledger, record, Chain(key).data(1, value=2.0)) == ["conflict"]
    state = ledger.state(SITE, NODE)
    assert state is not None and state.conflicts == 1 and state.tamper_events == 1
    assert ledger.frame(SITE, NODE, 1) == original


def test_prev_hash_must_match_the_stored_predecessor(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    submit(ledger, record, chain.data(1))
    forged = Chain(key)
    forged.frames[1] = Chain(key).data(1, value=99.0)  # a different seq 1 than the ledger holds
    assert submit(ledger, record, forged.data(2)) == ["chain_mismatch"]
    assert submit(ledger, record, chain.data(2)) == ["accepted"]
    state = ledger.state(SITE, NODE)
    assert state is not None and state.chain_breaks == 1 and state.highest_seq == 2


def test_stored_successor_must_name_the_arriving_batch(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    chain.data(1)
    assert submit(ledger, record, chain.data(2)) == ["accepted"]  # seq 1 not here yet: no check
    impostor = Chain(key).data(1, value=42.0)
    assert submit(ledger, record, impostor) == ["chain_mismatch"]
    assert submit(ledger, record, chain.frames[1]) == ["accepted"]
    state = ledger.state(SITE, NODE)
    assert state is not None and state.complete_through == 2 and state.chain_breaks == 1


def test_seq_one_starts_the_chain_with_a_zero_hash(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    ctx = wire.BatchContext(key, SITE, NODE, 1, b"\x01" * 32, T0, 1, 3)
    frame = wire.encode_data_batch(
        ctx, [wire.Series("up", (), wire.MetricType.GAUGE, (T0,), (1.0,))]
    )
    assert submit(ledger, record, frame) == ["chain_mismatch"]


def test_out_of_order_arrival_keeps_gaps_until_backfill(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    for seq in range(1, 8):
        chain.data(seq)
    # The live lane sends the newest first; backfill follows oldest-first.
    assert submit(ledger, record, chain.frames[7]) == ["accepted"]
    state = ledger.state(SITE, NODE)
    assert state is not None
    assert (state.complete_through, state.highest_seq, state.gap_seqs) == (0, 7, 6)
    assert state.gap_ranges == ((1, 6),)
    submit(ledger, record, chain.frames[1], chain.frames[2], chain.frames[5])
    state = ledger.state(SITE, NODE)
    assert state is not None
    assert (state.complete_through, state.gap_seqs, state.gap_ranges) == (2, 3, ((3, 4), (6, 6)))
    submit(ledger, record, chain.frames[3], chain.frames[4], chain.frames[6])
    state = ledger.state(SITE, NODE)
    assert state is not None and (state.complete_through, state.gap_seqs) == (7, 0)


def test_drop_receipt_covers_evicted_seqs(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    for seq in (1, 2, 3, 4, 5):
        chain.data(seq)
    receipt = chain.drop(6, ((2, 3), (5, 5)), samples=17)
    assert submit(ledger, record, chain.frames[1], receipt) == ["accepted", "accepted"]
    state = ledger.state(SITE, NODE)
    assert state is not None
    assert (state.complete_through, state.highest_seq, state.gap_seqs) == (3, 6, 1)
    assert state.gap_ranges == ((4, 4),)
    assert (state.dropped_batches, state.dropped_samples) == (3, 17)
    submit(ledger, record, chain.frames[4])
    state = ledger.state(SITE, NODE)
    assert state is not None and (state.complete_through, state.gap_seqs) == (6, 0)


def test_drop_receipt_does_not_count_what_arrived(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    """The node evicts what it never saw acked; some of it reached the collector (the ack
    was lost). Only what is not recorded is lost, and the counts never go back down."""
    chain = Chain(key)
    for seq in range(1, 7):
        chain.data(seq)  # two samples each
    # Acks for 2 and 3 were lost; the node evicts 2..4 (six samples) and says so, with
    # overlapping ranges, which must not count a recorded batch twice.
    assert submit(ledger, record, chain.frames[1], chain.frames[2], chain.frames[3],
                  chain.drop(7, ((2, 4), (3, 3)), samples=6)) == ["accepted"] * 4
    state = ledger.state(SITE, NODE)
    assert state is not None and (state.dropped_batches, state.dropped_samples) == (1, 2)
    # Seq 5 evicted while its request was still on the way: the receipt comes first and
    # counts it; when the batch lands after all, the counters stay (a counter going down
    # reads as a reset, i.e. as fresh loss, in Prometheus).
    chain.data(8)
    assert submit(ledger, record, chain.drop(9, ((5, 5),), samples=2)) == ["accepted"]
    assert submit(ledger, record, chain.frames[5]) == ["accepted"]
    state = ledger.state(SITE, NODE)
    assert state is not None and (state.dropped_batches, state.dropped_samples) == (2, 4)
    assert state.gap_ranges == ((6, 6), (8, 8))


def test_merged_ranges() -> None:
    from collector.ledger import merged_ranges

    assert merged_ranges([(5, 6), (1, 2), (2, 3), (8, 8), (7, 7)]) == [(1, 3), (5, 8)]
    assert merged_ranges([]) == []


def test_key_rotation_retires_the_old_key_after_its_seq(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    new_key = SigningKey.generate()
    assert submit(ledger, record, chain.data(1), chain.rotation(2, new_key)) == ["accepted"] * 2
    old = trust.lookup(ledger.conn, record.key_id)
    new = trust.lookup(ledger.conn, wire.key_id(bytes(new_key.verify_key)))
    assert old is not None and new is not None
    assert old.state == "retired" and old.valid_through_seq == 2
    assert (new.state, new.site, new.node, new.valid_from_seq) == ("enrolled", SITE, NODE, 3)
    assert old.refusal(SITE, NODE, 2) is None  # a resent rotation is still a duplicate
    assert old.refusal(SITE, NODE, 3) is not None and old.refusal(SITE, NODE, 3)[0] == "revoked"  # type: ignore[index]
    assert new.refusal(SITE, NODE, 3) is None
    assert new.refusal(SITE, NODE, 2) is not None
    assert submit(ledger, new, chain.data(3, key=new_key)) == ["accepted"]


def test_revocation_and_node_binding(ledger: Ledger, record: trust.KeyRecord, key: SigningKey) -> None:
    assert record.refusal(SITE, NODE, 1) is None
    wrong = record.refusal(SITE, "n2", 1)
    assert wrong is not None and wrong[0] == "unknown_key"
    revoked = trust.revoke(ledger.conn, NODE)
    assert [k.state for k in revoked] == ["revoked"]
    now = trust.lookup(ledger.conn, record.key_id)
    assert now is not None and now.refusal(SITE, NODE, 1) == (
        "revoked", f"key {record.key_id.hex()} of {SITE}/{NODE} is revoked"
    )
    # Re-enrolling is the operator's explicit way back.
    assert trust.enroll(ledger.conn, SITE, NODE, bytes(key.verify_key)).state == "enrolled"


def test_one_key_serves_one_node_only(ledger: Ledger, record: trust.KeyRecord, key: SigningKey) -> None:
    with pytest.raises(trust.TrustError, match="already enrolled for s1/n1"):
        trust.enroll(ledger.conn, SITE, "n2", bytes(key.verify_key))


def test_revoke_refuses_an_ambiguous_node_name(ledger: Ledger, record: trust.KeyRecord) -> None:
    trust.enroll(ledger.conn, "s2", NODE, bytes(SigningKey.generate().verify_key))
    with pytest.raises(trust.TrustError, match="--site"):
        trust.revoke(ledger.conn, NODE)
    assert [k.state for k in trust.revoke(ledger.conn, NODE, "s2")] == ["revoked"]
    assert trust.lookup(ledger.conn, record.key_id).state == "enrolled"  # type: ignore[union-attr]


def test_state_survives_reopening(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "ledger.db"
    led = Ledger(path)
    rec = trust.enroll(led.conn, SITE, NODE, bytes(key.verify_key))
    chain = Chain(key)
    for seq in range(1, 6):
        chain.data(seq)
    submit(led, rec, chain.frames[1], chain.frames[2], chain.frames[5], chain.drop(6, ((3, 3),)))
    before = led.state(SITE, NODE)
    led.close()
    led = Ledger(path)
    try:
        assert led.state(SITE, NODE) == before
        assert before is not None and before.gap_ranges == ((4, 4),)
        assert [frame for frame, _ in led.replay_frames(None)] == [chain.frames[5]]
        submit(led, rec, chain.frames[4])
        after = led.state(SITE, NODE)
        assert after is not None and after.complete_through == 6
        nodes = read_nodes(connect(path, create=False))
        assert nodes[0]["complete_through"] == 6 and nodes[0]["keys"][0]["state"] == "enrolled"
        assert nodes[0]["reported_backlog"] == {"batches": None, "bytes": None}
    finally:
        led.close()


def test_a_failed_group_records_nothing(ledger: Ledger, record: trust.KeyRecord, key: SigningKey) -> None:
    chain = Chain(key)
    submit(ledger, record, chain.data(1))
    good = wire.parse_frame(chain.data(2))
    ledger.conn.execute("CREATE TRIGGER boom BEFORE INSERT ON batches WHEN NEW.seq = 3 "
                        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    with pytest.raises(Exception, match="disk on fire"):
        third = wire.parse_frame(chain.data(3))
        ledger.commit([Submission(good, record, time.time()), Submission(third, record, time.time())])
    state = ledger.state(SITE, NODE)
    assert state is not None and state.highest_seq == 1 and state.complete_through == 1
    ledger.conn.execute("DROP TRIGGER boom")
    assert [o.result for o in ledger.commit([Submission(good, record, time.time())])] == ["accepted"]


def test_a_batch_whose_values_cannot_be_stored_fails_only_itself(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    other_key = SigningKey.generate()
    other = trust.enroll(ledger.conn, SITE, "n2", bytes(other_key.verify_key))
    chain, other_chain = Chain(key), Chain(other_key, node="n2")
    good = wire.parse_frame(chain.data(1))
    # What a u64 seq beyond SQLite's signed 64 bits looked like before the wire refused it.
    frame = wire.parse_frame(other_chain.data(1))
    huge = dataclasses.replace(frame, header=dataclasses.replace(frame.header, seq=2**63))
    after = wire.parse_frame(chain.data(2))
    outcomes = ledger.commit([Submission(good, record, time.time()), Submission(huge, other, time.time()),
                              Submission(after, record, time.time())])
    assert [o.result for o in outcomes] == ["accepted", "malformed", "accepted"]
    assert "cannot be recorded" in outcomes[1].detail
    state = ledger.state(SITE, NODE)
    assert state is not None and state.complete_through == 2
    assert ledger.state(SITE, "n2") is None or ledger.state(SITE, "n2").highest_seq == 0  # type: ignore[union-attr]


def test_drop_receipt_counts_near_the_int64_limit_saturate(
    ledger: Ledger, record: trust.KeyRecord, key: SigningKey
) -> None:
    chain = Chain(key)
    submit(ledger, record, chain.data(1))
    chain.data(2)  # evicted, never sent
    for seq in (3, 4):  # two receipts naming it, each claiming the most samples a receipt may
        receipt = wire.DropReceipt(((2, 2),), T0, T0 + 1, 1, 2**63 - 1, 1, "quota")
        chain.frames[seq] = wire.encode_drop_receipt(chain._ctx(seq), receipt)
        assert submit(ledger, record, chain.frames[seq]) == ["accepted"]
    state = ledger.state(SITE, NODE)
    assert state is not None and state.dropped_samples == 2**63 - 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 5)), max_size=30), st.integers(1, 70))
def test_interval_set_matches_a_plain_set(adds: list[tuple[int, int]], upto: int) -> None:
    model: set[int] = set()
    iv = IntervalSet()
    for first, width in adds:
        iv.add(first, first + width)
        model.update(range(first, first + width + 1))
    assert iv.count == len(model)
    assert all((s in iv) == (s in model) for s in range(0, 70))
    w = 0
    while w + 1 in model:
        w += 1
    assert iv.prefix_end() == w
    missing = [s for s in range(1, upto + 1) if s not in model]
    expanded = [s for a, b in iv.gaps(upto, 1000) for s in range(a, b + 1)]
    assert expanded == missing
    assert len(iv.gaps(upto, 2)) <= 2
