"""`waystation-collector import` on a bundle built to make its report huge and its output
hostile: what it keeps and prints is bounded, terminal control characters from names no one
verified are escaped, and the frames that verify are still committed and receipted."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import wire
from collector.bundles import MAX_MANIFESTS_KEPT, MAX_PROBLEMS_KEPT, MAX_REFUSALS_KEPT, MAX_UNPROVEN_NODES
from tests.integration.harness import Collector
from wire import bundle
from wire.keys import public_key_text

pytestmark = pytest.mark.timeout(240)

SITE, NODE = "lab", "n1"
ESCAPE_NAME = "evil\x1b[2J\x1b]0;owned\x07"


def frame(key: SigningKey, site: str, node: str, seq: int, prev: bytes) -> bytes:
    series = [wire.Series("m", (("k", "v"),), wire.MetricType.GAUGE, (1_700_000_000_000 + seq,), (float(seq),))]
    return wire.encode_data_batch(wire.BatchContext(key, site, node, seq, prev, 1, seq, 0), series)


def test_a_bundle_built_to_flood_the_report_is_bounded_escaped_and_still_imports_what_verifies(
        tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    key = SigningKey.generate()
    collector.enroll(SITE, NODE, public_key_text(bytes(key.verify_key)))
    assert collector.cli("keygen").returncode == 0

    good, prev = [], wire.ZERO_HASH
    for seq in (1, 2, 3):
        good.append(frame(key, SITE, NODE, seq, prev))
        prev = wire.batch_hash(good[-1])
    stranger = SigningKey.generate()  # enrolled nowhere
    invented = 3 * MAX_UNPROVEN_NODES  # node names, 4 frames each, none can verify
    foreign = [frame(stranger, SITE, f"ghost-{i % invented}", 1 + i // invented, wire.ZERO_HASH)
               for i in range(4 * invented)]
    escaped = frame(stranger, SITE, ESCAPE_NAME, 1, wire.ZERO_HASH)
    # n1's own seqs 10.. with a flipped payload bit: refused bad_signature; named one by one
    # only within MAX_REFUSALS_KEPT, which they share with the strangers' frames before them.
    forged = []
    for seq in range(10, 10 + MAX_REFUSALS_KEPT):
        raw = bytearray(frame(key, SITE, NODE, seq, wire.ZERO_HASH))
        raw[-70] ^= 0x01
        forged.append(bytes(raw))

    buf = io.BytesIO()
    w = bundle.BundleWriter(buf)
    for f in good:
        w.add(f)
    w.finish(key, SITE, NODE, 1)
    body = bytearray(buf.getvalue())
    junk = b"\x00junk\x00"  # each one a damaged stretch between two records
    for f in [escaped, *foreign, *forged]:
        body += junk + bundle.RECORD_SYNC + bytes((bundle.TAG_FRAME,)) + len(f).to_bytes(4, "little") + f
    for i in range(MAX_MANIFESTS_KEPT + 2):  # more manifests spliced in than are kept
        spliced = io.BytesIO()
        sw = bundle.BundleWriter(spliced)
        sw.finish(stranger, SITE, f"spliced-{i}", 1)
        body += spliced.getvalue()[len(bundle.BUNDLE_HEADER):]
    path = tmp_path / "flood.wsb"
    path.write_bytes(bytes(body))

    receipt = tmp_path / "r.wsr"
    r = collector.cli("import", str(path), "--receipt-out", str(receipt))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "\x1b" not in out and "\x07" not in out, "a control character from a bundle reached the terminal"
    assert "evil\\x1b[2J\\x1b]0;owned\\x07" in r.stdout, "the escaped name is not shown"

    lines = r.stdout.splitlines()
    assert f"{SITE}/{NODE}: 3 accepted, 0 duplicates, {MAX_REFUSALS_KEPT} refused" in lines, r.stdout[:2000]
    named = [ln for ln in lines if ln.startswith("  refused seq ")]
    assert len(named) == MAX_REFUSALS_KEPT
    named_forged = sum("bad_signature" in ln for ln in named)
    assert named_forged == MAX_REFUSALS_KEPT - 1 - 4 * (MAX_UNPROVEN_NODES - 1)
    assert f"  ... {MAX_REFUSALS_KEPT - named_forged} more refused, not named one by one (all refusals by " \
           f"reason: {MAX_REFUSALS_KEPT} bad_signature)" in lines
    # Every invented name but the first MAX_UNPROVEN_NODES is counted, not kept.
    ghosts = {ln.split(":")[0] for ln in lines if ln.startswith(f"{SITE}/ghost-")}
    assert len(ghosts) == MAX_UNPROVEN_NODES - 1  # the escaped name took one place first
    left_out = 4 * invented - 4 * len(ghosts)
    assert f"{left_out} more frames refused under names of {MAX_UNPROVEN_NODES}+ nodes that no frame or " \
           "manifest proved (not named one by one)" in lines
    problems = [ln for ln in lines if ln.startswith("  bytes ")]
    assert len(problems) <= MAX_PROBLEMS_KEPT
    assert any(ln.startswith("  ... and ") and ln.endswith("more problems, not named one by one") for ln in lines)
    assert f"only the first {MAX_MANIFESTS_KEPT} checked" in r.stdout
    assert len(lines) < MAX_REFUSALS_KEPT + MAX_PROBLEMS_KEPT + 3 * MAX_UNPROVEN_NODES + 50

    # What verified is committed and receipted, exactly.
    assert collector.ledger_rows("SELECT seq FROM batches ORDER BY seq") == [(1,), (2,), (3,)]
    (item,) = bundle.parse_receipt_file(receipt.read_bytes())
    rc = bundle.parse_receipt(item)
    assert rc.batches == tuple((i + 1, wire.batch_hash(f)) for i, f in enumerate(good))
