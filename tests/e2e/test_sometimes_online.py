"""End to end on loopback: a node that is sometimes online and sometimes carried by hand.

One real agent (sealing on) runs throughout against one collector port; the collector
(remote-writing to a real VictoriaMetrics) comes and goes, and bundles are exported and
imported while the agent keeps running and keeps retrying over HTTP:

1. online: batches go over HTTP;
2. the collector is down: the agent piles batches up; `export` while the agent runs;
3. the collector is back: its import of that bundle races the agent's own HTTP resends of
   the same batches; `import-receipt` runs beside the running agent;
4. the collector is down again: a second export, imported with serve stopped (directly into
   the ledger), then serve starts and the agent delivers the rest over HTTP; the receipt of
   the second bundle comes back after its batches were acknowledged over HTTP anyway.

At the end, with the agent stopped after a clean drain:
- the spool is empty and the ledger holds seq 1..N, each once, as one unbroken chain, some
  recorded from HTTP and the second bundle's all from its file;
- each import's accepted + duplicates is its bundle's frame count, and nothing is refused;
- VictoriaMetrics holds every sample of every batch at its original timestamp, once;
- `waystation-collector audit` is clean.

About 2 minutes on the 2-core development machine:
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_sometimes_online.py
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.receivers import VICTORIA_METRICS, KillableCollector, VictoriaMetricsReceiver
from tests.e2e.test_airgap import (
    AGENT_TOML,
    EVERYTHING,
    NODE,
    SITE,
    TARGET,
    import_bundles,
    ledger_batches,
    ledger_frames,
    ledger_rows,
    now_ms,
    run_cli,
    samples_of,
    shown,
    spool_frames,
    tally,
)
from tests.e2e.test_remote_write import diff
from tests.integration.harness import Agent, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(VICTORIA_METRICS is None,
                       reason="needs victoria-metrics (apt-get install victoria-metrics)"),
]

ONLINE_S = 15.0
OFFLINE_S = 25.0


def pause(agent: Agent, seconds: float) -> None:
    """Let time pass, checking every second that the agent still runs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert agent.proc is not None and agent.proc.poll() is None, \
            f"agent exited: {agent.log.read_text(errors='replace')[-3000:]}"
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def bundle_seqs(agent: Agent, blob: bytes) -> set[int]:
    """Which of the spool's frames, exactly as signed, the bundle carries."""
    return {seq for seq, f in spool_frames(agent).items() if blob.find(f) >= 0}


