"""Real Prometheus remote-write receivers on loopback, and a proxy that injects faults.

- `PrometheusReceiver`: Debian's `prometheus` (2.42) with the remote-write receiver on, no
  scrape jobs and a 1d out-of-order window, so that backfilled (older) samples are accepted.
- `VictoriaMetricsReceiver`: Debian's `victoria-metrics` (1.79) single node, no dedup, a
  100y retention and no query latency offset or response cache, so that what was just
  written (after /internal/force_flush) is what a query returns.
- `FaultProxy`: an HTTP proxy in front of a receiver's write URL whose behaviour a test
  switches at run time ("pass", "down", "refuse_next_400"); it records every request's
  answer and keeps the bodies of the requests it (or the upstream) refused.

Both receivers stop and start again on the SAME port and data directory (a receiver
outage), and `.samples(selector, start_ms, end_ms)` returns the RAW samples they hold with
their original timestamps: {frozenset(labels incl. __name__): [(ts_ms, value), ...]}, each
list in timestamp order (duplicates kept: VictoriaMetrics without dedup stores a resent
sample twice). Each answer is checked for completeness against a second way of asking the
receiver (Prometheus: count_over_time; VictoriaMetrics: its query API besides export).

Only loopback addresses are ever listened on or sent to. Every wait is bounded in time.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import math
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.conftest import free_port
from tests.integration.harness import Collector, wait_for

PROMETHEUS = shutil.which("prometheus")
VICTORIA_METRICS = shutil.which("victoria-metrics")

Labels = frozenset[tuple[str, str]]
Samples = dict[Labels, list[tuple[int, float]]]

REMOTE_WRITE_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}
LOOPBACK_HOSTS = ("127.0.0.1", "::1")

# Never through an http_proxy from the environment: every address here is loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                 timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body); an HTTP error status is an answer, not an exception."""
    require_loopback(url)
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def require_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise AssertionError(f"{url}: only loopback addresses (127.0.0.1, ::1) may be targets")


def ms_to_param(ts_ms: int) -> str:
    """Unix seconds with exactly three decimals: both receivers parse it to the exact ms
    (a float like ts/1000 may print as ...389.99999 and lose a millisecond)."""
    sign = "-" if ts_ms < 0 else ""
    a = abs(ts_ms)
    return f"{sign}{a // 1000}.{a % 1000:03d}"


def labels_of(mapping: Mapping[str, str]) -> Labels:
    return frozenset(mapping.items())


def value_key(v: float) -> float | str:
    """Values as comparable keys: NaN == NaN (Prometheus keeps NaN; its bit pattern may differ)."""
    return "NaN" if math.isnan(v) else v


def total_samples(samples: Samples) -> int:
    return sum(len(points) for points in samples.values())


# -- remote-write requests (built with the collector's own codec) -------------------------------

def write_request(series: Iterable[tuple[Mapping[str, str], Sequence[tuple[int, float]]]]) -> bytes:
    """A compressed remote-write body: series as (labels incl. __name__, [(ts_ms, value), ...])."""
    from collector import remote_write_proto as rwp

    encoded = []
    for labels, points in series:
        encoded.append(rwp.encode_timeseries(
            rwp.encode_labels(sorted(labels.items())),
            [ts for ts, _ in points], [v for _, v in points],
        ))
    return bytes(rwp.compress(rwp.encode_write_request(encoded)))


