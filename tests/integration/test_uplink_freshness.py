"""Fresh as well as true: a real agent process after an outage and on a clean stop.

The newest window reaches a restarted collector at the agent's first answered probe, not
when its backoff ends; a down collector sees only probes at their interval and backed-off
sends; SIGTERM delivers the batch signed on the way out, or keeps it when nobody answers.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from agent.uplink import SystemClock
from tests.fakes.counting_peer import CountingPeer, serving
from tests.integration.harness import Agent, Collector, wait_for

FAST = """
[summary]
window = "1s"
[sources.system]
interval = "1s"
[sources.gpu]
enabled = false
[sources.smart]
enabled = false
[sources.network]
enabled = false
"""


def _pair(tmp_path: Path, uplink_toml: str = "", extra: str = FAST) -> tuple[Collector, Agent]:
    collector = Collector(tmp_path / "collector")
    agent = Agent(tmp_path, collector.url, extra_toml=extra, uplink_toml=uplink_toml)
    collector.enroll(agent.site, agent.node, agent.keygen())
    return collector, agent


def _backoff(agent: Agent, initial: str, maximum: str) -> None:
    """Replace the harness's quick backoff (200ms..1s) in the agent's config."""
    text = agent.config.read_text()
    text = text.replace('backoff_initial = "200ms"', f'backoff_initial = "{initial}"')
    agent.config.write_text(text.replace('backoff_max = "1s"', f'backoff_max = "{maximum}"'))


def _node(collector: Collector) -> dict[str, object]:
    nodes = collector.nodes()
    return nodes[0] if nodes else {}


def _acked_through(collector: Collector) -> int:
    value = _node(collector).get("complete_through")
    return value if isinstance(value, int) else 0


def _spool_ready(agent: Agent) -> bool:
    # `status` can catch a spool being created (no tables yet): that is not ready.
    return agent.cli("status", "--json").returncode == 0 and bool(agent.status().get("next_seq"))


def _sigterm(agent: Agent, within: float) -> None:
    """SIGTERM the agent and require it to exit within `within` seconds (a generous bound)."""
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    try:
        agent.proc.wait(within)
    except subprocess.TimeoutExpired:
        agent.proc.kill()
        agent.proc.wait()
        raise AssertionError(f"the agent did not exit within {within}s of SIGTERM") from None
    finally:
        agent.proc = None


def test_newest_window_reaches_a_restarted_collector_at_the_first_probe_not_after_the_backoff(
    tmp_path: Path,
) -> None:
    # A first backoff of 30..60 s: were the probe not there, nothing would arrive for
    # at least half a minute after the collector comes back.
    collector, agent = _pair(tmp_path, uplink_toml='probe_interval = "200ms"\n')
    _backoff(agent, "60s", "120s")
    collector.start()
    agent.start()
    try:
        wait_for(lambda: _acked_through(collector) >= 2, 30, "first acks")
        collector.stop()
        stopped = time.time()
        wait_for(lambda: agent.status()["last_error"], 30, "a failed send")
        newest = agent.status()["next_seq"] - 1
        collector.start()
        first = wait_for(
            lambda: collector.ledger_rows(
                "SELECT seq, received_at FROM batches WHERE received_at > ? "
                "ORDER BY received_at, seq LIMIT 1", (stopped,)),
            15, "a batch soon after the restart (the backoff alone would take 30 s or more)",
        )[0]
        assert first[0] >= newest, "the newest window goes first"
        assert "collector answers again" in agent.log.read_text()
    finally:
        agent.stop()
        collector.stop()


def test_a_down_collector_sees_only_probes_and_backed_off_sends(tmp_path: Path) -> None:
    """Counted by a loopback server that hangs up on every request, as a dead collector
    behind a live host would; the agent is the real process, with the harness's quick
    backoff (200ms doubling to 1s) and a probe every 250ms."""
    peer = CountingPeer(SystemClock(), mode="up")
    with serving(peer) as url:
        agent = Agent(tmp_path, url, extra_toml=FAST, uplink_toml='probe_interval = "250ms"\n')
        agent.keygen()
        agent.start()
        try:
            wait_for(lambda: len(peer.posted()) >= 3, 30, "deliveries while the peer is up")
            peer.mode = "down"
            with peer.lock:
                seen = len(peer.requests)
            started = time.monotonic()
            time.sleep(8.0)  # an observation window: what arrives in it is counted, not timed
            elapsed = time.monotonic() - started
            with peer.lock:
                during = [(m, p) for _, m, p, _ in peer.requests[seen:]]
            peer.mode = "up"
            wait_for(lambda: agent.status()["pending_batches"] <= 1, 30, "the backlog delivered after")
        finally:
            agent.stop()
    probes = [1 for m, p in during if (m, p) == ("GET", "/healthz")]
    sends = [1 for m, _ in during if m == "POST"]
    assert len(probes) + len(sends) == len(during), f"nothing else contacts it: {set(during)}"
    assert 1 <= len(probes) <= elapsed / (0.25 * 0.8) + 2  # jittered: 200..300 ms apart
    # Backed-off sends: delays of at least 0.1, 0.2, 0.4 s, then 0.5 s once capped at 1 s,
    # plus one failed send of the backfill lane (it then waits for the live lane).
    assert 1 <= len(sends) <= 4 + elapsed / 0.5 + 1
    assert len(sends) < len(probes), "while down, the probes are what the collector mostly sees"


def test_sigterm_delivers_the_final_batch_and_exits_promptly(tmp_path: Path) -> None:
    # A 30 s window: the batch SIGTERM signs is a partial window nothing else would send.
    collector, agent = _pair(tmp_path, extra=FAST.replace('window = "1s"', 'window = "30s"'))
    collector.start()
    agent.start()
    try:
        wait_for(lambda: _spool_ready(agent), 30, "the agent's spool")
        _sigterm(agent, within=5 + 10)  # the default stop_grace, and slack
        status = agent.status()
        final = status["next_seq"] - 1
        # Nothing pending, even if a window boundary signed a batch just before the SIGTERM
        # did: while stopping, the live lane delivers every batch newer than the last it
        # settled (the collector was up all along, so it settled each one as it was signed).
        assert final >= 1 and status["pending_batches"] == 0, status
        node = _node(collector)
        assert node["highest_seq"] == node["complete_through"] == final, node
    finally:
        agent.stop()
        collector.stop()


def test_sigterm_with_the_collector_down_exits_after_the_grace_and_keeps_the_batch(
    tmp_path: Path,
) -> None:
    collector, agent = _pair(tmp_path, uplink_toml='stop_grace = "2s"\n')
    collector.start()
    agent.start()
    try:
        wait_for(lambda: _acked_through(collector) >= 2, 30, "first acks")
        collector.stop()
        wait_for(lambda: agent.status()["last_error"], 30, "a failed send")
        _sigterm(agent, within=2 + 10)
        status = agent.status()
        final = status["next_seq"] - 1
        assert status["pending_batches"] >= 1 and status["collector_complete_through"] < final, status
        # The next start delivers it, and everything before it.
        collector.start()
        agent.start()
        wait_for(lambda: (n := _node(collector)) and n["complete_through"] >= final
                 and n["complete_through"] == n["highest_seq"], 30, f"seq {final} at the collector")
    finally:
        agent.stop()
        collector.stop()
