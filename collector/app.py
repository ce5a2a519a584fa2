"""create_app(config) -> aiohttp Application: ingest, /metrics, /healthz, /v1/nodes."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent import wire
from collector import ledger as ledger_mod
from collector.config import CollectorConfig
from collector.exposition import FleetCollector, FleetState
from collector.ingest import Committer, Ingest, IngestMetrics
from collector.ledger import Ledger, Outcome

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", CollectorConfig)
REGISTRY = web.AppKey("registry", CollectorRegistry)
FLEET = web.AppKey("fleet", FleetState)
METRICS = web.AppKey("metrics", IngestMetrics)
LEDGER = web.AppKey("ledger", Ledger)
COMMITTER = web.AppKey("committer", Committer)
INGEST = web.AppKey("ingest", Ingest)
READER = web.AppKey("reader", sqlite3.Connection)  # request handlers' own WAL connection


def _rebuild(ledger: Ledger, fleet: FleetState, limits: wire.Limits) -> None:
    """Latest state at start: every node's accounting, the latest state saved at the last
    clean stop, and each node's newest data batch (newer points win, whatever the order)."""
    for state in ledger.states():
        fleet.update_node(state)
    restored = fleet.restore(ledger.take_latest())
    if restored:
        log.info("restored %d series saved at the last stop", restored)
    for raw in ledger.newest_data_frames():
        try:
            frame = wire.parse_frame(raw)
            payload = wire.decompress_payload(frame, 1 << 40)
            fleet.apply(frame.header.site, frame.header.node, wire.decode_series(payload, limits))
        except wire.WireError as exc:  # recorded under other limits; not fatal at start
            log.warning("cannot rebuild latest state from a stored batch: %s", exc)


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    loop = asyncio.get_running_loop()
    ledger = await loop.run_in_executor(None, Ledger, config.ledger_path)
    fleet = app[FLEET]
    limits = config.limits
    wire_limits = wire.Limits(
        max_series=limits.max_series_per_batch,
        max_samples=limits.max_samples_per_batch,
        max_labels=limits.max_labels_per_series,
    )
    reader = ledger_mod.connect(config.ledger_path, create=False)
    try:
        await loop.run_in_executor(None, _rebuild, ledger, fleet, wire_limits)

        def on_outcome(outcome: Outcome) -> None:
            fleet.update_node(outcome.state)

        committer = Committer(ledger, limits.max_pending_commits, on_outcome)
        committer.start()
        app[LEDGER] = ledger
        app[READER] = reader
        app[COMMITTER] = committer
        app[INGEST] = Ingest(limits, reader, committer, fleet, app[METRICS])
        try:
            yield
        finally:
            await committer.stop()
            try:
                saved = await loop.run_in_executor(None, ledger.save_latest, list(fleet.snapshot()))
                log.info("saved %d series of latest state for the next start", saved)
            except sqlite3.Error as exc:  # the next start rebuilds from the newest batches
                log.warning("could not save the latest state: %s", exc)
    finally:
        reader.close()
        ledger.close()


async def post_batch(request: web.Request) -> web.Response:
    return await request.app[INGEST].handle(request)


async def get_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_healthz(request: web.Request) -> web.Response:
    app = request.app
    try:
        await app[COMMITTER].call(app[LEDGER].check_writable)
    except (sqlite3.Error, OSError) as exc:
        return web.Response(status=503, text=f"ledger not writable: {exc}\n")
    return web.Response(text="ok\n")


async def get_nodes(request: web.Request) -> web.Response:
    return web.json_response(ledger_mod.read_nodes(request.app[READER]))


async def get_chain_head(request: web.Request) -> web.Response:
    site, node = request.match_info["site"], request.match_info["node"]
    head = ledger_mod.read_chain_head(request.app[READER], site, node)
    if head is None:
        return web.json_response(
            {"result": "unknown_node", "error": f"no batch from {site}/{node} yet"}, status=404
        )
    return web.json_response({"site": site, "node": node, "next_seq": head[0], "head_hash": head[1].hex()})


def create_app(config: CollectorConfig) -> web.Application:
    """The collector as an aiohttp app; the ledger opens on startup and closes on cleanup.

    In-process use (benches, tests): `web.AppRunner(create_app(cfg))`, then `setup()`
    and a `web.TCPSite`; or aiohttp's test client.
    """
    # Our handler reads the body itself under max_body_bytes and answers 413 in JSON;
    # client_max_size only guards request.read()/post(), which no route uses.
    app = web.Application(client_max_size=config.limits.max_body_bytes + 1)
    app[CONFIG] = config
    registry = CollectorRegistry(auto_describe=False)
    fleet = FleetState(config.limits.max_series_per_node, config.limits.series_ttl)
    app[REGISTRY] = registry
    app[FLEET] = fleet
    app[METRICS] = metrics = IngestMetrics()
    registry.register(metrics)
    registry.register(FleetCollector(fleet))
    app.cleanup_ctx.append(_ledger_ctx)
    app.router.add_post("/v1/batches", post_batch)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/v1/nodes", get_nodes)
    app.router.add_get("/v1/nodes/{site}/{node}/chain", get_chain_head)
    return app
