"""More than one core: front processes take the HTTP requests, the serve process the ledger.

With `workers = N` (N >= 1) serve starts N front processes (`python -m collector.fronts`).
Each binds the public listen address with SO_REUSEPORT, so the kernel spreads connections
over them, and handles POST /v1/batches up to and including verification and decoding:
reading the body under the limits, the node's key from the ledger (a read-only connection),
signature, decompression, the series table (the ledger's, or the one sent with the batch),
columns. The verified batch goes to serve over a socket pair; serve commits it in its group
commit, applies it to the latest state and returns the answer, which the front sends. So
there is still one ledger and one writer, and a post is answered only once it is durable.
Every other route (/metrics, /healthz, /v1/nodes, chain heads, /v1/import) is passed through
to serve's own HTTP server on a Unix socket in a directory only the collector's user reads.

Handoff messages are length-prefixed pickles on a socket pair that only serve and the front
it started hold: ("batch", id, bytes, received_at, packed batch), ("refused", id, bytes,
result) for a post the front refused itself, ("ready", port) once listening; `bytes` is the
request body bytes the front read since its last message. Serve answers each with ("answer",
id, status, body, headers), having counted it, so waystation_ingest_* on /metrics include a
post by the time its sender has the answer, whichever process took it.
A batch's series table travels with it only when the front's post carried one (or the front
has not seen serve hold it); otherwise serve finds the table by id in its own cache or in
the ledger, and a table it cannot find is answered unknown_table (the agent sends it again
with the table).

Serve restarts a front that dies; a front whose serve is gone stops (its socket pair closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import pickle
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yarl
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import wire
from collector import keyring
from collector import ledger as ledger_mod
from collector.config import CollectorConfig, load_config
from collector.ingest import (
    STATUS,
    Answer,
    Ingest,
    IngestMetrics,
    LedgerUnavailable,
    Overloaded,
    _Refusal,
    json_answer,
    refusal_of,
)
from wire.columns_np import Columns
from wire.malloc import tune_malloc

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
MAX_MESSAGE = 1 << 30  # far above any batch the limits let through; a guard, not a limit
# Set by a front on requests it passes to serve: whether the client is on this machine
# (POST /v1/import takes only those). Serve believes it only on its Unix socket.
PEER_HEADER = "X-Waystation-Front-Peer"
# Not passed on by the front (RFC 9110 7.6.1), or set again by it.
_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", PEER_HEADER.lower()))
FRONT_STOP_S = 15.0
SERVE_TABLES = 65_536
SERVE_TABLE_SERIES = 20_000_000


# ------------------------------------------------------------------------- messages


async def read_message(reader: asyncio.StreamReader) -> Any:
    """One message, or None at EOF."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_MESSAGE:
        raise ValueError(f"handoff message of {size} bytes")
    try:
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


def write_message(writer: asyncio.StreamWriter, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LEN.pack(len(data)) + data)


Packed = tuple[Any, ...]


def pack_batch(opened: wire.VerifiedBatch, send_table: bool) -> Packed:
    """A verified batch for serve: the frame's bytes (serve parses the header again), its key
    record, what was decoded; the series table only when `send_table`, else its id."""
    table = opened.table
    cols = opened.columns
    arrays = None
    if cols is not None:
        # One bytes object and the lengths: a third of what pickling seven arrays costs.
        columns = (cols.index, cols.starts, cols.timestamps_ms, cols.values, cols.column, cols.column_starts,
                   cols.column_timestamps)
        arrays = (b"".join(a.tobytes() for a in columns if a is not None),
                  tuple(None if a is None else a.size for a in columns))
    return (opened.frame.raw, opened.key, opened.series, opened.drop, opened.rotation,
            None if table is None else table.id, table if send_table else None, arrays)


# Columns' dtypes in pack_batch's order (all 8 bytes wide).
_COLUMN_DTYPES = (np.int64, np.int64, np.int64, np.float64, np.int64, np.int64, np.int64)