def test_a_node_sometimes_online_and_sometimes_carried_by_hand_delivers_every_batch_once(tmp_path: Path) -> None:
    central = tmp_path / "central"
    r = run_cli("collector", "keygen", "--data-dir", str(central))
    assert r.returncode == 0, shown(r)
    (pin,) = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("collector_key = ")]
    vm = VictoriaMetricsReceiver(tmp_path)
    config = tmp_path / "collector.toml"
    config.write_text(f'[ledger]\nretention = "30d"\n[[remote_write]]\nname = "{TARGET}"\nurl = "{vm.write_url}"\n')
    collector = KillableCollector(central, port=free_port(), config=config)
    agent = Agent(tmp_path / "site", collector.url, extra_toml=AGENT_TOML, site=SITE, node=NODE,
                  uplink_toml=f'{pin}\nstop_grace = "10s"\n')
    collector.enroll(SITE, NODE, agent.keygen())
    stick = tmp_path / "usb-stick"
    stick.mkdir()
    first, second = stick / "first.wsb", stick / "second.wsb"
    receipt1, receipt2 = stick / "first.receipt", stick / "second.receipt"

    def logs() -> str:
        return (f"--- collector log:\n{collector.log_tail(3000)}\n--- agent log:\n"
                f"{agent.log.read_text(errors='replace')[-3000:]}\n--- victoria-metrics log:\n{vm.log_tail(1500)}")

    started = now_ms()
    vm.start()
    try:
        # 1. Online.
        collector.start()
        agent.start()
        pause(agent, ONLINE_S)
        assert agent.status()["last_ack_ms"] is not None, logs()

        # 2. The uplink is gone; the agent keeps sampling; export beside the running agent.
        collector.stop()
        pause(agent, OFFLINE_S)
        r = agent.cli("export", "--out", str(first))
        assert r.returncode == 0, shown(r)
        in_first = bundle_seqs(agent, first.read_bytes())
        assert len(in_first) >= OFFLINE_S / 4 * 0.5, (sorted(in_first), shown(r))

        # 3. Back online: the import races the agent's own resends of the same batches.
        collector.start()
        r = import_bundles(central, first, receipt=receipt1, config=config)
        assert r.returncode == 0, shown(r) + logs()
        accepted, duplicates, refused = tally(r)
        assert (accepted + duplicates, refused) == (len(in_first), 0), (len(in_first), shown(r))
        assert "imported through serve" in r.stdout, shown(r)
        r = agent.cli("import-receipt", str(receipt1))
        assert r.returncode == 0, shown(r)
        left = set(spool_frames(agent)) & in_first
        assert not left, f"seqs {sorted(left)} of the imported bundle are still in the spool after its receipt"
        pause(agent, ONLINE_S)

        # 4. Down again: a second bundle, imported with serve stopped; then serve comes back
        # and the agent sends the rest (and whatever the bundle also carried) over HTTP.
        collector.stop()
        pause(agent, OFFLINE_S)
        r = agent.cli("export", "--out", str(second))
        assert r.returncode == 0, shown(r)
        in_second = bundle_seqs(agent, second.read_bytes())
        assert in_second and not in_second & in_first, (sorted(in_second), sorted(in_first))
        r = import_bundles(central, second, receipt=receipt2, config=config)
        assert r.returncode == 0, shown(r)
        assert tally(r) == (len(in_second), 0, 0), shown(r)
        assert "imported through ledger" in r.stdout, shown(r)
        collector.start()
        pause(agent, ONLINE_S)
        r = agent.cli("import-receipt", str(receipt2))  # most of it acknowledged over HTTP already
        assert r.returncode == 0, shown(r)
        agent.stop()  # a clean stop drains what is left within stop_grace
        assert spool_frames(agent) == {}, f"the spool still holds {sorted(spool_frames(agent))}\n{logs()}"
        stopped = now_ms()

        # Every batch once, one unbroken chain, from all three paths.
        frames = ledger_frames(central)
        seqs = sorted(frames)
        assert seqs == list(range(1, len(seqs) + 1)), f"ledger seqs {seqs}"
        origins: dict[str, set[int]] = {}
        for seq, origin, origin_file in ledger_rows(
                central, "SELECT seq, origin, origin_file FROM batches WHERE site = ? AND node = ?", (SITE, NODE)):
            key = origin if origin == "http" else f"bundle {Path(str(origin_file)).name}"
            origins.setdefault(key, set()).add(int(seq))
        # Whichever of the import and the agent's resends came first recorded each batch of the
        # first bundle (the agent probes every 500 ms: it often wins them all).
        assert {"http", f"bundle {second.name}"} <= set(origins) <= {"http", f"bundle {first.name}",
                                                                      f"bundle {second.name}"}, \
            {k: sorted(v) for k, v in origins.items()}
        assert origins[f"bundle {second.name}"] == in_second, "serve was stopped: all of the second bundle came by hand"
        assert origins.get(f"bundle {first.name}", set()) <= in_first

        r = collector.cli("audit")
        assert r.returncode == 0 and "audit clean" in r.stdout, shown(r)

        # VictoriaMetrics: every sample at its own time, none twice.
        ledger = samples_of(ledger_batches(central))
        n_samples = sum(len(p) for p in ledger.values())
        signed = sum(n for (n,) in ledger_rows(central, "SELECT sample_count FROM batches WHERE kind = 0"))
        assert n_samples == signed > 0
        stamps = [ts for pts in ledger.values() for ts, _ in pts]
        assert started - 5_000 <= min(stamps) and max(stamps) <= stopped, (min(stamps), max(stamps), started, stopped)
        last: list[Any] = []

        def all_there() -> bool:
            got = vm.samples(EVERYTHING, min(stamps) - 60_000, now_ms() + 60_000)
            last[:] = [diff(ledger, got, TARGET)]
            return bool(last[0].ok)

        try:
            wait_for(all_there, 120, "VictoriaMetrics holding every ledger sample at its timestamp", interval=2.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{last[0].describe() if last else ''}\n{logs()}") from None
        (d,) = last
        assert d.matched + d.nan_skipped == n_samples and d.duplicates == 0, d.describe()
    finally:
        agent.stop()
        collector.stop()
        vm.stop()



def test_a_new_node_whose_first_batches_came_by_hand_then_goes_online_sends_nothing_twice(tmp_path: Path) -> None:
    """A brand-new node air-gapped first: its first bundle is imported (serve stopped), then
    its uplink reaches the collector before any receipt came back. The collector's chain head
    is then this spool's own batch: the agent must continue its chain, not renumber its
    batches above that head (which would record the bundle's batches a second time)."""
    central = tmp_path / "central"
    r = run_cli("collector", "keygen", "--data-dir", str(central))
    assert r.returncode == 0, shown(r)
    (pin,) = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("collector_key = ")]
    collector = KillableCollector(central, port=free_port())
    agent = Agent(tmp_path / "site", collector.url, extra_toml=AGENT_TOML, site=SITE, node=NODE,
                  uplink_toml=f'{pin}\nstop_grace = "10s"\n')
    collector.enroll(SITE, NODE, agent.keygen())
    bundle = tmp_path / "first.wsb"
    agent.start()
    try:
        pause(agent, OFFLINE_S)  # the collector has never run
        r = agent.cli("export", "--out", str(bundle))
        assert r.returncode == 0, shown(r)
        in_bundle = bundle_seqs(agent, bundle.read_bytes())
        r = import_bundles(central, bundle)
        assert r.returncode == 0 and tally(r) == (len(in_bundle), 0, 0), shown(r)
        collector.start()
        pause(agent, ONLINE_S)
        agent.stop()
        assert spool_frames(agent) == {}, agent.log.read_text(errors="replace")[-3000:]
        produced = agent.status()["produced_batches"]  # every batch the spool ever signed
    finally:
        agent.stop()
        collector.stop()
    log = agent.log.read_text(errors="replace")
    assert "is this spool's own batch; nothing renumbered" in log and "renumbered 0" not in log, log[-3000:]
    assert "unsent batches to follow it" not in log, log[-3000:]
    seqs = sorted(ledger_frames(central))
    assert seqs == list(range(1, len(seqs) + 1)), f"ledger seqs {seqs}"
    assert len(seqs) == produced, f"{len(seqs)} batches recorded for {produced} signed: some twice"
    r = run_cli("collector", "audit", "--data-dir", str(central))
    assert r.returncode == 0 and "audit clean" in r.stdout, shown(r)
