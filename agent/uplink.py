"""Delivery from the spool to the collector: a live lane and a backfill lane.

The live lane sends each new batch as soon as it is signed, newest first, so
dashboards are current the moment the uplink returns. The backfill lane walks
the backlog oldest-first under a byte-rate cap so catching up never saturates a
thin uplink. Each lane is one thread with its own spool connection and its own
HTTP connection; they never send the same batch because a send is a spool claim.

Failures: connection errors and 5xx back off exponentially with full jitter;
429/503 wait for Retry-After; 401/403 (key not enrolled or revoked) keep the
data and retry slowly; 400/409/413 mean resending cannot help, so the batch is
set aside as rejected (kept for audit) and the error is recorded for `status`,
except 400 `unsupported_version`, which an upgrade of the collector mends.

Series tables (wire v2): a v2 data batch names its series table by hash. The uplink keeps
the ids of the tables the collector is known to hold (those of batches it acked since this
start) and sends a batch with its table (`wire.with_table`) while its id is not among them.
A 428 `unknown_table` drops the id and sends the batch again at once with its table (once
per claim; refused so again, it is retried with backoff). A 400 `unsupported_version` (a
collector older than this agent) keeps the batch and backs off, warning once how to fix it;
so does a 400 `malformed` to a body that carried a table when the frame alone then draws
`unsupported_version` (a collector that reads only v1 takes the table for a bad frame).
Sending the table unasked with the first batch after a start saves a round trip with an
upgraded collector; with an old one, the bare retry tells, and until such a collector acks
a v2 batch, batches go without their table (docs/wire.md §10.6).

Freshness after an outage: while the live lane sits out a backoff because a send got
no answer (the connection was refused, reset or timed out), it probes the collector
about every `probe_interval` (jittered by +-20%, so a fleet that lost the collector
together does not probe in step) with a GET /healthz (no body, a bounded timeout, one
at a time: the lane itself probes). A probe ends the wait only on a change it saw: the
collector was down during this outage (a probe failed, or the send could not even
connect) and now answers 200; the newest batch goes at that moment. If the first probe
after a failed send is answered, the collector was reachable all along and the send
failed for another reason (a proxy resetting large uploads, a collector failing on this
batch): the backoff is sat out in full. So is the one after a send a probe let through
fails again. A down collector therefore sees at most one probe per interval plus the
backed-off sends, a reachable one that fails sends only the backoff's, and a Retry-After
is never cut short.

Stop: `stop(grace)` gives the live lane up to `grace` seconds to deliver, newest first,
every batch newer than the last one it settled before the stop (the batch the agent
signed on its way out, and one a window boundary signed just before it). The backfill
lane stops at once and is not waited for (a request it has in flight is left to the
process's exit; its batch is pending again at the next start), unless that request
carries a batch newer than the live lane's last, which the stop then waits for within
the grace. A stop before the first delivery could be prepared (a new spool and the
collector down) does not wait at all. Whatever is not acked stays in the spool.

Randomness: each lane draws its backoff jitter, and the live lane and the preparing
step their probe jitter, from a generator of its own, seeded from the one handed in
(`lane_rngs`), so a test that replays one lane's schedule holds whatever the others do.

Threads: `start()`, `notify()` and `stop()` are called from the agent's main thread;
`notify()` may be called at any time. Each lane, and the one-off resume step, is a
thread of its own; they share only Events, the stats (under its lock) and
`hold_until`. All waiting goes through a Clock, so tests can drive time.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import quote, urlsplit

from nacl.signing import SigningKey

import wire
from agent.config import UplinkConfig
from agent.spool import OWN_CHAIN, UNDECIDED, Claimed, Spool
from wire.sdnotify import Liveness

log = logging.getLogger("waystation.uplink")

USER_AGENT = "waystation-agent/1"
_MAX_RETRY_AFTER_S = 3600.0
# A probe is one small GET; over a slow satellite link a TLS handshake plus the GET takes
# a few round trips, and a probe that may wait longer only delays the next one.
PROBE_TIMEOUT_S = 5.0


class Clock(Protocol):
    """Time as the uplink sees it. Tests hand in one they advance themselves."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until `event` is set or `timeout` seconds pass; returns whether it is set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))


