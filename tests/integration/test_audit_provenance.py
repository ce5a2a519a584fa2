"""`audit` and `provenance` against a ledger a real agent filled through a real collector."""

from __future__ import annotations

import json
import sqlite3
from functools import partial
from pathlib import Path

import wire
from collector import trust
from collector.tables import LedgerTables
from tests.integration.harness import Agent, Collector, wait_for

FAST = """
[summary]
window = "1s"
[sources.system]
interval = "1s"
"""


def test_audit_and_provenance_beside_a_running_collector(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    agent = Agent(tmp_path, collector.url, extra_toml=FAST)
    collector.enroll(agent.site, agent.node, agent.keygen())
    collector.start()
    agent.start()
    try:
        wait_for(
            lambda: collector.ledger_rows("SELECT COUNT(*) FROM batches WHERE kind = 0")[0][0] >= 4,
            60,
            "four data batches in the ledger",
        )
        # Audit while serve is running and the agent keeps sending.
        r = collector.cli("audit")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("audit clean: 1 node(s)")
        assert "Traceback" not in r.stderr

        # A sample the agent sent: node_load1 from a recorded batch, asked a moment after it.
        seq, frame = collector.ledger_rows(
            "SELECT seq, frame FROM batches WHERE kind = 0 ORDER BY seq LIMIT 1 OFFSET 1"
        )[0]
        # Opened as every reader opens it (a v2 batch with the series table the ledger holds).
        conn = sqlite3.connect(f"file:{collector.data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
        try:
            opened = wire.open_batch(bytes(frame), partial(trust.lookup_recorded, conn),
                                     series_tables=LedgerTables(conn, wire.DEFAULT_OPEN_LIMITS))
        finally:
            conn.close()
        assert isinstance(opened, wire.VerifiedBatch), opened
        parsed, series = opened.frame, opened.series
        load = next(s for s in series if s.name == "node_load1")
        at_ms = load.timestamps_ms[-1]
        r = collector.cli(
            "provenance",
            "--site",
            agent.site,
            "--node",
            agent.node,
            "--metric",
            "node_load1",
            "--at",
            f"{at_ms / 1000:.3f}",
            "--json",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        found = json.loads(r.stdout)["found"]
        assert [(o["seq"], o["timestamp_ms"], o["origin"]) for o in found] == [(seq, at_ms, "http")]
        assert found[0]["batch_hash"] == wire.batch_hash(bytes(frame)).hex()
        assert found[0]["key_id"] == parsed.header.key_id.hex()
    finally:
        agent.stop()
        collector.stop()

    # Tamper with the file the collector wrote: the audit names what changed.
    db = collector.data_dir / "ledger.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("DELETE FROM batches WHERE seq = 2")
        raw = bytearray(conn.execute("SELECT frame FROM batches WHERE seq = 3").fetchone()[0])
        raw[-wire.SIGNATURE_LEN - 1] ^= 0xFF
        conn.execute("UPDATE batches SET frame = ? WHERE seq = 3", (bytes(raw),))
    finally:
        conn.close()
    r = collector.cli("audit", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    findings = [(f["seq"], f["problem"]) for f in json.loads(r.stdout)["findings"]]
    assert findings == [(3, "bad_signature"), (2, "missing")]
