"""Delivery from the spool to the collector: a live lane and a backfill lane.

The live lane sends each new batch as soon as it is signed, newest first, so
dashboards are current the moment the uplink returns. The backfill lane walks
the backlog oldest-first under a byte-rate cap so catching up never saturates a
thin uplink. Each lane is one thread with its own spool connection and its own
HTTP connection; they never send the same batch because a send is a spool claim.

Failures: connection errors and 5xx back off exponentially with full jitter;
429/503 wait for Retry-After; 401/403 (key not enrolled or revoked) keep the
data and retry slowly; 400/409/413 mean resending cannot help, so the batch is
set aside as rejected (kept for audit) and the error is recorded for `status`.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from nacl.signing import SigningKey

import wire
from agent.config import UplinkConfig
from agent.spool import Claimed, Spool

log = logging.getLogger("waystation.uplink")

USER_AGENT = "waystation-agent/1"
_MAX_RETRY_AFTER_S = 3600.0


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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class Outcome:
    """What one POST came to."""

    kind: str  # acked | retry | reject (collector lacks it) | conflict (collector holds another)
    delay_s: float = 0.0
    detail: str = ""
    complete_through: int | None = None


class _Connection:
    """One keep-alive HTTP(S) connection to the collector."""

    def __init__(self, config: UplinkConfig) -> None:
        parts = urlsplit(config.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/") + "/v1/batches"
        self.timeout = float(config.timeout)
        self.context: ssl.SSLContext | None = None
        if self.https:
            self.context = ssl.create_default_context(cafile=config.ca_file or None)
            if config.client_cert:
                self.context.load_cert_chain(config.client_cert, config.client_key or None)
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", self.path, body)

    def request(self, method: str, path: str, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                if self.https:
                    self.conn = http.client.HTTPSConnection(
                        self.host, self.port, timeout=self.timeout, context=self.context
                    )
                else:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(
                    method,
                    path,
                    body=body,
                    headers={
                        "Content-Type": "application/x-waystation-batch",
                        "User-Agent": USER_AGENT,
                    },
                )
                resp = self.conn.getresponse()
                data = resp.read()
                headers = {k.lower(): v for k, v in resp.getheaders()}
                if headers.get("connection", "").lower() == "close":
                    self.close()
                return resp.status, headers, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed while idle: retry once on a new one.
                self.close()
                if attempt:
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
    if status == 200:
        if reply["result"] in ("accepted", "duplicate") and reply.get("seq") == seq:
            return Outcome("acked", complete_through=ct)
        return Outcome("retry", -1.0, f"HTTP 200 that does not acknowledge batch {seq}: {body[:200]!r}")
    if status in (409,):
        return Outcome("conflict", detail=detail, complete_through=ct)
    if status in (400, 413, 422):
        return Outcome("reject", detail=detail, complete_through=ct)
    return Outcome("retry", -1.0, detail)  # 401/403/5xx/other: keep the data, back off


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


class Uplink:
    """Runs the two delivery lanes until stop() is called."""

    def __init__(
        self,
        config: UplinkConfig,
        spool_path: Path,
        stats: UplinkStats | None = None,
        identity: tuple[SigningKey, str, str] | None = None,
    ) -> None:
        self.config = config
        self.spool_path = spool_path
        self.stats = stats or UplinkStats()
        self.identity = identity  # key, site, node: needed to resume a new spool's chain
        self.resumed = threading.Event()
        self.stop_event = threading.Event()
        self.new_batch = threading.Event()
        self.threads: list[threading.Thread] = []
        # A Retry-After is the collector speaking to this node, not to one lane: both honour it.
        self.hold_until = 0.0
        # Set while the live lane is delivering (or has nothing to deliver). The backfill lane
        # waits for it, so after an outage the newest batch is always the first to arrive.
        self.live_ok = threading.Event()
        self.last_warning: str | None = None

    def start(self) -> None:
        t = threading.Thread(target=self._prepare, name="uplink-prepare", daemon=True)
        t.start()
        self.threads.append(t)
        for name, target in (("uplink-live", self._live), ("uplink-backfill", self._backfill)):
            t = threading.Thread(target=self._lane, args=(name, target), name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def notify(self) -> None:
        """A new batch was signed: wake the live lane."""
        self.new_batch.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.live_ok.set()
        self.new_batch.set()
        for t in self.threads:
            t.join(timeout)

    def _prepare(self) -> None:
        """Runs once before either lane sends: hand back claims a killed process left, and
        for a new spool learn where this node's chain stands at the collector."""
        backoff = self._backoff()
        recovered = False
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
                    next_seq, head = self._chain_head(site, node)
                    moved = spool.resume(key, site, node, next_seq, head)
                finally:
                    spool.close()
                if next_seq > 1:
                    log.warning("new spool: the collector already holds seq 1..%d for %s/%s; "
                                "renumbered %d unsent batches to follow it", next_seq - 1, site, node,
                                moved)
                break
            except Exception as exc:  # noqa: BLE001 (collector down, spool unwritable: retry)
                log.info("waiting before the first delivery: %s", exc)
                self.stop_event.wait(backoff.next_delay())
        self.resumed.set()

    def _chain_head(self, site: str, node: str) -> tuple[int, bytes]:
        parts = urlsplit(self.config.url)
        conn = _Connection(self.config)
        try:
            path = f"{parts.path.rstrip('/')}/v1/nodes/{quote(site, safe='')}/{quote(node, safe='')}/chain"
            status, _, body = conn.request("GET", path, None)
        finally:
            conn.close()
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if status == 404 and isinstance(reply, dict) and reply.get("result") == "unknown_node":
            return 1, wire.ZERO_HASH  # the collector has never heard from this node
        if status != 200 or not isinstance(reply, dict):
            raise OSError(f"HTTP {status} from the collector's chain endpoint (not its answer)")
        return int(reply["next_seq"]), bytes.fromhex(reply["head_hash"])

    def _lane(self, name: str, body: object) -> None:
        # A lane never dies: an unexpected error is logged and the lane starts over.
        while not self.resumed.wait(1.0):
            if self.stop_event.is_set():
                return
        while not self.stop_event.is_set():
            try:
                spool = Spool(self.spool_path)
            except Exception as exc:  # noqa: BLE001 (unwritable state dir, full disk...)
                log.error("%s: cannot open spool %s: %s", name, self.spool_path, exc)
                self.stop_event.wait(5.0)
                continue
            conn = _Connection(self.config)
            try:
                body(spool, conn)  # type: ignore[operator]
            except Exception:
                log.exception("%s lane failed; restarting it", name)
                self.stop_event.wait(1.0)
            finally:
                conn.close()
                spool.close()

    def _send(
        self, spool: Spool, conn: _Connection, claimed: Claimed, backoff: Backoff
    ) -> tuple[bool, float]:
        """POST one claimed batch; returns (settled, seconds the lane should wait)."""
        try:
            return self._deliver(spool, conn, claimed, backoff)
        except BaseException:
            # Never leave a claim behind: the lane restarts, the batch must stay sendable.
            try:
                spool.release(claimed.seq)
            except Exception:  # noqa: BLE001
                log.exception("could not release batch %d after a lane failure", claimed.seq)
            raise

    def _deliver(
        self, spool: Spool, conn: _Connection, claimed: Claimed, backoff: Backoff
    ) -> tuple[bool, float]:
        hold = self.hold_until - time.monotonic()
        if hold > 0:
            spool.release(claimed.seq)
            return False, hold
        try:
            status, headers, body = conn.post(claimed.frame)
        except (OSError, http.client.HTTPException) as exc:
            problem = f"collector unreachable ({self.config.url}): {exc}"
            spool.release(claimed.seq, problem)
            self._warn_once(problem)
            return False, self._fail(backoff)
        with self.stats.lock:
            self.stats.sent_bytes += len(claimed.frame)
            self.stats.sent_batches += 1
        outcome = classify(status, headers, body, time.time(), claimed.seq)
        if outcome.kind == "acked":
            spool.ack(claimed.seq, outcome.complete_through)
            backoff.reset()
            if self.last_warning is not None:
                log.info("delivering again (batch %d acked)", claimed.seq)
                self.last_warning = None
            with self.stats.lock:
                self.stats.acked_batches += 1
                self.stats.last_ack_wall = time.time()
                self.stats.backoff_s = 0.0
            return True, 0.0
        if outcome.kind in ("reject", "conflict"):
            log.error("collector rejected batch %d for good: %s", claimed.seq, outcome.detail)
            spool.reject(claimed.seq, outcome.detail,
                         self.identity if outcome.kind == "reject" else None)
            with self.stats.lock:
                self.stats.rejected_batches += 1
            return True, 0.0
        spool.release(claimed.seq, outcome.detail)
        if outcome.delay_s >= 0:
            self.hold_until = max(self.hold_until, time.monotonic() + outcome.delay_s)
            with self.stats.lock:
                self.stats.backoff_s = outcome.delay_s
            return False, outcome.delay_s
        self._warn_once(f"batches not delivered: {outcome.detail}")
        return False, self._fail(backoff)

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

    def _backoff(self) -> Backoff:
        return Backoff(float(self.config.backoff_initial), float(self.config.backoff_max))

    def _live(self, spool: Spool, conn: _Connection) -> None:
        backoff = self._backoff()
        newest_seen = 0
        while not self.stop_event.is_set():
            claimed = spool.claim_newest_after(newest_seen)
            if claimed is None:
                self.live_ok.set()
                self.new_batch.wait(1.0)
                self.new_batch.clear()
                continue
            settled, delay = self._send(spool, conn, claimed, backoff)
            if settled:
                # Everything older than what the live lane settled is the backfill lane's job.
                newest_seen = claimed.seq
                self.live_ok.set()
            else:
                self.live_ok.clear()
                self.stop_event.wait(delay)

    def _backfill(self, spool: Spool, conn: _Connection) -> None:
        backoff = self._backoff()
        rate = float(self.config.max_bytes_per_second)
        while not self.stop_event.is_set():
            if not self.live_ok.wait(1.0):
                continue
            claimed = spool.claim_oldest()
            if claimed is None:
                self.stop_event.wait(1.0)
                continue
            started = time.monotonic()
            settled, delay = self._send(spool, conn, claimed, backoff)
            if settled:
                # The byte-rate cap: a batch of N bytes buys N/rate seconds of the uplink.
                delay = max(0.0, len(claimed.frame) / rate - (time.monotonic() - started))
            if delay:
                self.stop_event.wait(delay)