@dataclass
class UplinkStats:
    """Counters the agent reports about its own delivery (read by the self-metrics)."""

    sent_bytes: int = 0
    sent_batches: int = 0
    acked_batches: int = 0
    rejected_batches: int = 0
    failures: int = 0
    backoff_s: float = 0.0
    last_ack_wall: float = 0.0
    probes: int = 0  # reachability probes sent while the collector could not be reached
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class Outcome:
    """What one POST came to."""

    # acked | retry | reject (collector lacks it) | conflict (collector holds another) |
    # unknown_table (the collector lacks the series table the batch names: send it along) |
    # unsupported_version (the collector does not read this frame version: keep the batch)
    kind: str
    delay_s: float = 0.0
    detail: str = ""
    complete_through: int | None = None
    result: str = field(default="", compare=False)  # the collector's result word, if it answered


# How an attempt failed, as far as reachability goes (what a probe can tell about it).
DOWN = "down"  # no connection could be opened (refused, unreachable, DNS, connect/TLS timeout)
LOST = "lost"  # connected, but no answer came back (reset, closed, timed out mid-request)
ANSWERED = "answered"  # an HTTP reply came back: the collector (or something in its place) is up
HELD = ""  # not a failure of reachability (a Retry-After, a spool error): never probed


class _Step(NamedTuple):
    """What a lane does after one delivery attempt."""

    settled: bool  # acked, or set aside for good: the batch is done with
    wait_s: float  # how long to wait before the next attempt
    failure: str = HELD  # DOWN or LOST: a probe may end the wait (see _Outage)
    sent_bytes: int = 0  # request bodies posted for it (series tables included)


class _Outage:
    """What one lane has seen of the collector since its last delivery, so that a probe
    ends a wait only on a down->up change it observed, never merely because /healthz
    answers while sends fail for another reason."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng  # the probe interval's jitter
        self.down_seen = False  # a probe, or a send's connect, failed during this outage
        self.released = False  # a probe ended the last wait: the send after it was let through

    def delivered(self) -> None:
        self.down_seen = self.released = False


class NotTheCollector(Exception):
    """Something answered that is not the collector's own reply (a proxy, a portal)."""


class CouldNotConnect(OSError):
    """No connection to the collector could be opened: refused, unreachable, a DNS failure,
    a connect or TLS handshake timeout. Unlike a reset after connecting, this says the
    collector (or the way to it) is down."""


class _Connection:
    """One keep-alive HTTP(S) connection to the collector."""

    def __init__(self, config: UplinkConfig, timeout: float | None = None) -> None:
        parts = urlsplit(config.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/") + "/v1/batches"
        self.timeout = float(config.timeout) if timeout is None else timeout
        self.context: ssl.SSLContext | None = None
        if self.https:
            self.context = ssl.create_default_context(cafile=config.ca_file or None)
            if config.client_cert:
                self.context.load_cert_chain(config.client_cert, config.client_key or None)
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", self.path, body, timeout)

    def request(
        self, method: str, path: str, body: bytes | None, timeout: float | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request; `timeout` (seconds) overrides the connection's for this request only."""
        limit = self.timeout if timeout is None else timeout
        headers = {"User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/x-waystation-batch"
        for attempt in (0, 1):
            reused = self.conn is not None
            if self.conn is None:
                if self.https:
                    self.conn = http.client.HTTPSConnection(
                        self.host, self.port, timeout=limit, context=self.context
                    )
                else:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=limit)
                try:
                    self.conn.connect()  # apart from the request: its failure means "down"
                except OSError as exc:
                    self.close()
                    raise CouldNotConnect(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
            elif self.conn.sock is not None:
                self.conn.sock.settimeout(limit)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                reply_headers = {k.lower(): v for k, v in resp.getheaders()}
                if reply_headers.get("connection", "").lower() == "close":
                    self.close()
                return resp.status, reply_headers, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed while idle: retry once on a new
                # one. A fresh connection that fails so is the server's answer: no retry,
                # so one attempt is one connection (what a down collector sees is bounded).
                self.close()
                if attempt or not reused:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER_S)
    import email.utils  # rare (collectors send delta-seconds): not worth its import at start

    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when - now), _MAX_RETRY_AFTER_S)


