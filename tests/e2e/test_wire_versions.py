"""Wire v1 and v2 against one collector, and v2's series tables recovering by themselves:
real agent and collector processes on loopback, a scrape page that changes under them."""

from __future__ import annotations

import http.server
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import wire
from tests.integration.harness import Agent, Collector, wait_for

FAST = '[summary]\nwindow = "1s"\nflush_interval = "1s"\n[sources.system]\nenabled = false\n'


class Page:
    """A Prometheus text page on loopback whose body a test can change while agents scrape it."""

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        page = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                body = page.body
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def page(body: str) -> Iterator[Page]:
    p = Page(body)
    try:
        yield p
    finally:
        p.close()


def gauges(prefix: str, n: int, value: float) -> str:
    return "".join(f'# TYPE {prefix}_{i} gauge\n{prefix}_{i}{{slot="{i}"}} {value + i}\n' for i in range(n))


def scrape(url: str) -> str:
    return f'[[sources.scrape]]\nname = "page"\nurl = "{url}"\ninterval = "1s"\n'


def exposed(collector: Collector, node: str) -> dict[str, float]:
    """name{slot} -> value of the page's series one node shows on the collector's /metrics."""
    out = {}
    for fam in text_string_to_metric_families(collector.metrics()):
        for s in fam.samples:
            if s.labels.get("node") == node and "slot" in s.labels:
                out[s.name] = s.value
    return out


def data_versions(collector: Collector, node: str) -> set[int]:
    rows = collector.ledger_rows("SELECT frame FROM batches WHERE node = ? AND kind = 0", (node,))
    return {wire.parse_frame(bytes(r[0])).header.version for r in rows}


def seqs(collector: Collector, node: str) -> list[int]:
    return [r[0] for r in collector.ledger_rows("SELECT seq FROM batches WHERE node = ? ORDER BY seq", (node,))]


def table_rows(collector: Collector, node: str) -> int:
    return int(collector.ledger_rows("SELECT COUNT(*) FROM series_tables WHERE node = ?", (node,))[0][0])


def ingest_result(collector: Collector, result: str) -> float:
    for fam in text_string_to_metric_families(collector.metrics()):
        for s in fam.samples:
            if s.name == "waystation_ingest_batches_total" and s.labels.get("result") == result:
                return s.value
    return 0.0


