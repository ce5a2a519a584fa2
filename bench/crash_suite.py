"""Crash proof: SIGKILLs at random moments of agents and the collector, while forwarding.

Real `waystation-agent run` and `waystation-collector serve` processes on loopback. Each
agent (two by default) scrapes a page this suite serves (values change at every scrape)
every 250 ms, summarizes 500 ms windows into signed batches, spools them (a 64 KiB quota,
so outages make it evict and sign drop receipts) and sends them through its own TCP relay
to the collector, which forwards everything to a remote-write receiver.

Kills run on two seeded timelines, the collector's and the agents': each draws its next
victim (the collector; one agent at random) and moment as soon as the previous victim is
restarted: 20 % while it starts (imports, database recovery, first batch), the rest 0.05 s
to --max-delay after it is ready (the collector answering /healthz). One kill in ten takes
a process of the other timeline with it. The collector is killed as serve alone (its
forwarder child must then finish by itself) or with its forwarder (the unit's KILL). Every
killed process is restarted at once. Between kills the uplinks are cut (connections reset,
or black-holed so that sends time out) and restored; every --evict-every kills an outage
lasts until every spool has evicted; the receiver has outages of its own (503).

Witness: each relay reads the HTTP it carries and records every batch the collector
acknowledged (200 accepted/duplicate for the frame's seq), by frame hash, whether or not
the agent lived to read the answer. The receiver is a recording remote-write endpoint in
this process (exact: every sample by labels, timestamp and value bits). VictoriaMetrics
would also do, but it keeps a resent sample twice without dedup, needs a flush before each
read, and rounds values through its decimal storage: this one keeps 1,000 kills tractable.

At the end everything is restored and drained, and the suite checks:
- every batch the collector acked is in the ledger, byte for byte (so every sample in it),
  and no seq was acked with two different frames, nor answered 409;
- PRAGMA integrity_check is clean on every spool and ledger, after kills (the killed
  process's files, before its restart) and at the end;
- every seq of each node is in the ledger, named by a drop receipt there, or still in the
  node's spool, and `waystation-collector audit` (signatures, chain, every gap) is clean;
  per node, samples signed = delivered + lost + still in the spool, where lost is what the
  drop receipts name less what the ledger holds (a batch whose ack the agent never read
  may be evicted later, and its receipt then names a batch the collector has);
- the receiver holds every sample of every data batch in the ledger;
- no process exited by itself and no forwarder outlived its serve.

    python bench/crash_suite.py --kills 1000 --seed 1 --minutes-cap 60
    python bench/crash_suite.py --kills 100 --workdir /tmp/crash   # artifacts kept

Prints the kills of each kind, outages, batches acked, samples checked, receipts,
integrity checks, the time taken and per kill step (projected to 1,000), PASS/FAIL per
check. Exit status 0 when every check passes; on a failure the work directory is kept.
--minutes-cap ends the kill phase early (the drain and the checks still run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from aiohttp import web  # noqa: E402

import wire  # noqa: E402
from bench.common import ENV, enroll_agent, free_port, get, ledger_batches, metric_value  # noqa: E402
from collector import remote_write_proto as proto  # noqa: E402
from collector.exposition import RESERVED_PREFIXES  # noqa: E402

SITE = "crash"
TARGET = "rx"
SCRAPE_INTERVAL = "250ms"
WINDOW = "500ms"
ACK_RESULTS = ("accepted", "duplicate")
AGENT_READY_S = 0.6
EARLY_KILLS = 0.2  # the share of kills that land while the process is still starting
SETTLE_S = 3.0
READY_TIMEOUT_S = 30.0
BOTH_AT_ONCE = 0.1  # the share of kills that take a second process (collector and agent) along
MAX_EXITS = 10  # processes that ended by themselves before the suite stops early


# ---------------------------------------------------------------- the uplink relay and witness


class HttpMessages:
    """One direction of an HTTP/1.1 byte stream, split into (start line, headers, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
        self.buf += data
        out = []
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            if "chunked" in headers.get("transfer-encoding", "").lower():
                parsed = _dechunk(self.buf, end + 4)
                if parsed is None:
                    break
                body, used = parsed
            else:
                length = int(headers.get("content-length", "0"))
                if len(self.buf) < end + 4 + length:
                    break
                body, used = bytes(self.buf[end + 4:end + 4 + length]), end + 4 + length
            del self.buf[:used]
            out.append((lines[0], headers, body))
        return out


def _dechunk(buf: bytearray, at: int) -> tuple[bytes, int] | None:
    """(body, bytes used) of a complete chunked body starting at `at`, or None if incomplete."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buf[at:eol]).split(b";")[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            return (bytes(body), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2:eol + 2 + size]
        at = eol + 2 + size + 2


@dataclass
class Ack:
    site: str
    node: str
    seq: int
    kind: int
    hash: bytes
    samples: int


@dataclass
class Witness:
    """What the collector answered, as read on the wire; shared by every relay."""

    acked: dict[tuple[str, str, int], Ack] = field(default_factory=dict)
    conflicting_acks: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, start: str, body: bytes) -> Ack | None:
        if not start.startswith("POST /v1/batches"):
            return None
        try:
            _table, frame = wire.split_body(body)
            h = wire.parse_frame(frame).header
        except (wire.WireError, ValueError):
            with self.lock:
                self.unreadable += 1
            return None
        return Ack(h.site, h.node, h.seq, int(h.kind), wire.batch_hash(frame), h.sample_count)

    def answer(self, sent: Ack | None, start: str, body: bytes) -> None:
        if sent is None:
            return
        status = int(start.split()[1])
        try:
            reply = json.loads(body)
        except ValueError:
            reply = {}
        result = reply.get("result", "?") if isinstance(reply, dict) else "?"
        with self.lock:
            self.answers[f"{status} {result}"] += 1
            if status != 200 or result not in ACK_RESULTS or reply.get("seq") != sent.seq:
                return
            key = (sent.site, sent.node, sent.seq)
            before = self.acked.setdefault(key, sent)
            if before.hash != sent.hash:
                self.conflicting_acks.append(f"{sent.node} seq {sent.seq}: {before.hash.hex()[:16]} and "
                                             f"{sent.hash.hex()[:16]} both acked")


class _Link:
    """One agent connection through a relay."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.blackholed = False

    def abort(self) -> None:
        for w in (self.client, self.server):
            if w is not None:
                w.transport.abort()


class UplinkRelay:
    """A loopback TCP relay between one agent and the collector that can be cut ("reset":
    connections are reset, new ones too; "blackhole": bytes vanish, nothing is answered, until
    the restore resets them) and restored; every request and answer goes past the witness."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target_port: int, witness: Witness) -> None:
        self.loop = loop
        self.target_port = target_port
        self.witness = witness
        self.port = free_port()
        self.mode = "up"
        self.links: set[_Link] = set()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        if self.mode == "reset":
            link.abort()
            return
        self.links.add(link)
        try:
            if self.mode == "blackhole":
                link.blackholed = True
                while await reader.read(65536):
                    pass
                return
            try:
                server_r, link.server = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                link.abort()
                return
            sent: deque[Ack | None] = deque()
            await asyncio.gather(self._up(reader, link, sent), self._down(server_r, link, sent))
        except (ConnectionError, OSError):
            link.abort()
        finally:
            self.links.discard(link)
            writer.close()

    async def _up(self, reader: asyncio.StreamReader, link: _Link, sent: deque[Ack | None]) -> None:
        messages = HttpMessages()
        assert link.server is not None
        try:
            while data := await reader.read(65536):
                if link.blackholed:
                    continue
                for start, _headers, body in messages.feed(data):
                    sent.append(self.witness.request(start, body))
                link.server.write(data)
                await link.server.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.server.close()

    async def _down(self, reader: asyncio.StreamReader, link: _Link, sent: deque[Ack | None]) -> None:
        messages = HttpMessages()
        try:
            while data := await reader.read(65536):
                # The collector's answer counts as given once it is sent, delivered or not.
                for start, _headers, body in messages.feed(data):
                    self.witness.answer(sent.popleft() if sent else None, start, body)
                if link.blackholed:
                    continue
                link.client.write(data)
                await link.client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.client.close()

    def _set(self, mode: str) -> None:
        self.mode = mode
        for link in list(self.links):
            if mode == "reset" or (mode == "up" and link.blackholed):
                link.abort()
            elif mode == "blackhole":
                link.blackholed = True

    def set_mode(self, mode: str) -> None:
        self.loop.call_soon_threadsafe(self._set, mode)

    def close(self) -> None:
        async def shut() -> None:
            self._set("reset")
            self.server.close()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)


# ---------------------------------------------------------------- the page and the receiver


def sample_key(labels: tuple[tuple[str, str], ...], ts: int, value: float) -> int:
    """One sample as a number: labels (sorted), timestamp and the value's bits (NaN as one)."""
    bits = -1 if value != value else struct.unpack("<q", struct.pack("<d", value))[0]
    return hash((tuple(sorted(labels)), ts, bits))


class Fixtures:
    """The scraped page (values change at every scrape) and the recording remote-write
    receiver, on one loopback port, served by an event loop in a thread."""

    def __init__(self, series: int, seed: int) -> None:
        self.series = series
        self.rng = random.Random(seed)
        self.counters = [0] * series
        self.received: set[int] = set()
        self.rw_requests = 0
        self.rw_samples = 0
        self.down = False
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), name="crash-fixtures", daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise SystemExit("the page and receiver did not start")

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    @property
    def write_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/write"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=256 << 20)
        app.router.add_get("/metrics", self._page)
        app.router.add_post("/api/v1/write", self._write)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    async def _page(self, request: web.Request) -> web.Response:
        lines = ["# HELP crash_requests_total Requests.", "# TYPE crash_requests_total counter"]
        for i in range(self.series):
            self.counters[i] += self.rng.randint(0, 5)
            lines.append(f'crash_requests_total{{shard="{i}"}} {self.counters[i]}')
        lines += ["# HELP crash_queue_depth Queue depth.", "# TYPE crash_queue_depth gauge"]
        lines += [f'crash_queue_depth{{shard="{i}"}} {self.rng.random() * 100:.3f}' for i in range(self.series)]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _write(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.down:
            return web.Response(status=503, text="receiver outage")
        keys = [sample_key(labels, ts, v)
                for labels, points in proto.decode_write_request(proto.decompress(body)) for ts, v in points]
        self.received.update(keys)
        self.rw_requests += 1
        self.rw_samples += len(keys)
        return web.Response(status=204)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ---------------------------------------------------------------- processes


class Child:
    """A product process in a session of its own (so its whole group can be killed at once)."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ready_at: float | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                                         start_new_session=True)
        self.started = time.monotonic()
        self.ready_at = None
        self.starts += 1

    def exited(self) -> int | None:
        """The exit status if the process ended by itself (nobody killed it), else None."""
        return self.proc.poll() if self.proc is not None else None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True) if self.proc else []
        except psutil.NoSuchProcess:
            return []

    def kill(self, group: bool = True) -> None:
        assert self.proc is not None
        try:
            if group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL the group if it does not end in time. The exit status."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def integrity(path: Path) -> str:
    """'ok' or the first problems PRAGMA integrity_check names (read-only: no checkpoint, so
    the file stays exactly as the killed process left it for the restart)."""
    if not path.exists():
        return "ok"
    for attempt in range(5):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                rows = db.execute("PRAGMA integrity_check").fetchall()
            finally:
                db.close()
            return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:5])
        except sqlite3.OperationalError as exc:
            # A file created by a process killed before it wrote the header, or a lock held
            # for a moment by a surviving forwarder: tried again; a lasting one is reported.
            problem = f"cannot check: {exc}"
            time.sleep(0.2 * (attempt + 1))
    return problem


def spool_figures(spool: Path) -> dict[str, Any]:
    """The node's counters and the seqs still in its spool (read-only)."""
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=30)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rows = db.execute("SELECT seq, state, samples FROM batches").fetchall()
    finally:
        db.close()
    return {
        "next_seq": int(meta.get("next_seq") or 1),
        "produced_samples": int(meta.get("produced_samples") or 0),
        "dropped_batches": int(meta.get("dropped_batches") or 0),
        "unsent": {r[0]: r[2] for r in rows},
        "rejected": [r[0] for r in rows if r[1] == "rejected"],
    }