def classify(status: int, headers: dict[str, str], body: bytes, now: float, seq: int) -> Outcome:
    """Map a reply to what the lane does next.

    Only the collector's own JSON can settle a batch: a 200 from a captive portal or a
    400 from a proxy in the way must not delete or set aside telemetry."""
    try:
        reply = json.loads(body) if body else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("result"), str):
        reply = None
    ct = reply.get("complete_through") if reply else None
    ct = ct if isinstance(ct, int) else None
    if reply is None:
        detail = f"HTTP {status} that is not the collector's answer (proxy or portal in the way?)"
    else:
        detail = f"HTTP {status} {reply['result']}: {reply.get('error', '')}".rstrip(": ")
    if status in (429, 503):
        after = retry_after_seconds(headers.get("retry-after"), now)
        return Outcome("retry", -1.0 if after is None else after, detail)
    if reply is None:
        return Outcome("retry", -1.0, detail)
    word = reply["result"]
    if status == 428 and word == "unknown_table":
        return Outcome("unknown_table", detail=detail, complete_through=ct, result=word)
    if status == 400 and word == "unsupported_version":
        # A collector older than this agent: resending the same bytes cannot help now, but
        # will once it is upgraded, so the batch is kept (never set aside: that loses data).
        return Outcome("unsupported_version", detail=detail, complete_through=ct, result=word)
    if status == 200:
        if reply["result"] in ("accepted", "duplicate") and reply.get("seq") == seq:
            return Outcome("acked", complete_through=ct)
        return Outcome("retry", -1.0, f"HTTP 200 that does not acknowledge batch {seq}: {body[:200]!r}")
    if status in (409,):
        return Outcome("conflict", detail=detail, complete_through=ct, result=word)
    if status in (400, 413, 422):
        return Outcome("reject", detail=detail, complete_through=ct, result=word)
    return Outcome("retry", -1.0, detail, result=word)  # 401/403/5xx/other: keep the data, back off


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


LANE_RNGS = ("prepare", "live", "backfill", "prepare-probe", "live-probe")


def lane_rngs(rng: random.Random) -> dict[str, random.Random]:
    """One generator per user of randomness (LANE_RNGS), each seeded from `rng` in a fixed
    order: what one lane draws never shifts another's sequence."""
    return {name: random.Random(rng.getrandbits(64)) for name in LANE_RNGS}


def _failure_of(exc: BaseException) -> str:
    """What a failed attempt says about reachability."""
    if isinstance(exc, CouldNotConnect):
        return DOWN
    if isinstance(exc, NotTheCollector):
        return ANSWERED
    if isinstance(exc, OSError | http.client.HTTPException):
        return LOST
    return HELD  # a spool error, say: nothing a probe can tell


