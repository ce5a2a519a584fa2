"""The agent's backlog age (`waystation_agent_spool_oldest_unsent_timestamp_seconds`) is true
in every batch: the oldest waiting window's start while batches wait, this batch's own time
once the spool is drained. The collector keeps a series' last value, so a value sent only
while something waits would leave a false, climbing age behind after every outage."""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey

import wire
from agent.config import AgentConfig, NetworkSourceConfig, SourcesConfig, SystemSourceConfig
from agent.daemon import Agent

OLDEST = "waystation_agent_spool_oldest_unsent_timestamp_seconds"


def oldest_unsent(agent: Agent, now_ms: int) -> float:
    (value,) = [s.values[0] for s in agent.self_metrics(now_ms) if s.name == OLDEST]
    return value


def test_backlog_age_is_sent_while_batches_wait_and_after_they_are_acknowledged(tmp_path: Path) -> None:
    config = AgentConfig(node="n1", state_dir=str(tmp_path),
                         sources=SourcesConfig(system=SystemSourceConfig(enabled=False),
                                               network=NetworkSourceConfig(enabled=False)))
    agent = Agent(config, SigningKey.generate())
    assert agent._open_spool() is not None
    spool = agent.spool
    assert spool is not None
    try:
        # Nothing waits: the oldest data the collector lacks is what follows this batch.
        assert oldest_unsent(agent, 1_700_000_060_000) == 1_700_000_060.0
        for t in (1_700_000_000_000, 1_700_000_060_000):
            agent.store([wire.Series("x", (), wire.MetricType.GAUGE, (t,), (1.0,))])
        # Two batches wait (an outage): the older one's window start, however late the flush.
        assert oldest_unsent(agent, 1_700_000_180_000) == 1_700_000_000.0
        claimed = spool.claim_oldest()
        assert claimed is not None
        spool.ack(claimed.seq, None)
        assert oldest_unsent(agent, 1_700_000_240_000) == 1_700_000_060.0
        newest = spool.claim_oldest()
        assert newest is not None
        spool.ack(newest.seq, None)
        # Drained: the age starts again from this batch, not from the last waiting one.
        assert oldest_unsent(agent, 1_700_000_300_000) == 1_700_000_300.0
    finally:
        spool.close()