def dropped_batches(spool: Path) -> int:
    """Batches the spool has evicted so far (0 while it is being created)."""
    try:
        return int(spool_figures(spool)["dropped_batches"]) if spool.exists() else 0
    except sqlite3.Error:
        return 0


# ---------------------------------------------------------------- the suite


@dataclass
class Options:
    kills: int = 1000
    seed: int = 1
    minutes_cap: float = 60.0
    workdir: Path | None = None
    agents: int = 2
    series: int = 60
    integrity_every: int = 1
    max_delay: float = 2.5
    outage_rate: float = 0.08
    evict_every: int = 150


@dataclass
class Result:
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks.values())


class Suite:
    def __init__(self, opts: Options, work: Path, say: Any = print) -> None:
        self.opts = opts
        self.work = work
        self.say = say
        self.rng = random.Random(opts.seed)
        self.witness = Witness()
        self.fixtures = Fixtures(opts.series, opts.seed)
        self.collector_port = free_port()
        self.data_dir = work / "collector"
        self.kills: Counter[str] = Counter()
        self.outages: Counter[str] = Counter()
        self.receiver_outages = 0
        self.integrity_runs = 0
        self.integrity_problems: list[str] = []
        self.exits: list[str] = []
        self.orphans: list[psutil.Process] = []
        self.relays: list[UplinkRelay] = []
        self.agents: list[Child] = []
        self.outage_until: float | None = None
        self.outage_started = 0.0
        self.evict_waits: list[float] = []
        self.evicting: dict[str, int] | None = None
        self.receiver_until: float | None = None
        self.next_kill: dict[str, tuple[Child, str, float]] = {}

    # -- set-up

    def setup(self) -> None:
        config = self.work / "collector.toml"
        config.write_text(
            'log_level = "info"\n[ledger]\nstate_save_interval = "1s"\n'
            f'[[remote_write]]\nname = "{TARGET}"\nurl = "{self.fixtures.write_url}"\ntimeout = "5s"\n')
        self.collector = Child("collector", [
            sys.executable, "-m", "collector", "serve", "--data-dir", str(self.data_dir),
            "--listen", f"127.0.0.1:{self.collector_port}", "--config", str(config)], self.work / "collector.log")
        self.data_dir.mkdir(parents=True)
        for i in range(self.opts.agents):
            node = f"node-{i + 1}"
            relay = UplinkRelay(self.fixtures.loop, self.collector_port, self.witness)
            cfg = self.work / f"{node}.toml"
            cfg.write_text(
                f'site = "{SITE}"\nnode = "{node}"\nstate_dir = "{self.work / node}"\n'
                f'[uplink]\nurl = "http://127.0.0.1:{relay.port}"\ntimeout = "3s"\nbackoff_initial = "100ms"\n'
                'backoff_max = "1s"\nprobe_interval = "100ms"\nstop_grace = "3s"\n'
                f'[spool]\nmax_bytes = "64KiB"\n[summary]\nwindow = "{WINDOW}"\n'
                '[sources.system]\nenabled = false\n[sources.gpu]\nenabled = false\n'
                '[sources.smart]\nenabled = false\n[sources.network]\nenabled = false\n'
                f'[[sources.scrape]]\nname = "crash"\nurl = "{self.fixtures.page_url}"\n'
                f'interval = "{SCRAPE_INTERVAL}"\n')
            enroll_agent(self.work, self.data_dir, cfg, SITE, node)
            self.relays.append(relay)
            self.agents.append(Child(node, [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                     self.work / f"{node}.log"))

    def spool(self, agent: Child) -> Path:
        return self.work / agent.name / "spool.db"

    def ledger(self) -> Path:
        return self.data_dir / "ledger.db"

    # -- one kill

    def check_files(self, victims: list[Child]) -> None:
        for child in victims:
            paths = sorted(self.data_dir.glob("*.db")) if child is self.collector else [self.spool(child)]
            for path in paths:
                self.integrity_runs += 1
                verdict = integrity(path)
                if verdict != "ok":
                    self.integrity_problems.append(f"{path.name} after kill {sum(self.kills.values())}: {verdict}")

    def watch(self) -> None:
        """Between kills: processes that exited by themselves, outage ends."""
        for child in (self.collector, *self.agents):
            rc = child.exited()
            if rc is not None:
                self.exits.append(f"{child.name} exited {rc} by itself:\n{child.tail()}")
                child.proc = None
                if len(self.exits) <= MAX_EXITS:
                    child.start()
        now = time.monotonic()
        if self.outage_until is not None:
            evicted = self.evicting is not None and all(
                dropped_batches(self.spool(a)) > self.evicting.get(a.name, 0) for a in self.agents)
            if now >= self.outage_until or evicted:
                for relay in self.relays:
                    relay.set_mode("up")
                if self.evicting is not None:
                    self.evict_waits.append(now - self.outage_started)
                self.outage_until = self.evicting = None
        if self.receiver_until is not None and now >= self.receiver_until:
            self.fixtures.down = False
            self.receiver_until = None

    def sleep_until(self, moment: float) -> None:
        while (left := moment - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
            self.watch()
            self.poll_ready()

    def maybe_cut(self, step: int) -> None:
        evict_now = step > 0 and step % self.opts.evict_every == self.opts.evict_every // 3
        if self.outage_until is None or (evict_now and self.evicting is None):
            if evict_now:
                # Long enough for every spool's quota to evict (bounded): drop receipts.
                self.evicting = {a.name: dropped_batches(self.spool(a)) for a in self.agents}
                self.outage_until = time.monotonic() + 45.0
                self.outages["evicting"] += 1
                self.cut("reset")
            elif self.rng.random() < self.opts.outage_rate:
                self.outage_until = time.monotonic() + self.rng.uniform(0.5, 6.0)
                mode = self.rng.choice(("reset", "blackhole"))
                self.outages[mode] += 1
                self.cut(mode)
        if self.receiver_until is None and self.rng.random() < self.opts.outage_rate / 2:
            self.fixtures.down = True
            self.receiver_until = time.monotonic() + self.rng.uniform(0.5, 5.0)
            self.receiver_outages += 1

    def cut(self, mode: str) -> None:
        for relay in self.relays:
            relay.set_mode(mode)
        self.outage_started = time.monotonic()

    def poll_ready(self) -> None:
        """Notes when the restarted collector first answers /healthz (an agent counts as ready
        AGENT_READY_S after its start, once its imports are done)."""
        c = self.collector
        if c.proc is not None and c.ready_at is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.collector_port}/healthz", timeout=0.5):
                    c.ready_at = time.monotonic()
            except OSError:
                pass

    def wait_ready(self, child: Child, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while child is self.collector and child.ready_at is None and time.monotonic() < deadline:
            self.sleep_until(time.monotonic() + 0.05)

    def plan(self, timeline: str) -> None:
        """Draw the timeline's next kill: its victim (the collector, or one agent) and when,
        while it starts (imports, opening and recovering its database, the first batch) or a
        short random time after it is ready."""
        victim = self.collector if timeline == "collector" else self.rng.choice(self.agents)
        if self.rng.random() < EARLY_KILLS:
            self.next_kill[timeline] = (victim, "start", self.rng.uniform(0.05, 1.2))
        else:
            self.next_kill[timeline] = (victim, "ready", self.rng.uniform(0.05, self.opts.max_delay))

    def moment(self, timeline: str) -> float:
        victim, anchor, delay = self.next_kill[timeline]
        if anchor == "start":
            return victim.started + delay
        if victim is self.collector:
            # Not ready yet: no moment, unless it never gets there (then it is killed anyway).
            return victim.ready_at + delay if victim.ready_at is not None else victim.started + READY_TIMEOUT_S
        return victim.started + AGENT_READY_S + delay

    def kill_step(self, step: int) -> None:
        """The next kill on either timeline (the collector's, the agents'), each drawn after
        its previous victim's restart; sometimes a process of the other timeline with it."""
        self.maybe_cut(step)
        while True:
            timeline = min(self.next_kill, key=self.moment)
            if (at := self.moment(timeline)) <= time.monotonic():
                break
            self.sleep_until(min(at, time.monotonic() + 0.1))
        victims = [self.next_kill[timeline][0]]
        timelines = [timeline]
        if self.rng.random() < BOTH_AT_ONCE:
            other = "agents" if timeline == "collector" else "collector"
            victims.append(self.next_kill[other][0])
            timelines.append(other)
            self.kills["both at once"] += 1
        for v in victims:
            if v.proc is None:
                continue
            if v is self.collector and self.rng.random() < 0.5:
                # serve alone: its forwarder sees stdin close and must finish by itself.
                self.orphans += v.descendants()
                v.kill(group=False)
                self.kills["collector (serve alone)"] += 1
            elif v is self.collector:
                v.kill()
                self.kills["collector (with its forwarder)"] += 1
            else:
                v.kill()
                self.kills["agent"] += 1
        if self.opts.integrity_every and (step + 1) % self.opts.integrity_every == 0:
            self.check_files(victims)
        for v in victims:
            v.start()
        for t in timelines:
            self.plan(t)

    # -- the end

    def settle(self, agent: Child, deadline: float) -> None:
        """Until the agent is past its start-up (a SIGTERM before then ends it as the default
        action would) and has no backlog: at most the newest two batches unsent, which its
        stop delivers."""
        while time.monotonic() < deadline:
            self.watch()
            if time.monotonic() - agent.started > SETTLE_S and self.spool(agent).exists():
                try:
                    spool = spool_figures(self.spool(agent))
                except sqlite3.Error:
                    spool = None
                if spool is not None and all(seq >= spool["next_seq"] - 2 for seq in spool["unsent"]):
                    return
            time.sleep(0.3)

    def drain(self) -> dict[str, Any]:
        """Uplinks and receiver back, spools emptied, agents stopped, the forwarder caught up."""
        for relay in self.relays:
            relay.set_mode("up")
        self.fixtures.down = False
        self.outage_until = self.receiver_until = self.evicting = None
        drained: dict[str, Any] = {}
        for agent in self.agents:
            for _attempt in range(3):
                self.settle(agent, time.monotonic() + 60)
                rc = agent.stop()
                if rc not in (0, None):
                    self.exits.append(f"{agent.name} stopped with status {rc}:\n{agent.tail()}")
                if not spool_figures(self.spool(agent))["unsent"]:
                    break
                agent.start()  # the stop left a batch behind (a backlog the stop does not wait for)
        # The ledger no longer grows: wait for the forwarder to bring the receiver all of it.
        missing = [key for key, _where, _what in self.ledger_samples()]
        deadline = time.monotonic() + 180
        while missing and time.monotonic() < deadline:
            self.watch()
            time.sleep(0.5)
            missing = [key for key in missing if key not in self.fixtures.received]
        try:
            page = get(f"http://127.0.0.1:{self.collector_port}/metrics")
            pending = metric_value(page, "waystation_remote_write_pending_batches", target=TARGET)
        except OSError:
            pending = -1.0
        drained["forwarder_pending"] = pending
        self.wait_ready(self.collector)
        rc = self.collector.stop()
        if rc not in (0, None):
            self.exits.append(f"collector stopped with status {rc}:\n{self.collector.tail()}")
        late = [p for p in self.orphans if _alive(p)]
        drained["orphans_left"] = len(late)
        for p in late:
            p.kill()
        for relay in self.relays:
            relay.close()
        return drained

    def verify(self, drained: dict[str, Any]) -> Result:
        result = Result()
        checks, figures = result.checks, result.figures
        ledger = self.ledger()
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
        try:
            held = {(r[0], r[1]): bytes(r[2]) for r in db.execute(
                "SELECT node, seq, frame FROM batches WHERE site = ?", (SITE,))}
            drops = db.execute("SELECT node, receipt_seq, first_seq, last_seq, samples FROM drops WHERE site = ?",
                               (SITE,)).fetchall()
            receipts = dict(db.execute("SELECT node, COUNT(*) FROM batches WHERE site = ? AND kind = ? GROUP BY node",
                                       (SITE, int(wire.Kind.DROP_RECEIPT))))
            held_samples = {(r[0], r[1]): int(r[2]) for r in db.execute(
                "SELECT node, seq, sample_count FROM batches WHERE site = ? AND kind = ?", (SITE, int(wire.Kind.DATA)))}
            flagged = db.execute("SELECT node, conflicts, chain_breaks FROM nodes WHERE site = ? AND "
                                 "(conflicts > 0 OR chain_breaks > 0)", (SITE,)).fetchall()
        finally:
            db.close()

        # 1. Every acknowledged batch, byte for byte.
        with self.witness.lock:
            acked = list(self.witness.acked.values())
            answers = dict(self.witness.answers)
            conflicting = list(self.witness.conflicting_acks)
            unreadable = self.witness.unreadable
        lost = [a for a in acked if (frame := held.get((a.node, a.seq))) is None or wire.batch_hash(frame) != a.hash]
        acked_samples = sum(a.samples for a in acked)
        figures.update(batches_acked=len(acked), acked_samples=acked_samples, answers=answers)
        checks["no acknowledged sample lost"] = (
            not lost and unreadable == 0,
            f"{len(acked):,} acked batches ({acked_samples:,} samples) all in the ledger byte for byte"
            if not lost and not unreadable else
            f"{len(lost)} acked batches missing or different: "
            + ", ".join(f"{a.node}#{a.seq}" for a in lost[:10]) + f"; {unreadable} unreadable requests")
        bad_answers = {k: v for k, v in answers.items() if k.startswith("409") or "chain" in k}
        checks["no seq acked twice with different frames, no 409"] = (
            not conflicting and not bad_answers and not flagged,
            "; ".join(conflicting[:5]) or (f"answers {bad_answers}, ledger nodes {flagged}" if bad_answers or flagged
                                           else "none"))

        # 2. Integrity at the end, and what the kills found.
        for path in [*sorted(self.data_dir.glob("*.db")), *(self.spool(a) for a in self.agents)]:
            self.integrity_runs += 1
            verdict = integrity(path)
            if verdict != "ok":
                self.integrity_problems.append(f"{path} at the end: {verdict}")
        figures["integrity_checks"] = self.integrity_runs
        checks["PRAGMA integrity_check clean"] = (
            not self.integrity_problems,
            "; ".join(self.integrity_problems[:5]) or f"{self.integrity_runs} checks ok")

        # 3. Every gap explained: the ledger, its drop receipts and what the spool still holds.
        problems = []
        seqs_dropped = 0
        unsent_total = 0
        named_but_held = 0
        in_spools: dict[str, set[int]] = {}
        for agent in self.agents:
            node = agent.name
            spool = spool_figures(self.spool(agent))
            signed = spool["next_seq"] - 1
            have = {seq for (n, seq) in held if n == node}
            by_receipt: dict[int, tuple[set[int], int]] = {}
            for n, receipt_seq, first, last, samples in drops:
                if n == node:
                    seqs, total = by_receipt.get(receipt_seq, (set(), 0))
                    by_receipt[receipt_seq] = (seqs | set(range(first, last + 1)), total + samples)
            dropped = {seq for seqs, _ in by_receipt.values() for seq in seqs}
            unsent = in_spools[node] = set(spool["unsent"])
            seqs_dropped += len(dropped - have)
            unsent_total += len(unsent)
            # A batch whose ack the agent never read (killed, uplink cut) stays in its spool and
            # may be evicted later: the receipt names it, yet the collector holds it. Only what
            # the ledger does not hold is lost (as the collector counts it, collector/ledger.py).
            named_but_held += len(have & dropped)
            missing = set(range(1, signed + 1)) - have - dropped - unsent
            if missing:
                problems.append(f"{node}: seqs no one accounts for {sorted(missing)[:10]}")
            if spool["rejected"]:
                problems.append(f"{node}: batches the collector refused {spool['rejected'][:10]}")
            delivered = sum(n for (nd, _), n in held_samples.items() if nd == node)
            lost = sum(max(0, total - sum(held_samples.get((node, seq), 0) for seq in seqs))
                       for seqs, total in by_receipt.values())
            accounted = delivered + lost + sum(spool["unsent"].values())
            if accounted != spool["produced_samples"]:
                problems.append(f"{node}: {spool['produced_samples']} samples signed, {accounted} accounted for "
                                f"(delivered {delivered}, lost by drop receipts {lost}, "
                                f"in the spool {sum(spool['unsent'].values())})")
        audit = subprocess.run([sys.executable, "-m", "collector", "audit", "--data-dir", str(self.data_dir),
                                "--json", "--progress-every", "0"], env=ENV, capture_output=True, text=True,
                               timeout=600)
        try:
            report = json.loads(audit.stdout)
            summary = report["summary"]
        except (ValueError, KeyError):
            report, summary = {"findings": [audit.stdout[-500:] + audit.stderr[-500:]]}, {}
        findings = [f for f in report["findings"] if not (
            isinstance(f, dict) and f.get("problem") == "missing" and set(
                range(f["seq"], (f.get("through_seq") or f["seq"]) + 1)) <= in_spools.get(f.get("node"), set()))]
        if findings or audit.returncode not in (0, 1) or not summary:
            problems.append(f"audit (exit {audit.returncode}): {findings[:5]}")
        figures.update(receipts=sum(receipts.values()), seqs_dropped=seqs_dropped, left_in_spools=unsent_total,
                       named_but_held=named_but_held, audit=summary)
        checks["every gap explained by a drop receipt"] = (
            not problems,
            f"audit clean over {summary.get('batches', 0):,} batches; {sum(receipts.values())} drop receipts name "
            f"{seqs_dropped} lost seqs (and {named_but_held} the ledger holds: acks lost before an eviction); "
            f"{unsent_total} batches still in spools; samples signed = delivered + lost + unsent on every node"
            if not problems else "; ".join(problems))

        # 4. The receiver holds every sample the ledger holds.
        checked = 0
        absent: list[str] = []
        absent_batches: Counter[str] = Counter()
        for key, where, what in self.ledger_samples():
            checked += 1
            if key not in self.fixtures.received:
                absent_batches[where] += 1
                if len(absent) < 3:
                    absent.append(f"{where} {what()}")
        figures.update(samples_checked=checked, receiver_samples=len(self.fixtures.received),
                       rw_requests=self.fixtures.rw_requests, forwarder_pending=drained["forwarder_pending"])
        checks["remote-write receiver holds everything the ledger holds"] = (
            not absent and checked > 0,
            f"{checked:,} ledger samples all at the receiver ({len(self.fixtures.received):,} distinct received)"
            if not absent else f"{sum(absent_batches.values())} samples of {len(absent_batches)} batches missing "
                               f"at the receiver ({dict(absent_batches.most_common(10))}), e.g. {absent}; "
                               f"forwarder pending {drained['forwarder_pending']}")

        # 5. Nothing died by itself; no forwarder outlived its serve.
        checks["no process exited by itself, no forwarder left behind"] = (
            not self.exits and not drained["orphans_left"],
            "none" if not self.exits and not drained["orphans_left"] else
            f"{drained['orphans_left']} forwarders still running at the end; " + "\n".join(self.exits[:3]))
        return result

    def ledger_samples(self) -> Iterator[tuple[int, str, Callable[[], str]]]:
        """(sample key, "node#seq", a description) of every sample of every data batch in the
        ledger, as the forwarder sends it: labels with __name__, site and node from the header."""
        for agent in self.agents:
            for raw, series in ledger_batches(self.ledger(), agent.name):
                h = wire.parse_frame(raw).header
                where = f"{h.node}#{h.seq}"
                for s in series:
                    name = s.name  # type: ignore[attr-defined]
                    if name.startswith(RESERVED_PREFIXES):
                        continue
                    labels = (*((k, v) for k, v in s.labels if k not in ("site", "node")),  # type: ignore[attr-defined]
                              ("__name__", name), ("site", h.site), ("node", h.node))
                    for ts, v in zip(s.timestamps_ms, s.values, strict=True):  # type: ignore[attr-defined]
                        yield sample_key(labels, ts, v), where, partial(_describe_sample, labels, ts, v)

    def run(self) -> Result:
        started = time.monotonic()
        cap = started + self.opts.minutes_cap * 60
        self.setup()
        for child in (self.collector, *self.agents):
            child.start()
        for timeline in ("collector", "agents"):
            self.plan(timeline)
        done = 0
        report_every = max(1, self.opts.kills // 20)
        kill_started = time.monotonic()
        for step in range(self.opts.kills):
            if time.monotonic() >= cap:
                self.say(f"minutes cap reached after {done} kills")
                break
            self.kill_step(step)
            done += 1
            if done % report_every == 0:
                el = time.monotonic() - kill_started
                self.say(f"  {done} kills, {el:.0f} s ({el / done:.2f} s per kill), "
                         f"{len(self.witness.acked):,} batches acked")
            if len(self.exits) > MAX_EXITS:
                self.say("stopping early: processes keep exiting by themselves")
                break
        # An outage meant to make the spools evict runs its course before the drain.
        while self.evicting is not None:
            self.sleep_until(time.monotonic() + 0.2)
        kill_s = time.monotonic() - kill_started
        drained = self.drain()
        result = self.verify(drained)
        total = sum(self.kills[k] for k in ("agent", "collector (serve alone)", "collector (with its forwarder)"))
        result.figures.update(
            kill_steps=done, kills=dict(self.kills), kills_total=total, outages=dict(self.outages),
            receiver_outages=self.receiver_outages, kill_phase_s=kill_s, evict_waits=self.evict_waits,
            s_per_kill=kill_s / max(done, 1), total_s=time.monotonic() - started)
        return result

    def close(self) -> None:
        for child in (self.collector, *self.agents):
            if child.proc is not None:
                child.kill()
        self.fixtures.close()


def _describe_sample(labels: tuple[tuple[str, str], ...], ts: int, value: float) -> str:
    return f"{dict(labels)} @{ts} = {value}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_suite(opts: Options, say: Any = print) -> Result:
    """Run the suite in opts.workdir (kept) or a temporary directory (kept only on failure)."""
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="ws-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(opts, work, say)
    result = Result(workdir=work)
    try:
        result = suite.run()
        result.workdir = work
    finally:
        suite.close()
        if opts.workdir is None and result.passed:
            shutil.rmtree(work, ignore_errors=True)
            result.workdir = None
    return result


def describe(result: Result, opts: Options) -> str:
    f = result.figures
    lines = [
        f"kill steps {f.get('kill_steps', 0)} (seed {opts.seed}); SIGKILLs: "
        + ", ".join(f"{k} {v}" for k, v in sorted(f.get("kills", {}).items())),
        "uplink outages: " + (", ".join(f"{k} {v}" for k, v in sorted(f.get("outages", {}).items())) or "none")
        + f"; receiver outages {f.get('receiver_outages', 0)}; evicting outages lasted "
        + (", ".join(f"{w:.0f}" for w in f.get("evict_waits", [])) or "-") + " s",
        f"batches acked {f.get('batches_acked', 0):,} ({f.get('acked_samples', 0):,} samples); "
        f"samples checked at the receiver {f.get('samples_checked', 0):,}; drop receipts {f.get('receipts', 0)} "
        f"({f.get('seqs_dropped', 0)} seqs lost, {f.get('named_but_held', 0)} named but held); "
        f"integrity checks {f.get('integrity_checks', 0)}",
        f"collector answers: {f.get('answers', {})}; remote-write requests taken {f.get('rw_requests', 0):,}",
        f"time {f.get('total_s', 0):.0f} s (kills {f.get('kill_phase_s', 0):.0f} s, {f.get('s_per_kill', 0):.2f} s "
        f"per kill step; 1,000 kill steps projected at {f.get('s_per_kill', 0) * 1000 / 60:.0f} min)",
    ]
    for name, (ok, detail) in result.checks.items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=1000, help="kill steps (one step may kill two processes)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes-cap", type=float, default=60.0, help="hard stop for the kill phase")
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder, kept on failure)")
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--series", type=int, default=60, help="series of each kind on the scraped page")
    ap.add_argument("--integrity-every", type=int, default=1, metavar="N",
                    help="integrity_check the killed processes' files after every Nth kill step (0: only at the end)")
    ap.add_argument("--max-delay", type=float, default=2.5,
                    help="most kills land up to this many s after the process is ready")
    ap.add_argument("--evict-every", type=int, default=150, metavar="N",
                    help="an outage that lasts until every spool has evicted (drop receipts) every N kill steps")
    args = ap.parse_args()
    opts = Options(kills=args.kills, seed=args.seed, minutes_cap=args.minutes_cap, workdir=args.workdir,
                   agents=args.agents, series=args.series, integrity_every=args.integrity_every,
                   max_delay=args.max_delay, evict_every=args.evict_every)
    result = run_suite(opts)
    print()
    print(describe(result, opts))
    if result.workdir is not None:
        print(f"artifacts: {result.workdir}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