def audit_ok(collector: Collector) -> None:
    r = collector.cli("audit")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_v1_agent_and_a_v2_agent_share_one_collector(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    with page(gauges("shared_metric", 5, 10.5)) as p:
        old = Agent(tmp_path / "old", collector.url, FAST + scrape(p.url), node="old", uplink_toml="wire_version = 1\n")
        new = Agent(tmp_path / "new", collector.url, FAST + scrape(p.url), node="new")
        for agent in (old, new):
            collector.enroll(agent.site, agent.node, agent.keygen())
        collector.start()
        try:
            old.start()
            new.start()
            want = {f"shared_metric_{i}": 10.5 + i for i in range(5)}
            wait_for(lambda: exposed(collector, "old") == want and exposed(collector, "new") == want, 60,
                     "both agents' series on /metrics")
            wait_for(lambda: len(seqs(collector, "new")) >= 8 and len(seqs(collector, "old")) >= 8, 60,
                     "eight batches of each")
            old.stop()
            new.stop()
            assert data_versions(collector, "old") == {1}
            assert data_versions(collector, "new") == {2}
            # The v2 node's table went up with its first batch and again only when series
            # joined (the agent's own appear over its first seconds), not with every batch.
            assert 1 <= table_rows(collector, "new") <= 3 < len(seqs(collector, "new"))
            assert table_rows(collector, "old") == 0
            for node in ("old", "new"):
                held = seqs(collector, node)
                assert held == list(range(1, len(held) + 1))
            assert ingest_result(collector, "unknown_table") == 0
        finally:
            old.stop()
            new.stop()
            collector.stop()
        audit_ok(collector)


def restart_collector(collector: Collector, agent_node: str, lose_tables: bool = False) -> None:
    """An outage: the collector stops (optionally losing its series tables), starts again,
    and the agent delivers three more batches."""
    collector.stop()
    if lose_tables:
        with sqlite3.connect(collector.data_dir / "ledger.db") as db:
            assert db.execute("DELETE FROM series_tables").rowcount >= 1
    before = len(seqs(collector, agent_node))
    time.sleep(2)
    collector.start()
    wait_for(lambda: len(seqs(collector, agent_node)) >= before + 3, 60, "delivery after the outage")


def test_series_that_join_and_a_collector_that_lost_its_tables(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    with page(gauges("first", 3, 1.0)) as p:
        agent = Agent(tmp_path / "agent", collector.url, FAST + scrape(p.url), node="n2")
        collector.enroll(agent.site, agent.node, agent.keygen())
        collector.start()
        try:
            agent.start()
            wait_for(lambda: exposed(collector, "n2") == {"first_0": 1.0, "first_1": 2.0, "first_2": 3.0}, 60,
                     "the first series")
            tables_before = table_rows(collector, "n2")
            # A table that changes halfway: new series join, the agent's table grows (a new id)
            # while batches naming the old one may still be on their way.
            p.body = (gauges("first", 3, 1.0) + gauges("second", 2, 7.0)).encode()
            wait_for(lambda: exposed(collector, "n2").get("second_1") == 8.0, 60, "the series that joined")
            assert table_rows(collector, "n2") > tables_before
            # A first outage: the agent's own series about an outage join its table now.
            restart_collector(collector, "n2")
            # The collector loses its tables (a ledger restored without them). The agent, which
            # knows its current table held, is told unknown_table and sends it again by itself.
            restart_collector(collector, "n2", lose_tables=True)
            assert ingest_result(collector, "unknown_table") >= 1
            assert table_rows(collector, "n2") >= 1
            agent.stop()
            held = seqs(collector, "n2")
            # One chain, nothing refused for good: no gaps, no drop receipts.
            assert held == list(range(1, len(held) + 1))
            assert not collector.ledger_rows("SELECT seq FROM batches WHERE node = 'n2' AND kind != 0")
            assert exposed(collector, "n2") == {"first_0": 1.0, "first_1": 2.0, "first_2": 3.0,
                                                "second_0": 7.0, "second_1": 8.0}
        finally:
            agent.stop()
            collector.stop()
        # The batches taken before the loss name tables nobody sent again: audit says so.
        r = collector.cli("audit")
        assert r.returncode != 0 and "missing_table" in r.stdout + r.stderr, r.stdout + r.stderr


def test_an_agent_that_lost_its_spool_continues_with_a_new_table(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector")
    with page(gauges("first", 3, 1.0)) as p:
        agent = Agent(tmp_path / "agent", collector.url, FAST + scrape(p.url), node="n3")
        collector.enroll(agent.site, agent.node, agent.keygen())
        collector.start()
        try:
            agent.start()
            wait_for(lambda: len(seqs(collector, "n3")) >= 3 and exposed(collector, "n3").get("first_2") == 3.0,
                     60, "the first batches")
            # The spool is lost (a wiped disk; the key survives): the agent resumes the chain
            # where the collector holds it and sends its new table unasked.
            agent.stop()
            for leftover in agent.state_dir.glob("spool.db*"):
                leftover.unlink()
            p.body = (gauges("first", 3, 1.0) + gauges("third", 1, 4.0)).encode()
            head = max(seqs(collector, "n3"))
            agent.start()
            wait_for(lambda: exposed(collector, "n3").get("third_0") == 4.0, 60, "series after the spool was lost")
            wait_for(lambda: max(seqs(collector, "n3")) >= head + 3, 60, "batches after the spool was lost")
            agent.stop()
            held = seqs(collector, "n3")
            assert held == list(range(1, len(held) + 1))
            assert not collector.ledger_rows("SELECT seq FROM batches WHERE node = 'n3' AND kind != 0")
            for result in ("conflict", "chain_mismatch", "malformed", "unknown_table"):
                assert ingest_result(collector, result) == 0, result
        finally:
            agent.stop()
            collector.stop()
        audit_ok(collector)