def _columns_of(table: wire.SeriesTable, arrays: tuple[bytes, tuple[int | None, ...]]) -> Columns:
    blob, sizes = arrays
    buf = bytearray(blob)  # writable arrays, as decoding gives them
    parts: list[Any] = []
    offset = 0
    for size, dtype in zip(sizes, _COLUMN_DTYPES, strict=True):
        if size is None:
            parts.append(None)
            continue
        parts.append(np.frombuffer(buf, dtype=dtype, count=size, offset=offset))
        offset += 8 * size
    return Columns(table, *parts)


class NeedTable(Exception):
    """Serve does not hold the series table a batch names: the front sends it again with it."""


# The status of serve's answer that asks for the batch again with its series table.
SEND_TABLE = 0


def unpack_batch(packed: Packed, tables: wire.MemoryTables) -> wire.VerifiedBatch:
    """The batch a front verified, its series table taken from serve's `tables` (the object
    the ledger tracks) when held there, else the one sent with it. Serve never opens a table
    itself (no ledger read, no decode, no sealing keys on its event loop): NeedTable when it
    holds none of that id and none came."""
    raw, key, series, drop, rotation, table_id, sent, arrays = packed
    frame = wire.parse_frame(raw)
    h = frame.header
    table: wire.SeriesTable | None = None
    if table_id is not None:
        table = tables.get(h.site, h.node, table_id)
        if table is None:
            if sent is None or sent.id != table_id:
                raise NeedTable(table_id)
            sent.durable = False  # serve's ledger decides whether it holds it
            tables.add(h.site, h.node, sent)
            table = sent
    columns = None if arrays is None else _columns_of(table, arrays)  # type: ignore[arg-type]
    return wire.VerifiedBatch(frame, key, series, drop, rotation, table, columns)


# ------------------------------------------------------------------- serve's side


