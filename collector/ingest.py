"""POST /v1/batches: limits -> wire.open_batch (off the event loop) -> ledger -> ack.

Collector input is hostile: every check runs before the work it protects, every
refusal is a JSON 4xx with a reason counted in waystation_ingest_batches_total,
and nothing a client sends can produce a 5xx (503 means we are overloaded or the
ledger cannot commit, never that the input was bad).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar, cast

import aiohttp
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

import wire
from collector import trust
from collector.config import LimitsConfig
from collector.exposition import FleetState, reported_backlog, reported_backlog_columns
from collector.ledger import Ledger, Outcome, Submission
from collector.tables import LedgerTables
from wire.sdnotify import Liveness

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-waystation-batch"

# result -> HTTP status. Every response of POST /v1/batches carries one of these results.
STATUS: dict[str, int] = {
    "accepted": 200,
    "duplicate": 200,
    "conflict": 409,
    "chain_mismatch": 409,
    "unknown_key": 401,
    "revoked": 403,
    "too_large": 413,
    "bad_signature": 400,
    "malformed": 400,
    "schema": 400,
    "limit": 400,
    "unsupported_version": 400,
    "unsupported": 400,  # a feature this collector does not have (an unknown seal scheme)
    # Sealed to a collector key this collector does not hold: not a bad batch (restoring the
    # key, or pinning the right collector, makes it open), so the agent keeps it and retries.
    "sealed_to_unknown_key": 421,
    # A v2 data batch naming a series table this collector does not hold (never sent, or
    # lost): not a bad batch; the sender sends it again with its table (precondition).
    "unknown_table": 428,
    "undecryptable": 400,  # signed, but the sealed payload does not decrypt with the key it names
    "timeout": 408,  # the body did not arrive within body_read_timeout
    "aborted": 400,  # the sender closed the connection mid-body (it never reads this answer)
    "overloaded": 503,
    "unavailable": 503,  # the ledger could not commit (disk full, I/O error)
}
RESULTS = tuple(STATUS)

MAX_GROUP = 2048  # batches per ledger transaction
INLINE_VERIFY_BYTES = 256 * 1024  # bodies verified on the event loop (Ingest.verified): a few ms at most
IMPORT_GROUP = 512  # imported frames in flight to the committer at once
RETRY_AFTER_S = 1

T = TypeVar("T")


# An answer to POST /v1/batches: HTTP status, JSON body, extra headers.
Answer = tuple[int, dict[str, Any], dict[str, str] | None]


def json_answer(status: int, body: dict[str, Any], headers: dict[str, str] | None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


class Overloaded(Exception):
    """More verified batches are waiting for the ledger than max_pending_commits allows."""


class LedgerUnavailable(Exception):
    """The group commit failed; nothing of the group was recorded."""


COMMIT_STUCK_S = 120.0


class Committer:
    """Group commit: handlers submit verified batches; one loop commits them together.

    Contract: `submit` and `call` are awaited on the event loop by any number of
    request handlers; the ledger itself is touched only by the committer's single
    thread, so SQLite sees one writer and each group costs one transaction (one fsync).
    """

    def __init__(
        self,
        ledger: Ledger,
        max_pending: int,
        on_outcome: Callable[[Outcome], None] = lambda _o: None,
    ) -> None:
        self.ledger = ledger
        self.max_pending = max_pending
        self.on_outcome = on_outcome
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._queue: list[tuple[Submission, asyncio.Future[Outcome]]] = []
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.groups = 0  # transactions committed (for benches and tests)
        # The service watchdog's view: a group commit far past SQLite's busy timeout and an
        # fsync is stuck (a wedged disk, a lock never released), and the pings stop.
        self.liveness = Liveness()
        self.stuck_after_s = COMMIT_STUCK_S

    @property
    def pending(self) -> int:
        return len(self._queue) + self._in_flight

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-committer")
        # A committer task that ended (a bug, a cancel) leaves every submission waiting and
        # the queue filling, with no step under way for Liveness to find stuck: watched itself.
        self.liveness.watch("ledger committer",
                            lambda: self._task is None or self._stopping or not self._task.done())

    async def stop(self) -> None:
        """Commit what is queued, then stop; the ledger is not closed here."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the ledger thread, between group commits."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, sub: Submission) -> Outcome:
        if self.pending >= self.max_pending or self._stopping:
            raise Overloaded(f"{self.pending} batches are waiting for the ledger")
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((sub, fut))
        self._wakeup.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                group = self._queue[:MAX_GROUP]
                del self._queue[:MAX_GROUP]
                self._in_flight = len(group)
                try:
                    with self.liveness.step("ledger commit", self.stuck_after_s):
                        outcomes = await self.call(self.ledger.commit, [sub for sub, _ in group])
                except Exception as exc:  # sqlite3.Error, OSError: the whole group failed
                    log.error("ledger commit of %d batches failed: %s", len(group), exc)
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(LedgerUnavailable(str(exc)))
                else:
                    self.groups += 1
                    for (_, fut), outcome in zip(group, outcomes, strict=True):
                        try:
                            self.on_outcome(outcome)
                        except Exception:
                            # The batch is committed whatever the hook did: its sender still
                            # gets the answer, and the committer goes on with the next group.
                            log.exception("committed a batch of %s/%s (%s), but applying its outcome failed",
                                          outcome.state.site, outcome.state.node, outcome.result)
                        if not fut.done():
                            fut.set_result(outcome)
                finally:
                    self._in_flight = 0
            if self._stopping:
                return