class Uplink:
    """Runs the two delivery lanes until stop() is called."""

    def __init__(
        self,
        config: UplinkConfig,
        spool_path: Path,
        stats: UplinkStats | None = None,
        identity: tuple[SigningKey, str, str] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.config = config
        # The service watchdog's view: a send stuck past its bound, or a lane thread gone
        # while not stopping, stops the pings (systemd then restarts the agent).
        self.liveness = liveness or Liveness()
        self.spool_path = spool_path
        self.stats = stats or UplinkStats()
        self.identity = identity  # key, site, node: needed to resume a new spool's chain
        self.clock: Clock = clock or SystemClock()
        self.rngs = lane_rngs(rng or random.Random())
        # resumed: _prepare succeeded, the lanes may send. prepare_ended: it returned, having
        # succeeded or given up (a stop began): a lane waiting for it then knows which.
        self.resumed = threading.Event()
        self.prepare_ended = threading.Event()
        self.stop_event = threading.Event()
        self.new_batch = threading.Event()
        # Set when stop() begins: the backfill lane ends, the live lane ends once it has
        # nothing left to deliver; both must be gone by drain_deadline (clock.monotonic()).
        self.draining = threading.Event()
        self.drain_deadline = 0.0
        self.done: dict[str, threading.Event] = {}
        self.threads: list[threading.Thread] = []
        # A Retry-After is the collector speaking to this node, not to one lane: both honour it.
        self.hold_until = 0.0
        # The seq the live lane last settled, and the one the backfill lane is sending (0 when
        # none): a stop waits for the backfill's request only if it carries a newer batch.
        self.live_settled = 0
        self.backfill_sending = 0
        # Set while the live lane is delivering (or has nothing to deliver). The backfill lane
        # waits for it, so after an outage the newest batch is always the first to arrive.
        self.live_ok = threading.Event()
        self.last_warning: str | None = None
        # Series tables (wire v2) the collector is known to hold: those of batches it acked
        # since this start. Both lanes read and add under the lock. Empty at each start, so
        # the first batch naming a table after a start carries it (a few KB, once).
        self.known_tables: set[bytes] = set()
        self.tables_lock = threading.Lock()
        # The collector answered unsupported_version (older than this agent): said once, and
        # until it acks a v2 batch, v2 batches go without their table, which such a collector
        # would read as a frame with a bad magic (docs/wire.md §10.6).
        self.old_collector = False

    def start(self) -> None:
        t = threading.Thread(target=self._prepare, name="uplink-prepare", daemon=True)
        t.start()
        self.threads.append(t)
        for name, target in (("uplink-live", self._live), ("uplink-backfill", self._backfill)):
            self.done[name] = threading.Event()
            t = threading.Thread(target=self._lane, args=(name, target), name=name, daemon=True)
            t.start()
            self.threads.append(t)
            self.liveness.watch_thread(name, t)

    def notify(self) -> None:
        """A new batch was signed: wake the live lane."""
        self.new_batch.set()

    def stop(self, grace: float = 0.0, join_timeout: float = 1.0) -> None:
        """Stop both lanes, after giving the live lane up to `grace` seconds to deliver what it
        owns (every batch newer than the last it settled: the batch just signed). Only the
        live lane is waited for, and the backfill lane only while its request in flight
        carries a batch newer than that. Returns within about grace + join_timeout, whatever
        the collector does; a lane still in a request then is left to die with the process
        (its claim goes back to pending at the next start)."""
        for name in self.done:
            self.liveness.forget_thread(name)  # lanes end now, as they should
        self.drain_deadline = self.clock.monotonic() + max(0.0, grace)
        self.draining.set()
        self.new_batch.set()
        self.live_ok.set()  # the backfill lane may be waiting for it: let it see the stop
        if grace > 0 and self.done and self._drained(self.done["uplink-live"]):
            if self.backfill_sending > self.live_settled:
                # It claimed the oldest pending batch just as that was the newest (right after
                # a boundary): the live lane could not send it, so this request is worth a wait.
                self._drained(self.done["uplink-backfill"])
        self.stop_event.set()
        end = time.monotonic() + join_timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))

    def _drained(self, done: threading.Event) -> bool:
        """Wait for a lane to end, until the drain deadline at most; whether it ended."""
        left = self.drain_deadline - self.clock.monotonic()
        return done.is_set() or (left > 0 and self.clock.wait(done, left))

    def _prepare(self) -> None:
        """Runs once before either lane sends: hand back claims a killed process left, and
        for a new spool learn where this node's chain stands at the collector."""
        try:
            self._prepare_loop()
        finally:
            self.prepare_ended.set()

    def _prepare_loop(self) -> None:
        backoff = self._backoff("prepare")
        outage = _Outage(self.rngs["prepare-probe"])
        recovered = False
        # A stop ends the retries: the try under way (or one at once, if the stop ended a
        # wait) finishes and the lanes wait for it, but once that fails there is no more.
        while not self.stop_event.is_set():
            try:
                spool = Spool(self.spool_path)
                try:
                    if not recovered:
                        n = spool.recover_claims()
                        recovered = True
                        if n:
                            log.info("%d batches claimed before a restart go back to pending", n)
                    if self.identity is None or not spool.resume_needed():
                        break
                    key, site, node = self.identity
                    try:
                        with self.liveness.step("uplink-prepare chain head", float(self.config.timeout) + 120):
                            next_seq, head = self._chain_head(site, node)
                    except (OSError, http.client.HTTPException, NotTheCollector, ValueError, KeyError) as exc:
                        # The commonest first mistake is a wrong URL: `status` must name it.
                        spool.note_error(f"collector unreachable ({self.config.url}): {exc}")
                        raise
                    # The head may be this spool's own batch (a new node whose first batches
                    # went by bundle): renumbering those would record them twice.
                    placed = spool.resume_from_receipt(key, site, node, (next_seq - 1, head), ())
                    moved = placed.moved
                    if placed.outcome == UNDECIDED:
                        # Nothing left in the spool tells whose the head is: follow it, as a
                        # seq the collector holds must never be reused.
                        moved = spool.resume(key, site, node, next_seq, head)
                finally:
                    spool.close()
                if placed.outcome == OWN_CHAIN:
                    log.info("new spool: the collector's chain head for %s/%s (seq %d) is this spool's own "
                             "batch; nothing renumbered", site, node, next_seq - 1)
                elif moved:
                    log.warning("new spool: the collector already holds seq 1..%d for %s/%s; "
                                "renumbered %d unsent batches to follow it", next_seq - 1, site, node,
                                moved)
                break
            except Exception as exc:  # noqa: BLE001 (collector down, spool unwritable: retry)
                log.info("waiting before the first delivery to %s: %s", self.config.url, exc)
                if self.draining.is_set():
                    return  # not resumed: the lanes send nothing; the next start tries again
                self._wait_out(backoff.next_delay(), _failure_of(exc), outage)
        else:
            return
        self.resumed.set()

    def _chain_head(self, site: str, node: str) -> tuple[int, bytes]:
        parts = urlsplit(self.config.url)
        conn = _Connection(self.config)
        try:
            path = f"{parts.path.rstrip('/')}/v1/nodes/{quote(site, safe='')}/{quote(node, safe='')}/chain"
            status, _, body = conn.request("GET", path, None, self._request_timeout())
        finally:
            conn.close()
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if status == 404 and isinstance(reply, dict) and reply.get("result") == "unknown_node":
            return 1, wire.ZERO_HASH  # the collector has never heard from this node
        if status != 200 or not isinstance(reply, dict):
            # Not OSError: something answered, so a reachability probe would not tell more.
            raise NotTheCollector(f"HTTP {status} from the collector's chain endpoint (not its answer)")
        return int(reply["next_seq"]), bytes.fromhex(reply["head_hash"])

    def _lane(self, name: str, body: object) -> None:
        # A lane never dies: an unexpected error is logged and the lane starts over. It ends
        # when its body returns (a stop) or at stop_event.
        try:
            # Until the first delivery is prepared. If that gave up (a stop came while the
            # collector was down on a new spool), there is nothing this lane may send.
            while not self.clock.wait(self.prepare_ended, 1.0):
                if self.stop_event.is_set():
                    return
            if not self.resumed.is_set():
                return
            while not self.stop_event.is_set():
                try:
                    spool = Spool(self.spool_path)
                except Exception as exc:  # noqa: BLE001 (unwritable state dir, full disk...)
                    log.error("%s: cannot open spool %s: %s", name, self.spool_path, exc)
                    self.clock.wait(self.stop_event, 5.0)
                    continue
                conn = _Connection(self.config)
                try:
                    body(spool, conn)  # type: ignore[operator]
                    return
                except Exception:
                    log.exception("%s lane failed; restarting it", name)
                    self.clock.wait(self.stop_event, 1.0)
                finally:
                    conn.close()
                    spool.close()
        finally:
            self.done[name].set()

    def _send(self, spool: Spool, conn: _Connection, claimed: Claimed, backoff: Backoff) -> _Step:
        """POST one claimed batch and say what the lane does next."""
        try:
            # The timeout bounds each socket operation, not the whole upload, so a big batch
            # over a slow link legitimately takes longer: the bound allows 1 KB/s on top.
            # Far past it the lane is stuck (a hung socket, a wedged lock).
            bound = float(self.config.timeout) + 120 + (len(claimed.frame) + len(claimed.table or b"")) / 1024
            with self.liveness.step(f"{threading.current_thread().name} send", bound):
                return self._deliver(spool, conn, claimed, backoff)
        except BaseException:
            # Never leave a claim behind: the lane restarts, the batch must stay sendable.
            try:
                spool.release(claimed.seq)
            except Exception:  # noqa: BLE001
                log.exception("could not release batch %d after a lane failure", claimed.seq)
            raise

    def _collector_holds(self, table_id: bytes) -> bool:
        with self.tables_lock:
            return table_id in self.known_tables

    def _note_table(self, table_id: bytes, held: bool) -> None:
        with self.tables_lock:
            if held:
                self.known_tables.add(table_id)
            else:
                self.known_tables.discard(table_id)

    def _post_batch(self, conn: _Connection, claimed: Claimed) -> tuple[Outcome, Outcome | None, int]:
        """POST a claimed batch, with its series table while the collector is not known to
        hold it (and not known to predate v2), and once more at once where the answer calls
        for it (at most twice more):
        with the table after unknown_table, or without it after a malformed answer to a body
        that carried it. Returns (the last outcome, the malformed answer that made it try
        without the table or None, bytes posted)."""
        tid = claimed.table_id
        unasked = tid is not None and not self.old_collector and not self._collector_holds(tid)
        attach = claimed.table if unasked else None
        resent = False  # sent once more with its table after unknown_table
        probed: Outcome | None = None
        sent = 0
        while True:
            body = wire.with_table(attach, claimed.frame)
            status, headers, reply = conn.post(body, self._request_timeout())
            sent += len(body)
            with self.stats.lock:
                self.stats.sent_bytes += len(body)
                self.stats.sent_batches += 1
            outcome = classify(status, headers, reply, self.clock.wall(), claimed.seq)
            if tid is None:
                return outcome, probed, sent
            if outcome.kind == "unknown_table":
                self._note_table(tid, False)  # it lost it, or never had it: send it along again
                if attach is None and claimed.table is not None and not resent and probed is None:
                    attach, resent = claimed.table, True  # at once, on the same claim
                    continue
            elif (outcome.kind == "reject" and outcome.result in ("malformed", "too_large")
                  and attach is not None and probed is None):
                # A collector that reads only wire v1 takes a body that starts with a series
                # table for a bad frame; a table and frame together may pass max_body_bytes
                # where the frame alone does not. Whether that is all it means, the frame
                # alone tells: a v1-only collector then answers unsupported_version, and the
                # batch is kept; one that holds the table takes it.
                attach, probed = None, outcome
                continue
            return outcome, probed, sent

    def _deliver(self, spool: Spool, conn: _Connection, claimed: Claimed, backoff: Backoff) -> _Step:
        hold = self.hold_until - self.clock.monotonic()
        if hold > 0:
            spool.release(claimed.seq)
            return _Step(False, hold)
        tid = claimed.table_id
        try:
            outcome, probed, sent = self._post_batch(conn, claimed)
        except (OSError, http.client.HTTPException) as exc:
            problem = f"collector unreachable ({self.config.url}): {exc}"
            spool.release(claimed.seq, problem)
            self._warn_once(problem)
            return _Step(False, self._fail(backoff), _failure_of(exc))
        if outcome.kind == "acked":
            if tid is not None:
                self._note_table(tid, True)
                self.old_collector = False  # it reads v2 (again): a later refusal is news
            spool.ack(claimed.seq, outcome.complete_through)
            backoff.reset()
            if self.last_warning is not None:
                log.info("delivering again (batch %d acked)", claimed.seq)
                self.last_warning = None
            with self.stats.lock:
                self.stats.acked_batches += 1
                self.stats.last_ack_wall = self.clock.wall()
                self.stats.backoff_s = 0.0
            return _Step(True, 0.0, sent_bytes=sent)
        if outcome.kind == "unknown_table" and (probed is not None or claimed.table is None):
            # The collector reads v2 but cannot have the table: it refused the one sent (the
            # malformed answer before), or the spool does not hold it. No resend can help.
            why = (probed.detail if probed is not None else
                   f"the collector lacks series table {tid.hex()[:16] if tid else '?'} and the spool does not "
                   "hold it")
            outcome = Outcome("reject", detail=why, complete_through=outcome.complete_through)
        if outcome.kind in ("reject", "conflict"):
            log.error("collector rejected batch %d for good: %s", claimed.seq, outcome.detail)
            spool.reject(claimed.seq, outcome.detail,
                         self.identity if outcome.kind == "reject" else None)
            with self.stats.lock:
                self.stats.rejected_batches += 1
            return _Step(True, 0.0, sent_bytes=sent)
        if outcome.kind == "unsupported_version":
            problem = (f"{outcome.detail}: the collector does not read the wire version of batch "
                       f"{claimed.seq}; upgrade the collector, or set [uplink] wire_version = 1 in agent.toml "
                       "(batches already signed as v2 wait in the spool for an upgraded collector)")
            spool.release(claimed.seq, problem)
            if not self.old_collector:
                self.old_collector = True
                log.warning("%s (data stays in the spool; retrying with backoff)", problem)
            return _Step(False, self._fail(backoff), ANSWERED, sent)
        if outcome.kind == "unknown_table":
            # Refused as unknown with its table attached: the collector did not keep it
            # (a restart mid-request?). Keep the batch; the next try sends the table again.
            outcome = dataclasses.replace(
                outcome, detail=f"{outcome.detail} (series table {tid.hex()[:16] if tid else '?'} was sent with it)",
                delay_s=-1.0)
        spool.release(claimed.seq, outcome.detail)
        if outcome.delay_s >= 0:
            self.hold_until = max(self.hold_until, self.clock.monotonic() + outcome.delay_s)
            with self.stats.lock:
                self.stats.backoff_s = outcome.delay_s
            return _Step(False, outcome.delay_s, HELD, sent)
        # The collector (or something in its place) answered: a probe would say it is up,
        # so this backoff is sat out in full rather than cut short into a send loop.
        self._warn_once(f"batches not delivered: {outcome.detail}")
        return _Step(False, self._fail(backoff), ANSWERED, sent)

    def _request_timeout(self) -> float:
        """The configured timeout, but never past the end of a stop's grace."""
        limit = float(self.config.timeout)
        if self.draining.is_set():
            limit = min(limit, max(0.05, self.drain_deadline - self.clock.monotonic()))
        return limit

    def _probe(self) -> bool:
        """One GET /healthz on a new connection: does the collector answer, able to write?"""
        with self.stats.lock:
            self.stats.probes += 1
        conn = _Connection(self.config, timeout=min(float(self.config.timeout), PROBE_TIMEOUT_S))
        path = urlsplit(self.config.url).path.rstrip("/") + "/healthz"
        try:
            status, _, _ = conn.request("GET", path, None, min(conn.timeout, self._request_timeout()))
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return status == 200

    def _wait_out(self, delay: float, failure: str, outage: _Outage) -> None:
        """Sit out a backoff of `delay` seconds after an attempt that failed so (`failure`).
        When no answer came back (DOWN or LOST), probe the collector about every
        probe_interval meanwhile, and end the wait at the first answered probe if the
        collector was seen down during this outage; see the module docstring."""
        if failure == ANSWERED:
            outage.delivered()  # it is up: whatever comes next starts a new story
        probing = failure in (DOWN, LOST) and self.config.probe_interval_s > 0
        if probing and outage.released:
            # A probe let the last send through and it failed again: /healthz answers but
            # sends do not get through. Sit this one out; the next failure starts afresh.
            outage.delivered()
            probing = False
        elif failure == DOWN:
            outage.down_seen = True
        now = self.clock.monotonic()
        end = now + delay
        # A stop that begins during the wait ends it: the grace is for one more try now,
        # not for the rest of a backoff. Once stopping, only the stop itself ends a wait.
        wake = self.stop_event if self.draining.is_set() else self.draining
        # The send just failed: probing at once would tell nothing.
        next_probe = now + self._probe_gap(outage) if probing else end
        while not wake.is_set():
            now = self.clock.monotonic()
            if now >= end:
                return
            if probing and now >= next_probe:
                # Start to start: a slow probe delays the next one, never doubles them up.
                next_probe = now + self._probe_gap(outage)
                if not self._probe():
                    outage.down_seen = True
                elif outage.down_seen:
                    outage.down_seen, outage.released = False, True
                    log.info("collector answers again; sending the newest batch now")
                    return
                else:
                    # Answered, and never seen down: the send failed for another reason (a
                    # proxy resetting the upload, a collector failing on this batch).
                    probing = False
                continue
            self.clock.wait(wake, (min(end, next_probe) if probing else end) - now)

    def _probe_gap(self, outage: _Outage) -> float:
        """probe_interval, jittered by +-20% so a fleet does not probe in step."""
        return self.config.probe_interval_s * outage.rng.uniform(0.8, 1.2)

    def _warn_once(self, problem: str) -> None:
        """Log a delivery problem when it starts or changes, not on every retry."""
        if problem != self.last_warning:
            log.warning("%s (data stays in the spool; retrying with backoff)", problem)
            self.last_warning = problem

    def _fail(self, backoff: Backoff) -> float:
        delay = backoff.next_delay()
        with self.stats.lock:
            self.stats.failures += 1
            self.stats.backoff_s = delay
        return delay

    def _backoff(self, lane: str) -> Backoff:
        return Backoff(float(self.config.backoff_initial), float(self.config.backoff_max),
                       self.rngs[lane])

    def _live(self, spool: Spool, conn: _Connection) -> None:
        backoff = self._backoff("live")
        outage = _Outage(self.rngs["live-probe"])
        newest_seen = 0
        while not self.stop_event.is_set():
            if self.draining.is_set() and self.clock.monotonic() >= self.drain_deadline:
                return
            # Cleared before the claim, so a batch signed after the claim still wakes the wait.
            self.new_batch.clear()
            claimed = spool.claim_newest_after(newest_seen)
            if claimed is None:
                self.live_ok.set()
                if self.draining.is_set():
                    return  # everything the live lane owns is delivered: the stop goes on
                self.clock.wait(self.new_batch, 1.0)
                continue
            step = self._send(spool, conn, claimed, backoff)
            if step.settled:
                outage.delivered()
                # Everything older than what the live lane settled is the backfill lane's job,
                # but not while stopping (the backfill has stopped): then the lane goes on to
                # each batch newer than the last it settled before the stop, newest first.
                if not self.draining.is_set():
                    newest_seen = self.live_settled = claimed.seq
                self.live_ok.set()
            else:
                self.live_ok.clear()
                self._wait_out(step.wait_s, step.failure, outage)

    def _backfill(self, spool: Spool, conn: _Connection) -> None:
        backoff = self._backoff("backfill")
        rate = float(self.config.max_bytes_per_second)
        # A stop ends the backfill at once: its grace is for the newest batch, not the backlog.
        while not self.draining.is_set():
            if not self.clock.wait(self.live_ok, 1.0) or self.draining.is_set():
                continue
            claimed = spool.claim_oldest()
            if claimed is None:
                self.clock.wait(self.draining, 1.0)
                continue
            started = self.clock.monotonic()
            self.backfill_sending = claimed.seq
            try:
                step = self._send(spool, conn, claimed, backoff)
            finally:
                self.backfill_sending = 0
            delay = step.wait_s
            if step.settled:
                # The byte-rate cap: a batch of N bytes (its series table too, when sent with
                # it) buys N/rate seconds of the uplink.
                delay = max(0.0, step.sent_bytes / rate - (self.clock.monotonic() - started))
            if delay:
                self.clock.wait(self.draining, delay)