class Fronts:
    """Serve's end: starts the fronts, takes their batches into `ingest`, restarts a front
    that dies, stops them before serve stops."""

    def __init__(self, config: CollectorConfig, config_file: Path | None, port: int, proxy_path: str,
                 ingest: Ingest, metrics: IngestMetrics) -> None:
        self.config = config
        self.config_file = config_file
        self.port = port
        self.proxy_path = proxy_path
        self.ingest = ingest
        self.metrics = metrics
        self.count = config.workers
        self.restarts = 0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: dict[int, asyncio.Event] = {}
        # The series tables the fronts' batches named, as serve holds them (the objects the
        # ledger and the latest state track); a miss asks the front for the table. The latest
        # state keeps each node's current tables anyway, so the cap only bounds the rest.
        self.tables = wire.MemoryTables(max_tables=SERVE_TABLES, max_series=SERVE_TABLE_SERIES)

    async def start(self, timeout: float = 60.0) -> None:
        """Start every front; returns once each listens (RuntimeError if one cannot)."""
        ready = []
        for slot in range(self.count):
            event = asyncio.Event()
            self._ready[slot] = event
            self._tasks.append(asyncio.get_running_loop().create_task(self._keep(slot), name=f"front-{slot}"))
            ready.append(event.wait())
        try:
            await asyncio.wait_for(asyncio.gather(*ready), timeout)
        except TimeoutError:
            raise RuntimeError(f"the front processes did not start listening within {timeout:g}s") from None

    def _child_config(self, handoff_fd: int) -> bytes:
        return (json.dumps({
            "config_file": None if self.config_file is None else str(self.config_file),
            "data_dir": self.config.data_dir,
            "host": self.config.host,
            "port": self.port,
            "handoff_fd": handoff_fd,
            "proxy": self.proxy_path,
            "log_level": self.config.log_level,
        }) + "\n").encode()

    async def _keep(self, slot: int) -> None:
        delay = 1.0
        while not self._stopping:
            try:
                delay = await self._run_once(slot, delay)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: logged, and the slot goes on
                log.exception("front process %d: supervising it failed", slot)
                await self._pause(delay)

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short by stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _run_once(self, slot: int, delay: float) -> float:
        """Start the front of `slot`, serve it until it exits; the next back-off."""
        started = time.monotonic()
        ours, theirs = socket.socketpair()
        theirs_fd = theirs.fileno()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "collector.fronts", stdin=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),), env=env,
            )
        except OSError as exc:
            log.error("cannot start front process %d: %s", slot, exc)
            ours.close()
            theirs.close()
            rc: int | None = None
        else:
            theirs.close()
            self._procs[slot] = proc
            assert proc.stdin is not None
            proc.stdin.write(self._child_config(theirs_fd))
            with contextlib.suppress(ConnectionError):
                await proc.stdin.drain()
            if self._stopping:  # stop() came while this one started: it goes too
                proc.stdin.close()
            link = asyncio.get_running_loop().create_task(self._serve_link(slot, ours))
            rc = await proc.wait()
            await link
        if self._stopping:
            return delay
        if time.monotonic() - started > 60:
            delay = 1.0
        log.error("front process %d exited %s; starting it again in %g s", slot, rc, delay)
        await self._pause(delay)
        if not self._stopping:
            self.restarts += 1
        return min(delay * 2, 30.0)

    async def _serve_link(self, slot: int, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        answering: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    message = await read_message(reader)
                except Exception as exc:  # not ours to read (a front of another version), a bug
                    log.error("front process %d sent what is not a message (%r); closing its link", slot, exc)
                    break
                if message is None:
                    break
                try:
                    self._take(slot, writer, message, answering)
                except Exception:  # a front of another version, a bug: that front starts again
                    log.exception("front process %d sent a message serve cannot take; closing its link", slot)
                    break
        finally:
            # A front that went away leaves its posts unanswered (its clients send them
            # again); what they were committing still commits.
            if answering:
                await asyncio.gather(*answering, return_exceptions=True)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _take(self, slot: int, writer: asyncio.StreamWriter, message: Any,
              answering: set[asyncio.Task[None]]) -> None:
        """One message from a front (see the module docstring)."""
        kind = message[0]
        if kind == "batch":
            _, rid, received, received_at, packed = message
            self.metrics.bytes += received
            task = asyncio.get_running_loop().create_task(self._answer(writer, rid, received_at, packed))
            answering.add(task)
            task.add_done_callback(answering.discard)
        elif kind == "refused":
            _, rid, received, (result, detail, header, signed) = message
            self.metrics.bytes += received
            refusal = _Refusal(result if result in STATUS else "malformed", detail, header, signed)
            write_message(writer, ("answer", rid, *self.ingest.refusal_answer(refusal)))
        elif kind == "ready":
            self._ready[slot].set()

    async def _answer(self, writer: asyncio.StreamWriter, rid: int, received_at: float, packed: Packed) -> None:
        answer: Answer
        try:
            opened = unpack_batch(packed, self.tables)
        except NeedTable:
            answer = (SEND_TABLE, {}, None)
        else:
            answer = await self.ingest.commit_answer(opened, received_at)
        if not writer.is_closing():
            write_message(writer, ("answer", rid, *answer))

    async def stop(self) -> None:
        """Stop the fronts (each finishes the posts it holds: their batches still commit
        here), then stop watching them."""
        self._stopping = True
        self._stopped.set()
        procs = [p for p in self._procs.values() if p.returncode is None]
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: the front stops listening, answers what it holds, exits
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), FRONT_STOP_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class FrontMetrics(Collector):
    """The fronts for /metrics: how many serve runs and how often one had to start again."""

    def __init__(self, fronts: Fronts) -> None:
        self.fronts = fronts

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("waystation_collector_front_processes",
                                "Front processes taking HTTP requests beside serve (workers).",
                                value=self.fronts.count)
        yield CounterMetricFamily("waystation_collector_front_restarts",
                                  "Front processes started again after one exited unasked.",
                                  value=self.fronts.restarts)


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to each of `host`'s addresses at `port` (for 0, one the OS chose for the
    first) with SO_REUSEPORT, never listening: they hold the port for the fronts to bind
    beside them. Each address is first bound without SO_REUSEPORT, so a port another process
    holds (another collector's fronts among them) is refused (OSError) rather than shared."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    held: list[socket.socket] = []
    try:
        for family, _, _, _, addr in infos:
            if any(s.family == family and s.getsockname()[0] == addr[0] for s in held):
                continue
            if held:
                addr = (addr[0], held[0].getsockname()[1], *addr[2:])
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(addr)
                addr = probe.getsockname()
            sock = socket.socket(family, socket.SOCK_STREAM)
            held.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held


def private_socket_path() -> tuple[str, Callable[[], None]]:
    """A path for serve's Unix socket in a new directory only this user can enter."""
    directory = tempfile.mkdtemp(prefix="waystation-collector-")
    path = os.path.join(directory, "serve.sock")

    def remove() -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(directory)

    return path, remove


def _from_front(request: web.Request) -> bool:
    """Whether the request came through serve's Unix socket (so from a front it started)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def same_host_from_front(request: web.Request) -> bool | None:
    """On serve's Unix socket, what the front said of its client; None elsewhere."""
    if not _from_front(request):
        return None
    return request.headers.get(PEER_HEADER, "").split(" ")[0] == "same-host"


def client_address(request: web.Request) -> str | None:
    """The client's address, as the front that took the request saw it."""
    if _from_front(request):
        return request.headers.get(PEER_HEADER, " ").partition(" ")[2] or None
    return request.remote


# ------------------------------------------------------------------- a front's side


class FrontIngest(Ingest):
    """POST /v1/batches in a front: read, verify, decode here; commit and answer in serve."""

    def __init__(self, config: CollectorConfig, keys: Any, sealing_keys: wire.SealingKeys | None,
                 link: Link) -> None:
        super().__init__(config.limits, keys, None, None, IngestMetrics(), sealing_keys)  # type: ignore[arg-type]
        self.link = link
        self._told = 0

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except Exception as exc:
            r = refusal_of(exc)
            try:
                # Serve counts it and writes the answer (a signed refusal tells the node its
                # watermark, which serve holds).
                return json_answer(*await self.link.refused(r, self._received()))
            except LedgerUnavailable:
                return json_answer(*self.refusal_answer(_Refusal("unavailable", "serve is not answering")))

    def _received(self) -> int:
        """Body bytes read since serve was last told."""
        received = self.metrics.bytes - self._told
        self._told = self.metrics.bytes
        return received

    def check_capacity(self) -> None:
        waiting = self.link.pending + self.in_progress
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
        table = opened.table
        attached = body[:4] == wire.TABLE_MAGIC
        send_table = table is not None and (attached or not table.durable)
        status, answer, headers = await self.link.submit(pack_batch(opened, send_table), received_at,
                                                          self._received())
        if status == SEND_TABLE:  # serve does not hold the table (it started again, or let it go)
            send_table = True
            status, answer, headers = await self.link.submit(pack_batch(opened, True), received_at, 0)
        if send_table and table is not None and answer.get("result") in ("accepted", "duplicate"):
            table.durable = True  # serve holds it now: later batches name it by id
        return json_answer(status, answer, headers)


class Link:
    """A front's end of the socket pair to serve."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self._next = 0
        self.closed = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._waiting)

    async def submit(self, packed: Packed, received_at: float, received: int) -> Answer:
        """Serve's answer to a verified batch (LedgerUnavailable: serve is gone)."""
        return await self._ask("batch", received, received_at, packed)

    async def refused(self, r: _Refusal, received: int) -> Answer:
        """Serve's answer to a post refused here, once serve has counted it."""
        return await self._ask("refused", received, (r.result, r.detail, r.header, r.signed))

    async def _ask(self, kind: str, *fields: Any) -> Answer:
        if self.closed.is_set():
            raise LedgerUnavailable("serve is gone")
        rid = self._next
        self._next += 1
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            write_message(self.writer, (kind, rid, *fields))
            return await fut
        finally:
            self._waiting.pop(rid, None)

    def send(self, message: Any) -> None:
        if not self.closed.is_set():
            write_message(self.writer, message)

    async def run(self) -> None:
        try:
            while True:
                message = await read_message(self.reader)
                if message is None:
                    break
                _, rid, status, body, headers = message
                fut = self._waiting.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result((status, body, headers))
        except Exception as exc:
            log.error("handoff to serve failed: %r", exc)
        finally:
            self.closed.set()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(LedgerUnavailable("serve is gone"))


def peer_is_this_host(request: web.Request) -> bool:
    """The TCP peer is this machine: loopback, or our own address on the listening socket."""
    transport = request.transport
    if transport is None:
        return False
    peer: Any = transport.get_extra_info("peername")
    own: Any = transport.get_extra_info("sockname")
    if not peer:
        return False
    try:
        if ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback:
            return True
    except ValueError:
        return False
    return bool(own) and str(peer[0]) == str(own[0])


def _front_peer(request: web.Request) -> str:
    """PEER_HEADER's value: "same-host" or "remote", then the client's address."""
    return f"{'same-host' if peer_is_this_host(request) else 'remote'} {request.remote or ''}"


class Proxy:
    """Every route but POST /v1/batches, passed to serve's Unix socket and streamed back."""

    def __init__(self, path: str) -> None:
        self.session = aiohttp.ClientSession(
            # No cap: a slow reader of a big /metrics must not hold up the other routes.
            connector=aiohttp.UnixConnector(path=path, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers[PEER_HEADER] = _front_peer(request)
        # The path as sent (a %2F in a node name stays one segment), without an absolute-form
        # request's scheme and host.
        url = yarl.URL("http://collector" + request.rel_url.raw_path_qs, encoded=True)
        data = request.content if request.body_exists else None
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(request.method, url, headers=headers, data=data,
                                            allow_redirects=False) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP:
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, OSError) as exc:
            if response is not None and response.prepared:
                # The status line is out: a cut connection is the only honest end (a second
                # answer would be read as the rest of the body).
                log.info("%s %s: serve stopped answering mid-body: %s", request.method, request.path, exc)
                if request.transport is not None:
                    request.transport.close()
                return response
            return web.json_response({"result": "unavailable", "error": f"serve does not answer: {exc}"},
                                     status=503, headers={"Retry-After": "1"})

    async def close(self) -> None:
        await self.session.close()


async def _front(settings: dict[str, Any]) -> int:
    config = load_config(Path(settings["config_file"]) if settings["config_file"] else None)
    config = dataclasses.replace(config, data_dir=settings["data_dir"])
    sealing = keyring.load_sealing_keys(keyring.sealing_key_files(Path(config.data_dir)))
    keys = ledger_mod.connect(config.ledger_path, create=False)
    sock = socket.socket(fileno=settings["handoff_fd"])
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
    link = Link(reader, writer)
    linked = asyncio.get_running_loop().create_task(link.run())
    ingest = FrontIngest(config, keys, sealing, link)
    proxy = Proxy(settings["proxy"])
    app = web.Application(client_max_size=config.limits.max_body_bytes + 1)
    app.router.add_post("/v1/batches", ingest.handle)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    ssl_context = None
    if config.tls:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    from collector.app import quiet_malformed_http

    quiet_malformed_http()
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # systemd signals the whole unit at a stop: serve's EOF on stdin is what stops a front.
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    loop.add_signal_handler(signal.SIGINT, lambda: None)

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, name="stdin", daemon=True).start()
    linked.add_done_callback(lambda _t: stop.set())
    try:
        site = web.TCPSite(runner, settings["host"], settings["port"], ssl_context=ssl_context,
                           reuse_port=True, shutdown_timeout=10.0)
        await site.start()
        link.send(("ready", settings["port"]))
        await stop.wait()
    finally:
        await runner.cleanup()  # stops listening, lets the posts it holds finish
        await proxy.close()
        ingest.verifier.shutdown(wait=True)
        writer.close()
        keys.close()
    return 0


def main() -> int:
    line = sys.stdin.buffer.readline()
    try:
        settings = json.loads(line)
    except ValueError:
        print("waystation front: expected its settings as one JSON line on stdin", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.get("log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s front: %(message)s")
    tune_malloc()
    return asyncio.run(_front(settings))


if __name__ == "__main__":
    sys.exit(main())