def post_write(write_url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    status, _, answer = http_request("POST", write_url, body, REMOTE_WRITE_HEADERS, timeout)
    return status, answer


def decode_request(body: bytes) -> Samples:
    """The samples in a compressed remote-write body, in `.samples()`'s shape."""
    from collector import remote_write_proto as rwp

    out: Samples = {}
    for labels, points in rwp.decode_write_request(rwp.decompress(body)):
        out.setdefault(frozenset(labels), []).extend((int(t), float(v)) for t, v in points)
    for pts in out.values():
        pts.sort(key=lambda p: p[0])
    return out


# -- receiver processes -------------------------------------------------------------------------

class ReceiverProcess:
    """A receiver binary on a fixed loopback port and data dir; stop() and start() again keep both."""

    name = "receiver"
    ready_path = "/"
    start_timeout_s = 60.0

    def __init__(self, tmp_dir: Path, port: int | None = None) -> None:
        self.dir = tmp_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.port = port or free_port()
        self.log = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def write_url(self) -> str:
        return self.base_url + "/api/v1/write"

    def args(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        assert self.proc is None, f"{self.name} already running"
        self.starts += 1
        with open(self.log, "ab") as log:
            log.write(f"\n===== start #{self.starts} at {time.time():.3f} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            wait_for(self._ready, self.start_timeout_s, f"{self.name} ready on {self.base_url}", interval=0.1)
        except AssertionError as exc:
            self.kill()
            raise AssertionError(f"{exc}\n{self.name} log tail:\n{self.log_tail()}") from None

    def _ready(self) -> bool:
        self.check_alive()
        try:
            return http_request("GET", self.base_url + self.ready_path, timeout=1.0)[0] == 200
        except OSError:
            return False

    def check_alive(self) -> None:
        if self.proc is None:
            raise AssertionError(f"{self.name} is not running (stopped by the test)")
        if self.proc.poll() is not None:
            rc = self.proc.returncode
            self.proc = None
            raise AssertionError(f"{self.name} exited with {rc}; log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown: both receivers persist what they accepted), SIGKILL if stuck."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> ReceiverProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _get_json(self, path: str, params: Mapping[str, str], method: str = "GET") -> Any:
        self.check_alive()
        data = urllib.parse.urlencode(params)
        if method == "POST":
            status, _, body = http_request("POST", self.base_url + path, data.encode(),
                                           {"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
        else:
            status, _, body = http_request("GET", f"{self.base_url}{path}?{data}", timeout=60)
        if status != 200:
            raise AssertionError(f"{self.name} {path} {dict(params)} -> {status}: {body[:500]!r}")
        return json.loads(body)

    def _instant(self, query: str, at_ms: int) -> list[Any]:
        doc = self._get_json("/api/v1/query", {"query": query, "time": ms_to_param(at_ms)}, method="POST")
        assert doc.get("status") == "success", (self.name, query, doc)
        result: list[Any] = doc["data"]["result"]
        return result

    consistency_tries = 10

    def samples(self, selector: str, start_ms: int, end_ms: int) -> Samples:
        """Raw samples of `selector` in [start_ms, end_ms] (both included), with their original
        timestamps, read one way and checked against a second way of asking. While the receiver
        is being written to, the two may differ by what arrived in between: they are asked
        again (a bounded number of times) until they agree."""
        assert end_ms >= start_ms
        problem = ""
        for attempt in range(self.consistency_tries):
            raw = self._raw(selector, start_ms, end_ms)
            found = self._inconsistency(selector, start_ms, end_ms, raw)
            if found is None:
                return _filter(raw, start_ms, end_ms)
            problem = found
            time.sleep(0.2 * (attempt + 1))
        raise AssertionError(f"{self.name}: two ways of reading {selector} in [{start_ms}, {end_ms}] never agreed "
                             f"in {self.consistency_tries} tries: {problem}")

    def _raw(self, selector: str, start_ms: int, end_ms: int) -> Samples:
        raise NotImplementedError

    def _inconsistency(self, selector: str, start_ms: int, end_ms: int, raw: Samples) -> str | None:
        raise NotImplementedError


def _filter(raw: Samples, start_ms: int, end_ms: int) -> Samples:
    out: Samples = {}
    for labels, points in raw.items():
        kept = sorted((p for p in points if start_ms <= p[0] <= end_ms), key=lambda p: p[0])
        if kept:
            out[labels] = kept
    return out


class PrometheusReceiver(ReceiverProcess):
    """`prometheus --web.enable-remote-write-receiver`, no scrape jobs, out-of-order window 1d.

    Observed with Debian's 2.42: the config's `storage.tsdb.out_of_order_time_window` is
    accepted; an out-of-order sample inside the window (relative to the newest sample in the
    TSDB head, not the wall clock) is stored (204); a sample older than the window answers
    500 "too old sample"; a different value at an existing in-order timestamp answers 400
    "duplicate sample for timestamp"; a resent identical sample answers 204. One refused
    sample refuses the WHOLE request (the appender is rolled back): nothing of it is stored.
    A written sample is queryable as soon as the write answered 204.
    """

    name = "prometheus"
    ready_path = "/-/ready"

    def __init__(self, tmp_dir: Path, port: int | None = None, out_of_order_window: str = "1d") -> None:
        if PROMETHEUS is None:
            raise AssertionError("prometheus not installed (apt-get install prometheus)")
        super().__init__(tmp_dir, port)
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
            "storage": {"tsdb": {"out_of_order_time_window": out_of_order_window}},
        }))

    def args(self) -> list[str]:
        assert PROMETHEUS is not None
        return [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-remote-write-receiver",
                "--storage.tsdb.retention.time=100y"]

    @staticmethod
    def _window(start_ms: int, end_ms: int) -> int:
        return max(1, end_ms - start_ms)  # a zero-width range is not valid PromQL

    def _raw(self, selector: str, start_ms: int, end_ms: int) -> Samples:
        """An instant query of `selector[W]` at end_ms returns the raw points of the range vector
        (2.42's range is closed: [end - W, end]); no lookback or step is involved."""
        raw: Samples = {}
        for series in self._instant(f"{selector}[{self._window(start_ms, end_ms)}ms]", end_ms):
            labels = labels_of(series["metric"])
            points = raw.setdefault(labels, [])
            points.extend((round(float(t) * 1000), float(v)) for t, v in series.get("values", []))
        return raw

    def _inconsistency(self, selector: str, start_ms: int, end_ms: int, raw: Samples) -> str | None:
        """Per metric name, count_over_time over the same range must count what came back.
        (Per name, because count_over_time drops __name__: across names, two series with the
        same other labels would collide, which Prometheus answers with a 422.) The names are
        those returned plus those the index knows for the range, so a name missing from the
        answer altogether is caught too."""
        window = self._window(start_ms, end_ms)
        names = {dict(labels)["__name__"] for labels in raw}
        doc = self._get_json("/api/v1/label/__name__/values", {
            "match[]": selector, "start": ms_to_param(end_ms - window), "end": ms_to_param(end_ms)})
        names.update(doc["data"])
        for name in sorted(names):
            per_name = _with_name(selector, name)
            counts = self._instant(f"count_over_time({per_name}[{window}ms])", end_ms)
            want = (len(counts), sum(int(float(c["value"][1])) for c in counts))
            mine = [pts for labels, pts in raw.items() if ("__name__", name) in labels]
            got = (len(mine), sum(len(p) for p in mine))
            if got != want:
                return f"{selector}[{window}ms]@{end_ms} returned {got} (series, samples) of {name} " \
                       f"but count_over_time counts {want}"
        return None


def _with_name(selector: str, name: str) -> str:
    """`selector` narrowed to one metric name (PromQL ANDs repeated __name__ matchers)."""
    selector = selector.strip()
    if selector.startswith("{"):
        inner = selector[1:-1].strip()
        return f'{{__name__="{name}"{", " + inner if inner else ""}}}'
    return selector  # `name` or `name{...}`: one name already


class VictoriaMetricsReceiver(ReceiverProcess):
    """`victoria-metrics` single node: no dedup, retention 100y, no latency offset or cache.

    Observed with Debian's 1.79: out-of-order and old samples inside the retention are all
    stored (204); a sample outside the retention (before 1970 with 100y) or more than 2 days
    in the future is DROPPED SILENTLY (204, only a warning in the log); NaN samples are
    dropped silently (stale markers aside); a resent sample is stored again (both copies
    are exported, and count_over_time counts both); values are stored as decimals with a
    shared exponent per block, so a block mixing very different magnitudes loses low digits
    (~15 significant digits of the block's largest value); an existing series sees new
    samples within ~1s, a NEW series only after its index entry is flushed (~10s), unless
    /internal/force_flush (present in 1.79, no auth key needed by default) is called first.
    """

    name = "victoria-metrics"
    ready_path = "/health"

    def __init__(self, tmp_dir: Path, port: int | None = None) -> None:
        if VICTORIA_METRICS is None:
            raise AssertionError("victoria-metrics not installed (apt-get install victoria-metrics)")
        super().__init__(tmp_dir, port)

    def args(self) -> list[str]:
        assert VICTORIA_METRICS is not None
        return [VICTORIA_METRICS, f"-storageDataPath={self.data_dir}", f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=100y",          # test data may be old; outside it VM drops silently
                "-dedup.minScrapeInterval=0s",    # no dedup: every accepted sample stays
                "-search.latencyOffset=0s",       # queries see samples up to "now"
                "-search.disableCache",           # no response cache: backfilled data shows at once
                "-loggerLevel=INFO"]

    def flush(self) -> None:
        """Make everything accepted so far searchable (rows and new series' index entries)."""
        self.check_alive()
        status, _, body = http_request("GET", self.base_url + "/internal/force_flush", timeout=30)
        if status != 200:
            raise AssertionError(f"victoria-metrics /internal/force_flush -> {status}: {body[:300]!r}")

    def rows_inserted(self) -> int:
        """Samples accepted over remote write since this process started (its own /metrics)."""
        self.check_alive()
        status, _, body = http_request("GET", self.base_url + "/metrics", timeout=10)
        if status != 200:
            raise AssertionError(f"victoria-metrics /metrics -> {status}")
        m = re.search(rb'^vm_rows_inserted_total\{type="promremotewrite"\} (\d+)$', body, re.M)
        assert m, "vm_rows_inserted_total{type=\"promremotewrite\"} not in victoria-metrics /metrics"
        return int(m.group(1))

    def _raw(self, selector: str, start_ms: int, end_ms: int) -> Samples:
        """/api/v1/export (JSON lines, closed range [start, end]) after a force_flush."""
        self.flush()
        params = {"match[]": selector, "start": ms_to_param(start_ms), "end": ms_to_param(end_ms)}
        status, _, body = http_request("GET", f"{self.base_url}/api/v1/export?{urllib.parse.urlencode(params)}",
                                       timeout=60)
        if status != 200:
            raise AssertionError(f"victoria-metrics export {params} -> {status}: {body[:500]!r}")
        raw: Samples = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            doc = parse_export_line(line.decode())
            labels = labels_of(doc["metric"])
            # One series may come in several lines (one per stored block).
            raw.setdefault(labels, []).extend(
                (int(t), float(v)) for t, v in zip(doc["timestamps"], doc["values"], strict=True))
        return raw

    def _inconsistency(self, selector: str, start_ms: int, end_ms: int, raw: Samples) -> str | None:
        """The query path must see as many series and samples: an instant query of a range vector
        returns its raw samples here too, over (end - W, end]. (count_over_time is no use for
        this in 1.79: an instant query's rollup leaves out a sample in the last second before
        `time`.)"""
        queried = self._instant(f"{selector}[{end_ms - start_ms + 1}ms]", end_ms)
        want = (len(queried), sum(len(q.get("values", [])) for q in queried))
        got = (len(raw), total_samples(raw))
        if got != want:
            return f"export returned {got} (series, samples) but a query of the same range returns {want}"
        return None


_INF = re.compile(r"(?<![A-Za-z])([+-]?)Inf(?!inity)")


def parse_export_line(line: str) -> dict[str, Any]:
    """One /api/v1/export line. VictoriaMetrics writes +Inf/-Inf/NaN as bare tokens, which are
    not JSON; they are only rewritten after "values": so a label value is never touched."""
    head, sep, tail = line.rpartition('"values":')
    if sep:
        tail = _INF.sub(lambda m: ("-" if m.group(1) == "-" else "") + "Infinity", tail)
        line = head + sep + tail
    doc: dict[str, Any] = json.loads(line)
    return doc


# -- the collector, killable --------------------------------------------------------------------

class KillableCollector(Collector):
    """harness.Collector plus kill(): SIGKILL of `serve` AND its forwarder child at once.

    `serve` runs the forwarder as a child process that stops cleanly (saving its positions)
    when its stdin reaches EOF, which SIGKILL of the parent alone would cause: that is a
    clean stop of the forwarder, not a crash. A crash (OOM killer on the cgroup, `systemctl
    kill -s KILL`, power loss) takes both, so kill() SIGKILLs the children first, then serve.
    stop() is the harness's SIGTERM, plus a bounded wait for (and SIGKILL of) any child left."""

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> list[int]:
        """SIGKILL serve and its children; returns the child pids that were killed."""
        if self.proc is None:
            return []
        children = self.descendants()
        for child in children:
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        _reap(children)
        return [c.pid for c in children]

    def stop(self) -> None:
        children = self.descendants()
        super().stop()
        _reap(children)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"collector is not running (exit {rc}); log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reap(children: list[psutil.Process], timeout: float = 20.0) -> None:
    """Wait (bounded) for the given processes to be gone (a zombie counts: its parent, dead
    too, no longer reaps it); SIGKILL those that are not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in children):
        time.sleep(0.05)
    for p in children:
        if not _gone(p):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# -- the fault-injecting proxy ------------------------------------------------------------------

MODES = ("pass", "down", "refuse_next_400")
REFUSE_400_BODY = b"FaultProxy: request refused by the test (injected 400 Bad Request)\n"


@dataclass(frozen=True)
class ProxiedRequest:
    """One POST the proxy handled: when, in which mode, the answer, and (if not accepted) the bodies."""

    at: float  # when it was answered (or dropped)
    mode: str
    status: int  # 0: no answer, the connection was dropped (the upstream could not be reached)
    origin: str  # "proxy" (answered or dropped by the proxy itself) or "upstream"
    request_bytes: int
    request_body: bytes | None  # kept for requests that were not accepted only
    response_body: bytes

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    @property
    def refused(self) -> bool:
        return not self.accepted


class FaultProxy:
    """A loopback HTTP proxy in front of one write URL; `.mode` switches its behaviour at run time:

    - "pass": forward the POST (body and headers) to the upstream after `delay_s` (a slow
      link; 0 by default), answer what it answers; if the upstream cannot be reached, drop
      the connection without an answer, so the sender sees what it would see without the
      proxy: a connection error (a stopped receiver behind the proxy is still "down");
    - "down": answer 503 with Retry-After: 1, forward nothing;
    - "refuse_next_400": answer the next request with 400 and `refuse_body`, forward nothing,
      then go back to "pass" (exactly one request is refused, however many arrive at once).

    `.requests` lists every request's outcome; `.refused` those not accepted, with their raw
    (snappy-compressed protobuf) bodies; `decode_request(r.request_body)` gives their samples.
    A request whose sender went away during `delay_s` is still forwarded (its outcome is then
    unknown to the sender: the at-least-once case).
    """

    def __init__(self, upstream_url: str, refuse_body: bytes = REFUSE_400_BODY) -> None:
        require_loopback(upstream_url)
        self.upstream_url = upstream_url
        self.refuse_body = refuse_body
        self._lock = threading.Lock()
        self._mode = "pass"
        self.delay_s = 0.0
        self._requests: list[ProxiedRequest] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver offers

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                proxy._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(405, b"FaultProxy only forwards POST\n", {})

            def _answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._handler_cls = Handler
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"FaultProxy:{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The URL to configure instead of the upstream's (same path)."""
        return f"http://127.0.0.1:{self.port}{urllib.parse.urlsplit(self.upstream_url).path}"

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode {value!r} must be one of {MODES}")
        with self._lock:
            self._mode = value

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def refused(self) -> list[ProxiedRequest]:
        return [r for r in self.requests if r.refused]

    def _handle(self, h: Any) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            mode = self._mode
            if mode == "refuse_next_400":
                self._mode = "pass"
        if mode == "down":
            status, answer, headers, origin = 503, b"FaultProxy: receiver down\n", {"Retry-After": "1"}, "proxy"
        elif mode == "refuse_next_400":
            status, answer, headers, origin = 400, self.refuse_body, {"Content-Type": "text/plain"}, "proxy"
        else:
            if self.delay_s > 0:
                time.sleep(self.delay_s)
            fwd = {k: v for k, v in h.headers.items()
                   if k.lower() in ("content-encoding", "content-type", "x-prometheus-remote-write-version",
                                    "user-agent", "authorization")}
            try:
                status, up_headers, answer = http_request("POST", self.upstream_url, body, fwd, timeout=60)
                headers = {k: v for k, v in up_headers.items() if k.lower() in ("content-type", "retry-after")}
                origin = "upstream"
            except OSError as exc:
                status, answer, headers, origin = 0, f"upstream unreachable: {exc}".encode(), {}, "proxy"
        record = ProxiedRequest(at=time.time(), mode=mode, status=status, origin=origin, request_bytes=len(body),
                                request_body=None if 200 <= status < 300 else body, response_body=answer)
        with self._lock:
            self._requests.append(record)
        if status == 0:
            h.close_connection = True  # no answer at all: the sender sees the connection closed
            return
        try:
            h._answer(status, answer, headers)
        except OSError:
            pass  # the sender went away (e.g. it was killed while the request was delayed)

    def accepted_since(self, since: float) -> int:
        """Requests the upstream accepted after `since` (time.time())."""
        return sum(1 for r in self.requests if r.accepted and r.at > since)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "LOOPBACK_HOSTS", "PROMETHEUS", "REMOTE_WRITE_HEADERS", "VICTORIA_METRICS", "FaultProxy",
    "KillableCollector", "Labels", "PrometheusReceiver", "ProxiedRequest", "ReceiverProcess", "Samples",
    "VictoriaMetricsReceiver", "decode_request", "http_request", "labels_of", "ms_to_param",
    "parse_export_line", "post_write", "require_loopback", "total_samples", "value_key", "write_request",
]