class IngestMetrics(Collector):
    """The ingest counters (plain ints: no _created series, no global registry)."""

    def __init__(self) -> None:
        self.batches = dict.fromkeys(RESULTS, 0)
        self.samples = 0
        self.bytes = 0

    def count(self, result: str) -> None:
        self.batches[result] += 1

    def collect(self) -> Iterator[Metric]:
        batches = CounterMetricFamily(
            "waystation_ingest_batches",
            "Batches posted to the collector, by outcome.",
            labels=["result"],
        )
        for result, n in self.batches.items():
            batches.add_metric([result], n)
        yield batches
        yield CounterMetricFamily(
            "waystation_ingest_samples", "Samples in accepted batches.", value=self.samples
        )
        yield CounterMetricFamily(
            "waystation_ingest_bytes",
            "Request body bytes received on /v1/batches (accepted or not).",
            value=self.bytes,
        )


class _Refusal(Exception):
    """A post we answer with a 4xx/503; `signed` once the node's signature has verified."""

    def __init__(
        self, result: str, detail: str, header: wire.Header | None = None, signed: bool = False
    ) -> None:
        super().__init__(f"{result}: {detail}")
        self.result = result
        self.detail = detail
        self.header = header
        self.signed = signed


def refusal_of(exc: Exception) -> _Refusal:
    """What a post that raised `exc` is refused with."""
    if isinstance(exc, _Refusal):
        return exc
    if isinstance(exc, Overloaded):
        return _Refusal("overloaded", str(exc))
    if isinstance(exc, LedgerUnavailable):
        return _Refusal("unavailable", f"ledger cannot commit: {exc}")
    # No input may produce a 5xx; log what we did not foresee.
    log.error("unexpected error while ingesting a batch", exc_info=exc)
    return _Refusal("malformed", f"batch could not be processed: {exc}")


def result_word(refusal: wire.Refusal) -> str:
    """The ingest result for a refusal of open_batch (an unforeseen word reads as malformed)."""
    return refusal.result if refusal.result in STATUS else "malformed"


def _wire_refusal(refusal: wire.Refusal) -> _Refusal:
    return _Refusal(result_word(refusal), refusal.detail, refusal.header, refusal.signed)


def open_frame(
    body: bytes,
    keys: sqlite3.Connection,
    limits: wire.OpenLimits,
    tables: wire.SeriesTables,
    sealing_keys: wire.SealingKeys | None,
    series_tables: wire.TableStore | None = None,
) -> wire.VerifiedBatch | wire.Refusal:
    """open_batch as ingest calls it: the node keys from the ledger, the collector's sealing
    keys, each node's series table cache (v1), the series tables (v2: `series_tables`,
    collector.tables.LedgerTables). `body` is a request body: a frame, or a series table
    followed by the frame that names it (wire.split_body; one that starts as a table but
    holds no whole table and frame is refused `malformed`). One caller at a time per
    `tables` and `series_tables`."""
    try:
        attached, frame = wire.split_body(body)
    except wire.WireError as exc:
        return wire.Refusal(exc.reason if exc.reason in STATUS else "malformed",
                            f"body starts with a series table: {exc.detail}")
    # A v2 batch comes back as columns only: the latest state takes columns (apply_opened).
    return wire.open_batch(frame, partial(trust.lookup, keys), limits, tables, sealing_keys=sealing_keys,
                           series_tables=series_tables, attached_table=attached, as_series=False)


