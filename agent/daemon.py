"""`waystation-agent run`: wires sources -> runner -> summarizer -> spool -> uplink together.

The main thread signs a batch every flush interval. If the spool cannot be written
(full disk, unwritable state_dir) the agent keeps sampling, holds what it can in
memory (bounded), reports the problem in its log, its metrics and `status`, and
retries every flush; it never exits for that.
"""

from __future__ import annotations

import logging
import os
import resource
import sqlite3
import struct
import threading
import time
from pathlib import Path

from nacl.signing import SigningKey

import wire
from agent import keys
from agent.config import AgentConfig
from agent.runner import Runner, Scheduled
from agent.sources.base import Source, SourceEnv
from agent.spool import Spool
from agent.summarize import Summarizer
from agent.uplink import Uplink, UplinkStats
from wire.malloc import trim_malloc, tune_malloc
from wire.sdnotify import Liveness, Notifier, Watchdog

log = logging.getLogger("waystation.agent")

# Series held in memory while the spool cannot be written (a one-point series costs about
# 250 bytes, so this is ~25 MB at most); beyond it the oldest go, counted.
MAX_HELD_SERIES = 100_000


def build_sources(config: AgentConfig, env: SourceEnv) -> list[Scheduled]:
    """Instantiate every enabled source; a source's library is imported only when enabled."""
    scheduled: list[Scheduled] = []
    if config.sources.system.enabled:
        from agent.sources.system import System

        scheduled.append(Scheduled(System(config.sources.system, env), config.sources.system.interval))
    if config.sources.gpu.enabled:
        from agent.sources.gpu import Gpu

        scheduled.append(Scheduled(Gpu(config.sources.gpu, env), config.sources.gpu.interval))
    if config.sources.smart.enabled:
        from agent.sources.smart import Smart

        scheduled.append(Scheduled(Smart(config.sources.smart, env), config.sources.smart.interval))
    if config.sources.network.enabled:
        from agent.sources.network import Network

        scheduled.append(Scheduled(Network(config, env), config.sources.network.interval))
    if config.sources.scrape:
        from agent.sources.scrape import Scrape

        for sc in config.sources.scrape:
            scheduled.append(Scheduled(Scrape(sc, env), sc.interval))
    return scheduled


