"""create_app(config) -> aiohttp Application: ingest, /metrics, /healthz, /v1/nodes, /v1/import."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import math
import sqlite3
import struct
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from nacl.public import PrivateKey
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import wire
from collector import keyring, remote_write, serve_link, trust
from collector import ledger as ledger_mod
from collector.config import CollectorConfig
from collector.exposition import FleetCollector, FleetState
from collector.fronts import client_address, peer_is_this_host, same_host_from_front
from collector.ingest import (
    IMPORT_GROUP,
    RETRY_AFTER_S,
    Committer,
    Ingest,
    IngestMetrics,
    Overloaded,
    apply_opened,
    open_limits,
)
from collector.ledger import Ledger, Outcome
from collector.remote_write import ForwardingMetrics, Supervisor
from collector.tables import LedgerTables
from wire.malloc import trim_malloc

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", CollectorConfig)
REGISTRY = web.AppKey("registry", CollectorRegistry)
SCRAPES = web.AppKey("scrapes", asyncio.Lock)
FLEET = web.AppKey("fleet", FleetState)
METRICS = web.AppKey("metrics", IngestMetrics)
LEDGER = web.AppKey("ledger", Ledger)
COMMITTER = web.AppKey("committer", Committer)
INGEST = web.AppKey("ingest", Ingest)
READER = web.AppKey("reader", sqlite3.Connection)  # request handlers' own WAL connection
# The collector's private sealing keys (current and retired) by key id, and their files.
SEALING_KEYS: web.AppKey[dict[bytes, PrivateKey]] = web.AppKey("sealing_keys")
SEALING_KEY_FILES: web.AppKey[list[Path]] = web.AppKey("sealing_key_files")
# What `waystation-collector import` presents to hand bundle frames to this process
# (serve writes it to <data_dir>/serve.json, mode 0600).
IMPORT_TOKEN = web.AppKey("import_token", str)
# Set by serve while its front processes start (they answer /healthz as soon as each
# listens; serve is ready once all do and serve.json is written).
STARTING = web.AppKey("starting", list)


def rebuild_latest_state(
    ledger: Ledger, fleet: FleetState, limits: wire.OpenLimits, now_ms: int | None = None,
    sealing_keys: wire.SealingKeys | None = None,
) -> tuple[int, int]:
    """Latest state at start: every node's accounting, the latest state last saved (series,
    and each node's newest sample and arrival times), and the data batches recorded after
    the position that save recorded (newer points win, whatever the order), so the state is
    what it was at the stop or crash. Without a saved position (a ledger never saved, or an
    older version's state), each node's newest data batch; everything is then written by
    the next save. Returns (series restored, batches replayed). A batch pruned since the
    save is simply missing from the state."""
    for state in ledger.states():
        fleet.update_node(state)
    rows, through = ledger.load_latest()
    # Rows without a position (an older version's clean-stop save) are written again.
    restored = fleet.restore(rows, now_ms=now_ms, saved=through is not None)
    fleet.restore_marks(ledger.load_latest_nodes())
    keys = partial(trust.lookup_recorded, ledger.conn)
    series_tables = LedgerTables(ledger.conn, limits, sealing_keys)  # v2 batches' tables, from the ledger
    replayed = 0
    for raw, received_at in ledger.replay_frames(through):
        opened = wire.open_batch(raw, keys, limits, sealing_keys=sealing_keys, series_tables=series_tables,
                                 as_series=False)
        if isinstance(opened, wire.Refusal):  # recorded under other limits; not fatal at start
            log.warning("cannot rebuild latest state from a stored batch: %s: %s", opened.result, opened.detail)
            continue
        # Replayed as it arrived: at the collector's clock when it was received, as ingest did.
        apply_opened(fleet, opened, int(received_at * 1000))
        replayed += 1
    if through is None:
        fleet.mark_all_changed()
        through = ledger.max_rowid()
    # What the replay changed comes from batches after `through`: the saves may keep it
    # unwritten (still covered by that position) like any other recent change.
    fleet.start_saves(through)
    return restored, replayed


# A save leaves unwritten the series that changed within about this long (in whole save
# intervals): the batches after the position it records bring them back at a start. Above
# the longest flush interval (150 s) plus delivery, so a series every node sends with each
# batch is never written; what is written is what changed before it (slow series such as
# SMART, silent nodes) and the expired keys. A start replays about this long's batches.
REPLAY_HORIZON_S = 180.0


def kept_epochs(interval_s: float) -> int:
    """Save intervals a save leaves unwritten: REPLAY_HORIZON_S, in whole intervals."""
    return max(1, math.ceil(REPLAY_HORIZON_S / interval_s))


# Rows per chunk: measured with 1M series on 2 loaded cores, a chunk costs ~35 ms on the event
# loop (rendering rows) and ~50-150 ms in the ledger thread, between group commits.
SAVE_CHUNK = 5_000


class StateSaves(Collector):
    """The periodic latest-state saves, for /metrics: their outcome and their cost."""

    def __init__(self) -> None:
        self.results = {"ok": 0, "failed": 0}
        self.rows = 0
        self.seconds = 0.0

    def collect(self) -> Iterator[Metric]:
        saves = CounterMetricFamily(
            "waystation_collector_state_saves", "Saves of the exposed latest state, by outcome.",
            labels=["result"],
        )
        for result, n in self.results.items():
            saves.add_metric([result], n)
        yield saves
        yield CounterMetricFamily(
            "waystation_collector_state_saved_rows", "Series rows written by the latest-state saves.",
            value=self.rows,
        )
        yield GaugeMetricFamily(
            "waystation_collector_state_save_last_duration_seconds",
            "How long the last latest-state save took (its chunks interleave with ingest).",
            value=self.seconds,
        )


SAVES = web.AppKey("saves", StateSaves)


async def save_latest_state(
    ledger: Ledger, fleet: FleetState, call: Callable[..., Awaitable[Any]], keep: int
) -> int:
    """One save: the series `fleet.begin_save` hands out (changed before the `keep` newest
    save epochs, or overdue), the expired keys, the nodes' marks and the position that
    covers the rest, in chunks through `call` (the committer: between group commits);
    returns series rows written. A chunk that was not written is requeued.

    The position is read first: any batch recorded by then is in the state once its
    handler has applied it, which happens on the event loop right after its commit is
    answered; one more round trip through the committer thread lets those handlers run.
    A batch applied later is after the position and is replayed at the next start.
    """
    through = await call(ledger.max_rowid)
    await call(_nothing)
    due, removed, nodes, position = fleet.begin_save(through, keep)
    written = start = 0
    try:
        while True:
            rows = fleet.rows(due[start:start + SAVE_CHUNK])
            last = start + SAVE_CHUNK >= len(due)
            written += int(await call(ledger.save_latest, rows, removed, position if last else None,
                                      nodes if last else ()))
            start += SAVE_CHUNK
            removed = set()
            if last:
                return written
    except BaseException:
        # A chunk whose call did not return may or may not be written: written again.
        fleet.requeue(due[start:], removed)
        raise


def _nothing() -> None:
    pass


async def _save_latest_forever(
    interval: float, ledger: Ledger, fleet: FleetState, committer: Committer, saves: StateSaves
) -> None:
    keep = kept_epochs(interval)
    while True:
        await asyncio.sleep(interval)
        started = time.monotonic()
        try:
            saves.rows += await save_latest_state(ledger, fleet, committer.call, keep)
            saves.results["ok"] += 1
        except (sqlite3.Error, OSError) as exc:
            saves.results["failed"] += 1
            log.warning("could not save the latest state, trying again later: %s", exc)
        except Exception:
            # Not a ledger error: a bug. Saving goes on (what was not written is requeued).
            saves.results["failed"] += 1
            log.exception("could not save the latest state, trying again later")
        saves.seconds = time.monotonic() - started
        # A save builds and frees its rows by the thousand: give the freed pages back.
        await asyncio.get_running_loop().run_in_executor(None, trim_malloc)


PRUNE_EVERY_S = 60.0


async def _prune_forever(config: CollectorConfig, ledger: Ledger, committer: Committer, targets: list[str]) -> None:
    """Retention and the size cap, a few hundred batches per transaction between group
    commits, so pruning never holds the ledger for long."""
    await asyncio.sleep(5.0)
    while True:
        try:
            while True:
                pruned = await committer.call(
                    ledger.prune, time.time(), config.ledger.retention, config.ledger.max_size, targets
                )
                for target, (batches, samples) in pruned.expired.items():
                    log.warning("%d batches (%d samples) left the ledger before remote_write %s had them",
                                batches, samples, target)
                if not pruned.more:
                    break
                await asyncio.sleep(0.05)
        except (sqlite3.Error, OSError) as exc:
            log.warning("ledger pruning failed, trying again later: %s", exc)
        await asyncio.sleep(PRUNE_EVERY_S)


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    loop = asyncio.get_running_loop()
    ledger = await loop.run_in_executor(None, Ledger, config.ledger_path)
    fleet = app[FLEET]
    limits = config.limits
    reader = ledger_mod.connect(config.ledger_path, create=False)
    keys = ledger_mod.connect(config.ledger_path, create=False)  # the verify thread's own
    try:
        sealing_keys = app[SEALING_KEYS]
        restored, replayed = await loop.run_in_executor(
            None, partial(rebuild_latest_state, ledger, fleet, open_limits(limits), sealing_keys=sealing_keys)
        )
        log.info("latest state: %d series restored, %d batches replayed", restored, replayed)
        # What the start built (the nodes' identity dicts and keys, the replay's tables) lives
        # as long as the process. Every full collection would walk it all again and free
        # none of it: collect once, then keep what is alive now out of later collections.
        gc.collect()
        gc.freeze()

        def on_outcome(outcome: Outcome) -> None:
            fleet.update_node(outcome.state)

        committer = Committer(ledger, limits.max_pending_commits, on_outcome)
        committer.start()
        targets = [t.name for t in config.remote_write]
        supervisor = None
        if config.remote_write:
            key_files: list[Path] = app[SEALING_KEY_FILES]
            line = remote_write.child_config(
                config.ledger_path, config.remote_write, open_limits(limits), config.log_level,
                key_files=key_files,
            )
            supervisor = Supervisor(line)
            supervisor.start()
        forwarding = ForwardingMetrics(reader, targets, lambda: supervisor.restarts if supervisor else 0)
        app[REGISTRY].register(forwarding)
        pruning = loop.create_task(_prune_forever(config, ledger, committer, targets), name="ledger-pruning")
        saving = loop.create_task(
            _save_latest_forever(config.ledger.state_save_interval, ledger, fleet, committer, app[SAVES]),
            name="latest-state-saving",
        )
        app[LEDGER] = ledger
        app[READER] = reader
        app[COMMITTER] = committer
        app[INGEST] = ingest = Ingest(limits, keys, committer, fleet, app[METRICS], sealing_keys)
        try:
            yield
        finally:
            pruning.cancel()
            saving.cancel()
            # A save cut short requeued what it had not written: the one below writes it.
            await asyncio.gather(saving, return_exceptions=True)
            if supervisor is not None:
                await supervisor.stop()
            app[REGISTRY].unregister(forwarding)
            await committer.stop()
            ingest.verifier.shutdown(wait=True)
            try:
                # Ingest has stopped: every recorded batch is applied, and this save covers them.
                async def direct(fn: Callable[..., Any], *args: Any) -> Any:
                    return await loop.run_in_executor(None, fn, *args)

                keep = kept_epochs(config.ledger.state_save_interval)
                saved = await save_latest_state(ledger, fleet, direct, keep)
                log.info("saved %d series of latest state for the next start", saved)
            except (sqlite3.Error, OSError) as exc:  # the next start replays from the last periodic save
                log.warning("could not save the latest state: %s", exc)
            except Exception:
                log.exception("could not save the latest state")
    finally:
        keys.close()
        reader.close()
        ledger.close()
        gc.unfreeze()  # a process that runs another app after this one collects this one's


async def post_batch(request: web.Request) -> web.Response:
    return await request.app[INGEST].handle(request)


def _same_host(request: web.Request) -> bool:
    """The client is this machine (through a front: as the front saw it)."""
    passed_on = same_host_from_front(request)
    return peer_is_this_host(request) if passed_on is None else passed_on


def _import_refused(result: str, error: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"result": result, "error": error}, status=status, headers=headers)


async def post_import(request: web.Request) -> web.Response:
    """Bundle frames from `waystation-collector import` on this host: each one through
    ingest's path (Ingest.import_frames), as if posted, with origin 'bundle'.

    Body: (u32 length, item)*, each item a frame or a series table followed by the frame
    that names it (as a post's body); header X-Waystation-Origin-File names the bundle file.
    Answer: {"results": [{"result", "detail", "site", "node", "seq"}, ...]} in body order;
    a 503 (overloaded, Retry-After) when serve is as busy as a post would find it, with
    nothing taken. Refusals before the body is read (403, 503) never name the token."""
    app = request.app
    if not _same_host(request):
        log.warning("refused POST /v1/import from %s: not this host", client_address(request))
        return _import_refused("forbidden", "import is only taken from this host", 403)
    token = request.headers.get(serve_link.TOKEN_HEADER, "")
    if not hmac.compare_digest(token.encode(errors="replace"), app[IMPORT_TOKEN].encode()):
        log.warning("refused POST /v1/import from %s: wrong or missing import token", client_address(request))
        return _import_refused("forbidden", "wrong or missing import token", 403)
    ingest = app[INGEST]
    limits = app[CONFIG].limits
    try:
        # The admission check of POST /v1/batches: an import is let in as a post would be.
        ingest.check_capacity()
    except Overloaded as exc:
        return _import_refused("overloaded", str(exc), 503, {"Retry-After": str(RETRY_AFTER_S)})
    # The body is held until the last frame is answered: it counts as a post being read
    # would, against max_pending_commits, for the posts and imports that come meanwhile.
    ingest.in_progress += 1
    try:
        cap = 2 * limits.max_body_bytes + 1024
        if request.content_length is not None and request.content_length > cap:
            return _import_refused("too_large", f"import body over {cap} bytes", 413)
        try:
            async with asyncio.timeout(limits.body_read_timeout * 4):
                body = await request.content.read(cap + 1)
                while len(body) <= cap and (more := await request.content.read(cap + 1 - len(body))):
                    body += more
        except TimeoutError:
            return _import_refused("timeout", "import body too slow", 408)
        if len(body) > cap:
            return _import_refused("too_large", f"import body over {cap} bytes", 413)
        frames: list[bytes] = []
        pos = 0
        while pos < len(body):
            if pos + 4 > len(body):
                return _import_refused("malformed", "import body truncated", 400)
            (n,) = struct.unpack_from("<I", body, pos)
            if pos + 4 + n > len(body):
                return _import_refused("malformed", "import body truncated", 400)
            frames.append(body[pos + 4 : pos + 4 + n])
            pos += 4 + n
        del body  # the frames are copies: the body need not stay while they commit
        origin_file = urllib.parse.unquote(request.headers.get(serve_link.ORIGIN_HEADER, ""))[:4096] or "bundle"
        answers: list[tuple[str, str, wire.Header | None]] = []
        # At most half the commit queue at a time, so the fleet's posts keep the other
        # half while a big import goes through. A frame that finds the queue full anyway
        # is answered overloaded (nothing of it taken), and the import sends it again.
        share = max(1, min(IMPORT_GROUP, limits.max_pending_commits // 2))
        for start in range(0, len(frames), share):
            slice_answers = await ingest.import_frames(frames[start : start + share], origin_file)
            answers += slice_answers
            stalled = next((h for result, _, h in slice_answers if h is not None
                            and h.kind == wire.Kind.KEY_ROTATION and result in ("overloaded", "unavailable")), None)
            if stalled is not None:
                # As within a slice (Ingest.import_frames): the frames after a rotation the
                # ledger did not take would be refused unknown_key; they go back unverified.
                detail = (f"not verified: the key rotation of {stalled.site}/{stalled.node} at seq {stalled.seq} "
                          "before it was not taken")
                answers += [("overloaded", detail, None) for _ in frames[start + share:]]
                break
    finally:
        ingest.in_progress -= 1
    return web.json_response({"results": [
        {"result": result, "detail": detail, "site": h.site if h else None, "node": h.node if h else None,
         "seq": h.seq if h else None}
        for result, detail, h in answers
    ]})


async def get_metrics(request: web.Request) -> web.StreamResponse:
    app = request.app
    # A big fleet's scrape is a step per series: taken a few nodes at a time and sent in
    # pieces, the event loop serving acks between them (a thread would not do: rendering
    # holds the GIL, and every ack would queue for it). One scrape at a time.
    async with app[SCRAPES]:
        scrape = app[FLEET].scrape(int(time.time() * 1000))
        while scrape.step(SCRAPE_STEP):
            await asyncio.sleep(0)
        fleet_text = scrape.text()
    headers = {"Content-Type": CONTENT_TYPE_LATEST}
    if len(fleet_text) <= RENDER_STEP:
        return web.Response(body=fleet_text.render() + generate_latest(app[REGISTRY]), headers=headers)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    for piece in fleet_text.chunks(RENDER_STEP):
        await response.write(piece)
        await asyncio.sleep(0)
    await response.write(generate_latest(app[REGISTRY]))
    await response.write_eof()
    return response


# Fleet series shown per step of a scrape (where their values moved, rendered there) and
# sent per piece of its body: each a few ms of the event loop at most, which an ack waits
# for at each of its turns on the loop.
SCRAPE_STEP = 2_500
RENDER_STEP = 1_000


async def get_healthz(request: web.Request) -> web.Response:
    app = request.app
    if app[STARTING]:
        return web.Response(status=503, text="starting\n")
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


MALFORMED_HTTP_LOG_EVERY_S = 60.0


class MalformedHttpLog(logging.Filter):
    """aiohttp answers a request it cannot parse (two Content-Lengths, a bad chunk size)
    with 400 and logs it as an error with a traceback: any client that reaches the port
    could flood the journal with them. Such records become one warning per interval that
    says how many there were and shows the latest; every other record passes unchanged."""

    def __init__(self, every_s: float = MALFORMED_HTTP_LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self.count = 0
        self.next_at = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or record.levelno < logging.WARNING:
            return True  # aiohttp logs some at debug on purpose (a first request not HTTP at all)
        self.count += 1
        now = self.clock()
        if now < self.next_at:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        reason = exc.message if isinstance(exc.message, str) else str(exc)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "refused %d request(s) that were not valid HTTP since the last such line; the latest from %s: %s"
        record.args = (self.count, remote, reason.splitlines()[0] if reason else type(exc).__name__)
        record.exc_info = record.exc_text = None
        self.count = 0
        self.next_at = now + self.every_s
        return True


def quiet_malformed_http() -> None:
    """Install MalformedHttpLog on aiohttp's server logger (once per process)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedHttpLog) for f in server_log.filters):
        server_log.addFilter(MalformedHttpLog())


def create_app(config: CollectorConfig) -> web.Application:
    """The collector as an aiohttp app; the ledger opens on startup and closes on cleanup.

    In-process use (benches, tests): `web.AppRunner(create_app(cfg))`, then `setup()`
    and a `web.TCPSite`; or aiohttp's test client.
    """
    # Our handler reads the body itself under max_body_bytes and answers 413 in JSON;
    # client_max_size only guards request.read()/post(), which no route uses.
    app = web.Application(client_max_size=config.limits.max_body_bytes + 1)
    app[CONFIG] = config
    # Read once, here: a key file that exists but cannot be read stops serve with its path
    # (keyring.KeyringError) rather than refusing every sealed batch. Rotation takes effect
    # at the next start.
    app[SEALING_KEY_FILES] = files = keyring.sealing_key_files(Path(config.data_dir))
    app[SEALING_KEYS] = sealing = keyring.load_sealing_keys(files)
    if sealing:
        log.info("sealing keys: %s", ", ".join(k.hex() for k in sealing))
    registry = CollectorRegistry(auto_describe=False)
    fleet = FleetState(config.limits.max_series_per_node, config.limits.series_ttl, config.limits.max_series_total)
    app[REGISTRY] = registry
    app[SCRAPES] = asyncio.Lock()
    app[FLEET] = fleet
    app[METRICS] = metrics = IngestMetrics()
    registry.register(metrics)
    app[SAVES] = saves = StateSaves()
    registry.register(saves)
    registry.register(FleetCollector(fleet))
    app.cleanup_ctx.append(_ledger_ctx)
    app[IMPORT_TOKEN] = serve_link.new_token()
    app[STARTING] = []
    app.router.add_post("/v1/batches", post_batch)
    app.router.add_post("/v1/import", post_import)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/v1/nodes", get_nodes)
    # Any name enroll takes: aiohttp's default pattern refuses braces, and a slash arrives
    # percent-encoded (%2F) in one segment, which the router matches before decoding.
    app.router.add_get("/v1/nodes/{site:[^/]+}/{node:[^/]+}/chain", get_chain_head)
    return app