def submission(
    opened: wire.VerifiedBatch, received_at: float, origin: str = "http", origin_file: str | None = None
) -> Submission:
    """What the ledger commits for a verified batch, whichever way it came (HTTP, a bundle);
    a v2 data batch brings its series table, for the ledger to hold with it."""
    if opened.columns is not None:
        backlog = reported_backlog_columns(opened.columns)
    else:
        backlog = reported_backlog(opened.series) if opened.series else None
    return Submission(opened.frame, cast(trust.KeyRecord, opened.key), received_at, drop=opened.drop,
                      rotation=opened.rotation, backlog=backlog, origin=origin, origin_file=origin_file,
                      table=opened.table)


def apply_opened(fleet: FleetState, opened: wire.VerifiedBatch, now_ms: int) -> None:
    """A committed data batch into the latest state: a v2 batch by its columns (no Series
    objects), a v1 batch by its series."""
    h = opened.header
    if opened.columns is not None:
        fleet.apply_columns(h.site, h.node, opened.columns, now_ms=now_ms)
    elif opened.series:
        fleet.apply(h.site, h.node, opened.series, now_ms=now_ms)


def open_limits(limits: LimitsConfig) -> wire.OpenLimits:
    return wire.OpenLimits(
        max_decompressed_bytes=limits.max_decompressed_bytes,
        payload=wire.Limits(
            max_series=limits.max_series_per_batch,
            max_samples=limits.max_samples_per_batch,
            max_labels=limits.max_labels_per_series,
        ),
    )


def _header_of(body: bytes) -> wire.Header | None:
    """A frame's header as it reads, unverified (for an answer that names the frame); `body`
    may carry a series table before the frame."""
    try:
        return wire.parse_frame(wire.split_body(body)[1]).header
    except wire.WireError:
        return None