class Agent:
    def __init__(self, config: AgentConfig, key: SigningKey, env: SourceEnv | None = None) -> None:
        self.config = config
        self.key = key
        # Parsed once (config validated it); drop receipts and key rotations stay unsealed:
        # they carry no metric names or values, and the collector can account for losses
        # even while it lacks a sealing key.
        self.collector_pin = config.uplink.collector_pin
        # Wire v2: the node's series table, kept for the life of the agent so later batches
        # name it by hash (the spool stores each table with the first batch naming it).
        # Only the main loop (flush) uses it. None: v1 batches, each carrying its names.
        self.tables: wire.TableBuilder | None = wire.TableBuilder() if config.uplink.wire_version == 2 else None
        self.summarizer = Summarizer(float(config.summary.window))
        sources: list[Scheduled] = build_sources(config, env or SourceEnv())
        self.runner = Runner(sources, self.summarizer.add)
        self.uplink_stats = UplinkStats()
        self.liveness = Liveness()
        self.uplink = Uplink(config.uplink, config.spool_path, self.uplink_stats,
                             identity=(key, config.site, config.node), liveness=self.liveness)
        self.notifier = Notifier()
        self.spool_text = "spool not open yet"  # refreshed by the main loop (the spool is its own)
        self.spool: Spool | None = None
        self.held: list[wire.Series] = []
        self.held_dropped_samples = 0
        self.unencodable_samples = 0
        self.write_errors = 0
        self.last_write_error: str | None = None
        self.stop_event = threading.Event()

    def _open_spool(self) -> Spool | None:
        if self.spool is None:
            try:
                self.config.state_path.mkdir(parents=True, exist_ok=True)
                self.spool = Spool(self.config.spool_path)
            except (sqlite3.Error, OSError) as exc:
                self._write_failed(f"cannot open spool {self.config.spool_path}: {exc}")
                self.spool = None
        return self.spool

    def _write_failed(self, message: str) -> None:
        self.write_errors += 1
        if message != self.last_write_error:
            log.error("%s (sampling continues; holding data in memory)", message)
        self.last_write_error = message

    def store(self, series: list[wire.Series]) -> None:
        """Sign everything held plus `series` into one batch; on failure keep holding it."""
        self.held.extend(series)
        if not self.held:
            return
        spool = self._open_spool()
        if spool is None:
            self._bound_held()
            return
        try:
            spool.append_data(
                self.key, self.config.site, self.config.node, self.held, self.config.spool.max_bytes,
                seal_to=self.collector_pin, tables=self.tables,
            )
        except (sqlite3.Error, OSError) as exc:
            self._write_failed(f"cannot write spool {self.config.spool_path}: {exc}")
            # Reopen next time: a connection that failed mid-commit may be unusable.
            spool.close()
            self.spool = None
            self._bound_held()
            return
        except (ValueError, struct.error, OverflowError) as exc:
            # A series the wire format cannot carry (e.g. a label set too large): drop only it.
            self.held = self._encodable(self.held, exc)
            if self.held:
                self.store([])
            return
        if self.last_write_error is not None:
            log.info("spool writable again; %d held series signed", len(self.held))
            self.last_write_error = None
        self.held = []
        self.uplink.notify()

    def _encodable(self, series: list[wire.Series], exc: Exception) -> list[wire.Series]:
        kept = []
        for s in series:
            try:
                wire.encode_series([s])
                # A name or label the collector refuses: in a v2 series table it would get
                # every later batch naming the table refused, so it never enters one.
                problem = wire.series_problem(s)
                if problem:
                    raise ValueError(problem)
            except (ValueError, struct.error, OverflowError) as why:
                self.unencodable_samples += len(s.values)
                log.error("dropping series %s%s: it cannot be encoded (%s)", s.name, dict(s.labels), why)
            else:
                kept.append(s)
        if len(kept) == len(series):  # nothing singled out: the batch as a whole is the problem
            log.error("batch could not be signed (%s); dropping %d series", exc, len(series))
            self.unencodable_samples += sum(len(s.values) for s in series)
            return []
        return kept

    def _bound_held(self) -> None:
        excess = len(self.held) - MAX_HELD_SERIES
        if excess > 0:
            self.held_dropped_samples += sum(len(s.values) for s in self.held[:excess])
            del self.held[:excess]

    def self_metrics(self, now_ms: int) -> list[wire.Series]:
        """The agent's own health, sent in every batch (the collector reads the backlog from it)."""
        out: list[tuple[str, tuple[tuple[str, str], ...], wire.MetricType, float]] = []
        g, c = wire.MetricType.GAUGE, wire.MetricType.COUNTER
        # From 0 for every running source and stage (Runner.error_counts): a counter born at
        # its first error would never be counted by increase().
        for (source, stage), n in sorted(self.runner.error_counts().items()):
            out.append(("waystation_source_errors_total", (("source", source), ("stage", stage)), c, n))
        for item in self.runner.scheduled:
            up = 0.0 if item.source.name in self.runner.disabled else 1.0
            out.append(("waystation_agent_source_enabled", (("source", item.source.name),), g, up))
        if self.spool is not None:
            try:
                st = self.spool.stats()
            except sqlite3.Error:
                st = None
            if st is not None:
                out += [
                    ("waystation_agent_spool_pending_batches", (), g, st.pending_batches),
                    ("waystation_agent_spool_pending_bytes", (), g, st.pending_bytes),
                    ("waystation_agent_spool_rejected_batches", (), g, st.rejected_batches),
                    ("waystation_agent_spool_dropped_batches_total", (), c,
                     st.counters["dropped_batches"]),
                    ("waystation_agent_spool_dropped_samples_total", (), c,
                     st.counters["dropped_samples"]),
                    ("waystation_agent_batches_signed_total", (), c, st.counters["produced_batches"]),
                ]
                # Sent in every batch, so the collector never keeps a backlog that is gone: with
                # nothing waiting, the oldest data the collector lacks once this batch arrives
                # is what is sampled after it (its time, now_ms).
                oldest = now_ms if st.oldest_unsent_ms is None else min(st.oldest_unsent_ms, now_ms)
                out.append(("waystation_agent_spool_oldest_unsent_timestamp_seconds", (), g, oldest / 1000))
        us = self.uplink_stats
        with us.lock:
            out += [
                ("waystation_agent_uplink_sent_bytes_total", (), c, us.sent_bytes),
                ("waystation_agent_uplink_sent_batches_total", (), c, us.sent_batches),
                ("waystation_agent_uplink_acked_batches_total", (), c, us.acked_batches),
                ("waystation_agent_uplink_rejected_batches_total", (), c, us.rejected_batches),
                ("waystation_agent_uplink_failures_total", (), c, us.failures),
                ("waystation_agent_uplink_probes_total", (), c, us.probes),
                ("waystation_agent_uplink_backoff_seconds", (), g, us.backoff_s),
            ]
            if us.last_ack_wall:
                out.append(("waystation_agent_uplink_last_ack_timestamp_seconds", (), g,
                            round(us.last_ack_wall, 3)))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out += [
            ("waystation_agent_spool_write_errors_total", (), c, self.write_errors),
            ("waystation_agent_held_dropped_samples_total", (), c, self.held_dropped_samples),
            ("waystation_agent_late_samples_total", (), c, self.summarizer.dropped_samples),
            ("waystation_agent_unencodable_samples_total", (), c, self.unencodable_samples),
            ("waystation_agent_cpu_seconds_total", (), c, round(usage.ru_utime + usage.ru_stime, 3)),
            ("waystation_agent_resident_memory_bytes", (), g, _rss_bytes()),
        ]
        return [wire.Series(n, labels, t, (now_ms,), (float(v),)) for n, labels, t, v in out]

    def flush(self, now_ms: int, final: bool = False) -> None:
        # Signing and writing a batch takes milliseconds; a flush far past a window (a
        # wedged lock, a disk that stopped answering) is stuck, and the watchdog says so.
        with self.liveness.step("flush", max(120.0, 2 * self.config.summary.flush_every)):
            series = self.summarizer.flush_all() if final else self.summarizer.flush(now_ms)
            self.store(series + self.self_metrics(now_ms))
            self._rotate_if_asked()
            trim_malloc()
            self._refresh_spool_text()

    def _refresh_spool_text(self) -> None:
        if self.last_write_error is not None:
            self.spool_text = f"cannot write spool: {self.last_write_error}"
            return
        try:
            st = self.spool.stats() if self.spool is not None else None
        except sqlite3.Error as exc:
            self.spool_text = f"spool unreadable: {exc}"
            return
        if st is not None:
            self.spool_text = f"{st.pending_batches} batches waiting ({st.pending_bytes} bytes)"

    def status_line(self) -> str:
        """The one line `systemctl status` shows (STATUS=); called from the watchdog thread."""
        us = self.uplink_stats
        with us.lock:
            last_ack = us.last_ack_wall
        ack = f"last ack {max(0.0, time.time() - last_ack):.0f}s ago" if last_ack else "no ack yet"
        return f"{self.spool_text}; {ack}; {self.config.site}/{self.config.node} to {self.config.uplink.url}"

    def _rotate_if_asked(self) -> None:
        """Switch to the key `waystation-agent rotate-key` left, announcing it in the chain first.

        Order matters for a crash at any point: the spool records the announcement in the
        same transaction as the rotation batch, and the key file is replaced only after it."""
        path = self.config.next_key_path
        if not path.exists():
            return
        spool = self._open_spool()
        if spool is None:
            return
        try:
            new = keys.load(path)
            seq = spool.append_key_rotation(self.key, new, self.config.site, self.config.node)
            os.replace(path, self.config.key_path)
        except (keys.KeyError_, sqlite3.Error, OSError) as exc:
            log.error("key rotation not done yet: %s", exc)
            return
        self.key = new
        self.uplink.identity = (new, self.config.site, self.config.node)
        log.info("rotated to key %s%s", keys.describe(new), f" (announced in batch {seq})" if seq else "")
        self.uplink.notify()

    def run(self) -> None:
        log.info(
            "agent %s/%s: state in %s, sending to %s",
            self.config.site, self.config.node, self.config.state_dir, self.config.uplink.url,
        )
        tune_malloc()
        self._open_spool()
        self._rotate_if_asked()  # finish a rotation a stop or crash interrupted
        self._refresh_spool_text()
        self.runner.start()
        self.uplink.start()
        # Ready: the spool is open (or its problem is held and reported: sampling goes on
        # either way) and delivery has started. The watchdog pings from here on.
        self.notifier.ready(self.status_line())
        watchdog_stop = threading.Event()
        Watchdog(self.notifier, self.liveness, self.status_line).run_thread(watchdog_stop)
        every = self.config.summary.flush_every
        # A short grace after each boundary lets a source tick that fired on it land first.
        grace = min(1.0, every / 10)
        next_flush = (time.time() // every + 1) * every
        try:
            while not self.stop_event.wait(max(0.0, next_flush + grace - time.time())):
                self.flush(int(next_flush * 1000))
                now = time.time()
                next_flush += every
                if next_flush <= now or next_flush - now > every + grace:
                    # Missed boundaries, or the wall clock stepped back: realign to the clock.
                    next_flush = (now // every + 1) * every
        finally:
            self.notifier.stopping("stopping: signing the last window, delivering it within stop_grace")
            watchdog_stop.set()
            self.runner.stop()
            self.flush(int(time.time() * 1000), final=True)
            # A stop (systemd, an upgrade) would otherwise leave the batch just signed unsent
            # until the next start: the live lane gets stop_grace to deliver it. A collector
            # that does not answer in time costs nothing; the batch stays in the spool.
            self.uplink.stop(grace=self.config.uplink.stop_grace_s)
            if self.spool is not None:
                self.spool.close()
            self.notifier.close()


def _rss_bytes() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm", "rb") as fh:
            return float(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


def state_dir_problem(path: Path) -> str | None:
    """Why the agent could not write its state dir right now, if it could not."""
    if not path.exists():
        return f"{path} does not exist"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by uid {os.getuid()}"
    st = os.statvfs(path)
    if st.f_bavail * st.f_frsize < 1024 * 1024:
        return f"{path} is on a full filesystem ({st.f_bavail * st.f_frsize} bytes free)"
    return None


__all__ = ["Agent", "Source", "build_sources", "state_dir_problem"]
