"""End to end on loopback: an air-gapped site, carried by hand, into a real collector and VictoriaMetrics.

A real agent runs with its uplink pointed at a closed loopback port (nothing ever answers)
and sealing on (the collector's `keygen` line pinned under [uplink]), for AIRGAP_S seconds
with 2 s windows and a batch every 4 s, so it builds up a spool of sealed batches no one
has acknowledged. Then, with the agent stopped:

- `waystation-agent export` writes them into one bundle (the frames exactly as signed,
  unreadable off the collector: no metric name in it);
- `waystation-collector import --receipt-out` commits them into a RUNNING collector that
  remote-writes to a real VictoriaMetrics 1.79 (Debian's `victoria-metrics`);
- `waystation-agent import-receipt` deletes them from the spool.

test_round_trip_...: the import goes through the running serve (its /metrics shows the
node at once); the ledger holds exactly the spool's frames, marked as come in that bundle;
after the receipt the spool is empty; VictoriaMetrics holds every sample of every batch at
its original timestamp (the node's, all before the import), as decoded from the ledger
through wire.open_batch with the collector's sealing keys; `audit` is clean; `provenance`
names the bundle file for an imported sample; importing the bundle again changes nothing.
test_tampered_bundle_...: copies of the bundle, each imported into a fresh collector with
the same keys: a byte flipped inside one frame (that seq refused as bad_signature and
named, the rest kept, and the receipt leaves exactly that frame in a copy of the node's
spool); the file cut short inside a frame (what precedes the cut kept, the truncation
named); two neighbouring frame records swapped (all kept, the order named). Each exits 1.
test_tampered_ledger_...: a byte flipped in a stored frame and a deleted row: `audit`
exits 1 naming node, seq and problem for each, and nothing else.

The agent's run is shared by the three tests (one module fixture). It lasts AIRGAP_S
(WAYSTATION_E2E_AIRGAP_S, default 180 s: several minutes of sealed batches, ~45 of them).
The module takes about AIRGAP_S + 30 s (~3 min 30 s on the 2-core development machine):
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_airgap.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import wire
from collector import keyring, trust
from collector.tables import LedgerTables
from tests.conftest import free_port
from tests.e2e.receivers import VICTORIA_METRICS, KillableCollector, Samples, VictoriaMetricsReceiver, ms_to_param
from tests.e2e.test_remote_write import diff, norm
from tests.integration.harness import ENV, Agent, Collector, plaintext_hits, wait_for
from wire.bundle import RECORD_OVERHEAD

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(VICTORIA_METRICS is None,
                       reason="needs victoria-metrics (apt-get install victoria-metrics)"),
]

AIRGAP_S = float(os.environ.get("WAYSTATION_E2E_AIRGAP_S", "180"))

SITE, NODE = "lab", "node-1"
TARGET = "victoria"  # the name test_remote_write.diff() compares with VictoriaMetrics' tolerance
PROBE = "node_cpu_seconds_total"
PROBE_LABELS = {"cpu": "0", "mode": "idle"}
EVERYTHING = '{__name__=~".+"}'  # VictoriaMetrics holds nothing but what the collector sent
AGENT_TOML = """
[summary]
window = "2s"
flush_interval = "4s"
[sources.system]
interval = "1s"
[sources.gpu]
enabled = false
[sources.smart]
enabled = false
[sources.network]
enabled = false
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def run_cli(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", tool, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def shown(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout:\n{r.stdout[-4000:]}\n--- stderr:\n{r.stderr[-4000:]}"


def import_bundles(data_dir: Path, *bundles: Path, receipt: Path | None = None,
                   config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("collector", "import", *map(str, bundles),
                   *(["--receipt-out", str(receipt)] if receipt else []),
                   *(["--config", str(config)] if config else []), "--data-dir", str(data_dir))


# -- what the agent built: the spool's frames and the bundle ----------------------------------

@dataclass
class AirGap:
    tmp: Path
    agent: Agent
    central: Path  # the collector's data_dir: its key pair, the node enrolled
    bundle: Path
    frames: dict[int, bytes]  # seq -> the frame as the agent signed it (read from its spool)
    node_public_key: str
    pin_line: str  # collector_key = "wsc1:..."
    spool_after_export: Path  # a copy of the node's state dir right after the export
    run_started_ms: int
    exported_ms: int

    def fresh_collector(self, name: str) -> Collector:
        """Another collector with the same key pair (it can open the sealed payloads) and
        the node enrolled; no ledger history."""
        data_dir = self.tmp / name
        data_dir.mkdir()
        shutil.copy2(keyring.current_path(self.central), keyring.current_path(data_dir))
        c = Collector(data_dir)
        c.enroll(SITE, NODE, self.node_public_key)
        return c

    def node_copy(self, name: str) -> Agent:
        """The node as it was right after the export (its spool and key), for a receipt."""
        node = Agent(self.tmp / name, f"http://127.0.0.1:{free_port()}", extra_toml=AGENT_TOML, site=SITE, node=NODE,
                     uplink_toml=self.pin_line + "\n")
        shutil.copytree(self.spool_after_export, node.state_dir)
        return node


def spool_frames(agent: Agent) -> dict[int, bytes]:
    db = sqlite3.connect(f"file:{agent.state_dir / 'spool.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {int(seq): bytes(frame) for seq, frame in db.execute("SELECT seq, frame FROM batches ORDER BY seq")}
    finally:
        db.close()


@pytest.fixture(scope="module")
def airgap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirGap]:
    tmp = tmp_path_factory.mktemp("airgap")
    central = tmp / "central"
    r = run_cli("collector", "keygen", "--data-dir", str(central))
    assert r.returncode == 0, shown(r)
    (pin,) = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("collector_key = ")]
    nowhere = f"http://127.0.0.1:{free_port()}"  # a closed port: no collector will ever answer
    agent = Agent(tmp / "site", nowhere, extra_toml=AGENT_TOML, site=SITE, node=NODE,
                  uplink_toml=f'{pin}\nstop_grace = "1s"\n')
    node_key = agent.keygen()
    Collector(central).enroll(SITE, NODE, node_key)

    started = now_ms()
    agent.start()
    try:
        deadline = time.monotonic() + AIRGAP_S
        while time.monotonic() < deadline:  # checked every second, not one long sleep
            assert agent.proc is not None and agent.proc.poll() is None, \
                f"agent exited: {agent.log.read_text(errors='replace')[-3000:]}"
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        st = agent.status()
        assert st["last_ack_ms"] is None, f"something acknowledged batches of an air-gapped agent: {st}"
        assert st["pending_batches"] >= AIRGAP_S / 4 * 0.6, st
    finally:
        agent.stop()
    frames = spool_frames(agent)
    assert len(frames) >= AIRGAP_S / 4 * 0.6 and list(frames) == list(range(1, len(frames) + 1)), list(frames)
    assert all(wire.parse_frame(f).header.flags & wire.FLAG_SEALED for f in frames.values()
               if wire.parse_frame(f).header.kind == wire.Kind.DATA)

    stick = tmp / "usb-stick"
    stick.mkdir()
    bundle = stick / f"{NODE}.wsb"
    r = agent.cli("export", "--out", str(bundle))
    assert r.returncode == 0, shown(r)
    exported = now_ms()
    snapshot = tmp / "spool-after-export"
    shutil.copytree(agent.state_dir, snapshot)
    yield AirGap(tmp, agent, central, bundle, frames, node_key, pin, snapshot, started, exported)


def frame_spans(ag: AirGap, blob: bytes) -> dict[int, tuple[int, int]]:
    """seq -> (start, end) of each spool frame in the bundle's bytes (each must be there, once)."""
    spans: dict[int, tuple[int, int]] = {}
    for seq, frame in ag.frames.items():
        at = blob.find(frame)
        assert at >= 0, f"seq {seq}'s frame, exactly as signed, is not in {ag.bundle.name}"
        assert blob.find(frame, at + 1) < 0, f"seq {seq}'s frame is in {ag.bundle.name} twice"
        spans[seq] = (at, at + len(frame))
    return spans


# -- the ledger ---------------------------------------------------------------------------------

def ledger_rows(data_dir: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(query, params).fetchall()
    finally:
        db.close()


def ledger_frames(data_dir: Path) -> dict[int, bytes]:
    return {int(seq): bytes(f) for seq, f in ledger_rows(
        data_dir, "SELECT seq, frame FROM batches WHERE site = ? AND node = ? ORDER BY seq", (SITE, NODE))}


def ledger_batches(data_dir: Path) -> dict[int, wire.VerifiedBatch]:
    """The node's stored data batches, opened as every reader opens them: wire.open_batch with
    the recorded node key, the collector's sealing keys and, for a v2 batch, the series table
    the ledger holds for it (each must verify)."""
    sealing = keyring.load_sealing_keys(keyring.sealing_key_files(data_dir))
    conn = sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
    out: dict[int, wire.VerifiedBatch] = {}
    try:
        tables = LedgerTables(conn, wire.DEFAULT_OPEN_LIMITS, sealing)
        rows = conn.execute("SELECT seq, frame FROM batches WHERE site = ? AND node = ? AND kind = ? ORDER BY seq",
                            (SITE, NODE, int(wire.Kind.DATA))).fetchall()
        for seq, frame in rows:
            opened = wire.open_batch(bytes(frame), lambda kid: trust.lookup_recorded(conn, kid),
                                     sealing_keys=sealing, series_tables=tables)
            assert isinstance(opened, wire.VerifiedBatch), f"ledger seq {seq} does not open: {opened}"
            out[int(seq)] = opened
    finally:
        conn.close()
    return out


def samples_of(batches: dict[int, wire.VerifiedBatch]) -> Samples:
    """Every sample of the batches, labelled as remote_write sends it: the series' own labels,
    __name__, and site and node from the (verified) header."""
    out: Samples = {}
    for batch in batches.values():
        h = batch.header
        for s in batch.series:
            labels = {k: v for k, v in s.labels if k not in ("site", "node")}
            labels.update(__name__=s.name, site=h.site, node=h.node)
            out.setdefault(norm(labels), []).extend(zip(s.timestamps_ms, s.values, strict=True))
    for pts in out.values():
        pts.sort(key=lambda p: p[0])
    return out


def probe_points(samples: Samples) -> list[tuple[int, float]]:
    """The probe series' points (exactly one series must match)."""
    want = norm({"__name__": PROBE, "site": SITE, "node": NODE, **PROBE_LABELS})
    matches = [pts for labels, pts in samples.items() if labels == want]
    assert len(matches) == 1, f"{len(matches)} series are {sorted(want)}"
    return matches[0]


def probe_batch(batches: dict[int, wire.VerifiedBatch], at_ms: int) -> int:
    """The seq of the batch that carries the probe's point at `at_ms`."""
    (seq,) = [seq for seq, b in batches.items() for s in b.series
              if s.name == PROBE and set(PROBE_LABELS.items()) <= set(s.labels) and at_ms in s.timestamps_ms]
    return seq


# -- the tests ----------------------------------------------------------------------------------

@pytest.mark.timeout(AIRGAP_S + 300)
def test_round_trip_empties_the_spool_and_victoria_metrics_holds_every_sample_at_its_time(
    airgap: AirGap, tmp_path: Path
) -> None:
    ag = airgap
    blob = ag.bundle.read_bytes()
    frame_spans(ag, blob)
    assert plaintext_hits(blob, (b"node_cpu_seconds_total", b"node_load1", b"node_memory_MemAvailable_bytes")) \
        == set(), "the sealed bundle holds metric names in plain text"
    st = ag.agent.status()
    assert st["pending_batches"] == len(ag.frames), f"export must not delete anything before a receipt: {st}"

    vm = VictoriaMetricsReceiver(tmp_path)
    config = tmp_path / "collector.toml"
    config.write_text(f'[ledger]\nretention = "30d"\n[[remote_write]]\nname = "{TARGET}"\nurl = "{vm.write_url}"\n')
    collector = KillableCollector(ag.central, config=config)
    receipt = ag.bundle.with_name(f"{NODE}.receipt")
    try:
        vm.start()
        collector.start()

        def logs() -> str:
            return f"--- collector log:\n{collector.log_tail(3000)}\n--- victoria-metrics log:\n{vm.log_tail(1500)}"

        # Import into the running collector; carry the receipt back; import it.
        import_ms = now_ms()
        r = import_bundles(ag.central, ag.bundle, receipt=receipt, config=config)
        assert r.returncode == 0, shown(r) + logs()
        assert tally(r) == (len(ag.frames), 0, 0), shown(r)
        assert "imported through serve" in r.stdout, f"the running serve did not commit the import:\n{shown(r)}"
        assert receipt.is_file() and receipt.stat().st_size > 0
        held = ledger_frames(ag.central)
        assert held == ag.frames, (
            f"ledger seqs {sorted(held)} vs spool seqs {sorted(ag.frames)}; differing: "
            f"{sorted(s for s in ag.frames if held.get(s) != ag.frames[s])}")
        origins = set(ledger_rows(ag.central, "SELECT origin, origin_file FROM batches"))
        assert len(origins) == 1 and next(iter(origins))[0] == "bundle", origins
        assert ag.bundle.name in str(next(iter(origins))[1]), origins

        r = ag.agent.cli("import-receipt", str(receipt))
        assert r.returncode == 0, shown(r)
        st = ag.agent.status()
        assert st["pending_batches"] == 0 and st["pending_bytes"] == 0, st
        assert spool_frames(ag.agent) == {}, "the spool still holds batches after the receipt"

        # The running collector shows the imported node on /metrics ...
        def exposed() -> bool:
            return any(ln.startswith(PROBE) and f'node="{NODE}"' in ln for ln in collector.metrics().splitlines())

        wait_for(exposed, 30, f"{PROBE} of {SITE}/{NODE} on the collector's /metrics")

        # ... and its forwarder sends every sample, at its original timestamp, to VictoriaMetrics.
        batches = ledger_batches(ag.central)
        ledger = samples_of(batches)
        n_samples = sum(len(p) for p in ledger.values())
        signed = sum(n for (n,) in ledger_rows(ag.central, "SELECT sample_count FROM batches WHERE kind = 0"))
        assert n_samples == signed > 0
        newest = max(ts for pts in ledger.values() for ts, _ in pts)
        oldest = min(ts for pts in ledger.values() for ts, _ in pts)
        assert ag.run_started_ms - 5_000 <= oldest and newest <= ag.exported_ms < import_ms, \
            (oldest, newest, ag.run_started_ms, ag.exported_ms, import_ms)
        probe = probe_points(ledger)
        assert len(probe) >= AIRGAP_S / 2 * 0.6, f"{PROBE}{PROBE_LABELS}: {len(probe)} points over {AIRGAP_S} s"

        last: list[Any] = []

        def all_there() -> bool:
            got = vm.samples(EVERYTHING, oldest - 60_000, now_ms() + 60_000)
            last[:] = [diff(ledger, got, TARGET), got]
            return bool(last[0].ok)

        try:
            wait_for(all_there, 120, "VictoriaMetrics holding every ledger sample at its timestamp", interval=2.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{last[0].describe() if last else ''}\n{logs()}") from None
        d, got = last
        assert d.matched + d.nan_skipped == n_samples, d.describe()
        assert probe_points(got) == probe, "the probe series at VictoriaMetrics differs from the ledger's"

        # audit is clean; provenance names the bundle for an imported sample.
        r = collector.cli("audit")
        assert r.returncode == 0, shown(r)
        assert "audit clean" in r.stdout, shown(r)
        at_ms, _ = probe[len(probe) // 2]
        want_seq = probe_batch(batches, at_ms)
        r = collector.cli("provenance", "--site", SITE, "--node", NODE, "--metric", PROBE,
                          "--labels", ",".join(f"{k}={v}" for k, v in PROBE_LABELS.items()),
                          "--at", ms_to_param(at_ms), "--json")
        assert r.returncode == 0, shown(r)
        (found,) = json.loads(r.stdout)["found"]
        assert (found["seq"], found["timestamp_ms"], found["origin"]) == (want_seq, at_ms, "bundle"), found
        assert ag.bundle.name in str(found["origin_file"]), found
        r = collector.cli("provenance", "--site", SITE, "--node", NODE, "--metric", PROBE,
                          "--labels", ",".join(f"{k}={v}" for k, v in PROBE_LABELS.items()),
                          "--at", ms_to_param(at_ms))
        assert r.returncode == 0 and f"in bundle {found['origin_file']}" in r.stdout, shown(r)

        # The same bundle again: every frame a duplicate, nothing new anywhere.
        r = import_bundles(ag.central, ag.bundle, config=config)
        assert r.returncode == 0, shown(r)
        assert tally(r) == (0, len(ag.frames), 0), shown(r)
        assert ledger_frames(ag.central) == ag.frames
        time.sleep(3)  # a resend would show within a forwarder pass (~1 s)
        again = diff(ledger, vm.samples(EVERYTHING, oldest - 60_000, now_ms() + 60_000), TARGET)
        assert again.ok and again.duplicates == d.duplicates, again.describe()
    finally:
        collector.stop()
        vm.stop()


def tally(r: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    """(accepted, duplicates, refused) from import's line for the node."""
    m = re.search(rf"^{SITE}/{NODE}: (\d+) accepted, (\d+) duplicates?, (\d+) refused", r.stdout, re.M)
    assert m, f"import printed no accepted/duplicates/refused line for {SITE}/{NODE}:\n{shown(r)}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def names_seq(text: str, seq: int) -> bool:
    """Whether the text names this seq (alone, or starting or ending a range)."""
    return re.search(rf"\bseqs? (\d+[-,] ?)*{seq}\b", text) is not None


@pytest.mark.timeout(AIRGAP_S + 300)
def test_tampered_bundle_keeps_the_frames_that_verify_and_names_the_rest(airgap: AirGap) -> None:
    ag = airgap
    blob = ag.bundle.read_bytes()
    spans = frame_spans(ag, blob)
    seqs = sorted(spans)
    mid = seqs[len(seqs) // 2]
    start, end = spans[mid]
    tampered = ag.tmp / "tampered"
    tampered.mkdir(exist_ok=True)

    # 1. A byte flipped inside one frame (in its payload, which the signature covers).
    flipped = bytearray(blob)
    flipped[end - wire.SIGNATURE_LEN - 8] ^= 0x01
    path = tampered / "flipped.wsb"
    path.write_bytes(bytes(flipped))
    c = ag.fresh_collector("c-flipped")
    receipt = tampered / "flipped.receipt"
    r = import_bundles(c.data_dir, path, receipt=receipt)
    assert r.returncode == 1, shown(r)
    assert tally(r) == (len(seqs) - 1, 0, 1), shown(r)
    assert re.search(rf"refused seq {mid}\b.*bad_signature", r.stdout), f"seq {mid} (flipped) not named:\n{shown(r)}"
    assert ledger_frames(c.data_dir) == {s: f for s, f in ag.frames.items() if s != mid}, shown(r)
    # Its receipt leaves the refused frame on the node, which can export it again.
    node = ag.node_copy("site-flipped")
    r = node.cli("import-receipt", str(receipt))
    assert r.returncode == 0, shown(r)
    assert spool_frames(node) == {mid: ag.frames[mid]}, shown(r)

    # 2. Cut short inside a frame (a stick pulled out while copying).
    path = tampered / "truncated.wsb"
    path.write_bytes(blob[: (start + end) // 2])
    c = ag.fresh_collector("c-truncated")
    r = import_bundles(c.data_dir, path)
    assert r.returncode == 1, shown(r)
    # The manifest (at the end) is gone with the cut, so the cut frame's seq cannot be known:
    # the damage is named by its place in the file, and what was before it is kept.
    assert tally(r) == (mid - 1, 0, 0) and "truncated" in r.stdout, shown(r)
    assert ledger_frames(c.data_dir) == {s: f for s, f in ag.frames.items() if s < mid}, shown(r)

    # 3. Two neighbouring frames swapped, each with its record header (docs/bundle.md): every
    # record still reads and every frame still verifies on its own; the manifest's order does not.
    a, b = mid, mid + 1
    rec_a, rec_b = (spans[a][0] - RECORD_OVERHEAD, spans[a][1]), (spans[b][0] - RECORD_OVERHEAD, spans[b][1])
    assert rec_a[1] == rec_b[0], "seq a's record is not followed by seq a+1's"
    swapped = blob[: rec_a[0]] + blob[rec_b[0] : rec_b[1]] + blob[rec_a[0] : rec_a[1]] + blob[rec_b[1] :]
    assert len(swapped) == len(blob)
    path = tampered / "swapped.wsb"
    path.write_bytes(swapped)
    c = ag.fresh_collector("c-swapped")
    r = import_bundles(c.data_dir, path)
    assert r.returncode == 1, f"a reordered bundle must not import as clean:\n{shown(r)}"
    assert tally(r) == (len(seqs), 0, 0), shown(r)
    assert "order" in r.stdout and (names_seq(r.stdout, b) or names_seq(r.stdout, a)), \
        f"the swapped frames (seq {a}, {b}) are not named:\n{shown(r)}"
    assert ledger_frames(c.data_dir) == ag.frames, shown(r)


@pytest.mark.timeout(AIRGAP_S + 300)
def test_tampered_ledger_is_named_by_audit(airgap: AirGap) -> None:
    ag = airgap
    c = ag.fresh_collector("c-ledger")
    r = import_bundles(c.data_dir, ag.bundle)
    assert r.returncode == 0, shown(r)
    r = c.cli("audit")
    assert r.returncode == 0, shown(r)

    seqs = sorted(ag.frames)
    flip_seq, gone_seq = seqs[len(seqs) // 3], seqs[2 * len(seqs) // 3]
    conn = sqlite3.connect(c.data_dir / "ledger.db", isolation_level=None)
    try:
        raw = bytearray(conn.execute("SELECT frame FROM batches WHERE site = ? AND node = ? AND seq = ?",
                                     (SITE, NODE, flip_seq)).fetchone()[0])
        raw[-wire.SIGNATURE_LEN - 1] ^= 0x01  # the payload's last byte: the signature covers it
        conn.execute("UPDATE batches SET frame = ? WHERE site = ? AND node = ? AND seq = ?",
                     (bytes(raw), SITE, NODE, flip_seq))
        conn.execute("DELETE FROM batches WHERE site = ? AND node = ? AND seq = ?", (SITE, NODE, gone_seq))
    finally:
        conn.close()

    r = c.cli("audit", "--json")
    assert r.returncode == 1, shown(r)
    findings = {(f["site"], f["node"], f["seq"], f["problem"]) for f in json.loads(r.stdout)["findings"]}
    assert findings == {(SITE, NODE, flip_seq, "bad_signature"), (SITE, NODE, gone_seq, "missing")}, shown(r)
    r = c.cli("audit")
    assert r.returncode == 1, shown(r)
    assert f"{SITE}/{NODE} seq {flip_seq}: bad_signature" in r.stdout, shown(r)
    assert f"{SITE}/{NODE} seq {gone_seq}: missing" in r.stdout, shown(r)