class Ingest:
    """The POST /v1/batches handler; `keys` is a connection used only for key lookups."""

    def __init__(
        self,
        limits: LimitsConfig,
        keys: sqlite3.Connection,
        committer: Committer,
        fleet: FleetState,
        metrics: IngestMetrics,
        sealing_keys: wire.SealingKeys | None = None,
    ) -> None:
        self.limits = limits
        self.sealing_keys = sealing_keys  # the collector's private keys for sealed payloads
        self.keys = keys
        self.committer = committer
        self.fleet = fleet
        self.metrics = metrics
        self.open_limits = open_limits(limits)
        # Verification and decoding of big bodies run here, off the event loop; one at a
        # time in all (`verified`), so a node's series table cache never has two users at once.
        self.verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        # One verification at a time, inline or in the thread (the caches have one user).
        self._verifying = asyncio.Lock()
        self.in_progress = 0  # posts being read or verified
        # Per verified node: its series table repeats batch after batch, so names and labels
        # are decoded and validated once, not per batch.
        self.tables = wire.SeriesTables()
        # Wire v2: the series tables nodes sent (held in the ledger once a batch with them
        # commits), cached here and read from the ledger on a miss through `keys`; used by
        # the verify thread only.
        self.series_tables = LedgerTables(keys, self.open_limits, sealing_keys)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except Exception as exc:
            return json_answer(*self.answer_of(exc))

    def answer_of(self, exc: Exception) -> Answer:
        """The answer to a post that raised `exc` (counted), as (status, body, headers)."""
        return self.refusal_answer(refusal_of(exc))

    async def commit_answer(self, opened: wire.VerifiedBatch, received_at: float) -> Answer:
        """Commit a verified batch and apply it; the answer to its post, whatever happened
        (a front process hands its verified batches here: collector/fronts.py)."""
        try:
            result = await self.record(opened, received_at)
        except Exception as exc:
            return self.answer_of(exc)
        return 200, self._ack(result, opened.header), None

    async def _read_body(self, request: web.Request) -> bytes:
        cap = self.limits.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > cap:
            raise _Refusal("too_large", f"body of {declared} bytes exceeds max_body_bytes {cap}")
        chunks: list[bytes] = []
        total = 0
        deadline = self.limits.body_read_timeout
        try:
            async with asyncio.timeout(deadline):
                async for chunk in request.content.iter_chunked(256 * 1024):
                    total += len(chunk)
                    if total > cap:
                        raise _Refusal("too_large", f"body exceeds max_body_bytes {cap}")
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refusal("timeout", f"body not complete within body_read_timeout {deadline:g}s "
                                      f"({total} bytes arrived)") from None
        except (aiohttp.ClientPayloadError, ConnectionError) as exc:
            # The sender went away mid-upload (its uplink dropped): nothing to answer, one line.
            log.info("upload from %s aborted after %d bytes: %s", request.remote, total, exc)
            raise _Refusal("aborted", f"upload aborted after {total} bytes") from None
        finally:
            self.metrics.bytes += total
        return b"".join(chunks)

    def _open(self, body: bytes) -> wire.VerifiedBatch | wire.Refusal:
        """Runs in the verify thread: one at a time, so each node's table cache has one user."""
        return open_frame(body, self.keys, self.open_limits, self.tables, self.sealing_keys, self.series_tables)

    async def verified(self, fn: Callable[[bytes], T], body: bytes) -> T:
        """fn(body), one call at a time: a body up to INLINE_VERIFY_BYTES on the event loop, a
        bigger one in the verify thread. A minute of 1,000 series (3 KB) verifies and decodes
        in a fraction of a millisecond, 60 points of each (~100 KB) in a few: less than the
        hop to a thread and back, and the GIL passed between the thread and the loop across
        two cores, cost (ingest's CPU per batch was double, at 60 points 1.5 times)."""
        async with self._verifying:
            if len(body) <= INLINE_VERIFY_BYTES:
                return fn(body)
            return await asyncio.get_running_loop().run_in_executor(self.verifier, fn, body)

    async def verify(self, body: bytes) -> wire.VerifiedBatch:
        """open_batch, one at a time (`verified`); a refusal raises _Refusal. LedgerUnavailable when
        the ledger cannot be read for the node's key or series table (the batch is not
        judged: answered 503, sent again)."""
        try:
            opened = await self.verified(self._open, body)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"cannot read the ledger: {exc}") from None
        if isinstance(opened, wire.Refusal):
            raise _wire_refusal(opened)
        return opened

    async def record(
        self, opened: wire.VerifiedBatch, received_at: float, origin: str = "http", origin_file: str | None = None
    ) -> str:
        """Commit a verified batch and apply it to the latest state; returns "accepted" or
        "duplicate" ("duplicate_pruned" for an import whose seq left the archive), raises
        _Refusal for anything else. HTTP posts and bundle imports (POST /v1/import) both come
        through here, so both are counted and exposed alike."""
        h = opened.header
        outcome = await self.committer.submit(submission(opened, received_at, origin, origin_file))
        if outcome.result == "duplicate":
            self.metrics.count("duplicate")
            # An import must not put a pruned seq in a receipt's held batches; a post's
            # ack says "duplicate" either way (see _handle).
            return "duplicate_pruned" if outcome.pruned and origin == "bundle" else "duplicate"
        if outcome.result != "accepted":
            raise _Refusal(outcome.result, outcome.detail, h, signed=True)
        # At the collector's clock when it was received: a replay at start applies it so too.
        apply_opened(self.fleet, opened, int(received_at * 1000))
        self.metrics.count("accepted")
        self.metrics.samples += h.sample_count
        return "accepted"

    def check_capacity(self) -> None:
        # Bodies being read or waiting for the verify thread count too: they hold memory
        # (up to max_body_bytes each) just as queued commits do.
        waiting = self.committer.pending + self.in_progress
        if waiting >= self.limits.max_pending_commits:
            raise Overloaded(f"{waiting} batches are waiting to be verified or committed")

    async def _handle(self, request: web.Request) -> web.Response:
        self.check_capacity()
        self.in_progress += 1
        try:
            body = await self._read_body(request)
            received_at = time.time()
            opened = await self.verify(body)
        finally:
            self.in_progress -= 1
        return json_answer(*await self.commit_answer(opened, received_at))

    async def import_frames(
        self, frames: list[bytes], origin_file: str
    ) -> list[tuple[str, str, wire.Header | None]]:
        """Bundle frames handed over by `waystation-collector import` (POST /v1/import): each
        through exactly the path of a post, committed with origin 'bundle' (an item may be a
        series table followed by its frame, as a post's body may). Returns (result, detail,
        header) per frame, in order; frames commit together in groups."""
        results: list[tuple[str, str, wire.Header | None]] = [("", "", None)] * len(frames)

        async def one(i: int, opened: wire.VerifiedBatch, received_at: float) -> None:
            try:
                results[i] = (await self.record(opened, received_at, "bundle", origin_file), "", opened.header)
            except _Refusal as r:
                self.metrics.count(r.result)
                results[i] = (r.result, r.detail, r.header)
            except Overloaded as exc:
                results[i] = ("overloaded", str(exc), opened.header)
            except LedgerUnavailable as exc:
                results[i] = ("unavailable", f"ledger cannot commit: {exc}", opened.header)

        pending: list[asyncio.Task[None]] = []
        for i, body in enumerate(frames):
            if len(body) > self.limits.max_body_bytes:
                self.metrics.count("too_large")
                results[i] = ("too_large", f"frame of {len(body)} bytes exceeds max_body_bytes "
                                           f"{self.limits.max_body_bytes}", None)
                continue
            self.metrics.bytes += len(body)
            try:
                opened = await self.verify(body)
            except _Refusal as r:
                self.metrics.count(r.result)
                results[i] = (r.result, r.detail, r.header)
                continue
            except LedgerUnavailable as exc:
                self.metrics.count("unavailable")
                results[i] = ("unavailable", f"ledger cannot be read: {exc}", _header_of(body))
                continue
            # Submitted in order, so a node's chain commits oldest first within each group.
            pending.append(asyncio.ensure_future(one(i, opened, time.time())))
            # A key rotation must be in the ledger before a frame signed with the new key is
            # verified, or that frame is refused unknown_key.
            if len(pending) >= IMPORT_GROUP or opened.rotation is not None:
                await asyncio.gather(*pending)
                pending = []
                result = results[i][0]
                if opened.rotation is not None and result in ("overloaded", "unavailable"):
                    # The rotation is not in the ledger, so a later frame signed with the new
                    # key would be refused unknown_key for good. None of them is verified now:
                    # answered overloaded, the import sends them again after the rotation.
                    h = opened.header
                    detail = (f"not verified: the key rotation of {h.site}/{h.node} at seq {h.seq} before it "
                              f"was answered {result}")
                    for j in range(i + 1, len(frames)):
                        results[j] = ("overloaded", detail, _header_of(frames[j]))
                    break
        await asyncio.gather(*pending)
        return results

    def _ack(self, result: str, h: wire.Header) -> dict[str, Any]:
        state = self.fleet.node(h.site, h.node)
        return {
            "result": result,
            "site": h.site,
            "node": h.node,
            "seq": h.seq,
            "complete_through": state.complete_through if state else 0,
            "highest_seq": state.highest_seq if state else 0,
        }

    def refusal_answer(self, r: _Refusal) -> Answer:
        """The answer to a refused post (counted); a signed one carries the node's watermark."""
        self.metrics.count(r.result)
        body: dict[str, Any] = {"result": r.result, "error": r.detail}
        if r.header is not None:
            body.update(site=r.header.site, node=r.header.node, seq=r.header.seq)
        if r.header is not None and r.signed:
            # Only a node that proved its key learns its watermark (to resume after losing state).
            state = self.fleet.node(r.header.site, r.header.node)
            if state is not None:
                body.update(complete_through=state.complete_through, highest_seq=state.highest_seq)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if STATUS[r.result] == 503 else None
        return STATUS[r.result], body, headers
