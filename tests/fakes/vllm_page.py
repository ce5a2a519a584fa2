"""A vLLM /metrics page on loopback whose counters move, made from the recorded page.

The recorded page (../shared/fixtures/metrics/vllm.prom, read in place) is one moment of a
vLLM server: its counters never move, so rate() over it is 0 and every latency quantile is
NaN. Served from here, the page is the same text (same families, order, HELP/TYPE lines,
label sets and the missing final newline) with every sample of a counter or histogram family
(`_bucket`, `_count`, `_sum`) multiplied by 1 + t / period, t the seconds since the server
started: the recorded traffic repeats once per `period_s`. Scaling every bucket by the same
factor keeps each histogram consistent (buckets rise with `le`, `+Inf` equals `_count`) and
its quantiles equal to the recorded ones. Gauges keep their recorded values.

`abort_ratio` > 0 adds `vllm:request_success_total{finished_reason="abort",...}` beside the
recorded `finished_reason="length"` series (same other labels), born at 0 and growing so that
aborted / all finished requests == abort_ratio: a server that aborts that share of its
requests. With 0 (the default) no abort series exists at all, as on a server that never
aborted a request: rules and panels must then show a ratio of 0, not nothing.

    with VllmPage(abort_ratio=0.1) as page:   # page.url: http://127.0.0.1:PORT/metrics
        ...

Only loopback is listened on. Run as a script, it serves until interrupted:
    python tests/fakes/vllm_page.py [--abort-ratio 0.1] [--port N]
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VLLM_PROM = Path(os.environ.get("WAYSTATION_SHARED", REPO.parent / "shared")) / "fixtures" / "metrics" / "vllm.prom"

MOVING_TYPES = ("counter", "histogram")
SUCCESS = "vllm:request_success_total"
# `name{labels} value` (a label value may hold spaces: the value is after the last "}").
_SAMPLE = re.compile(r"^(?P<name>[^\s{]+)(?P<labels>\{.*\})?\s+(?P<value>\S+)(?P<ts>\s+\S+)?$")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)")


def family_of(name: str, types: dict[str, str]) -> str | None:
    """The TYPE of the family a sample name belongs to (histogram samples carry a suffix)."""
    if name in types:
        return types[name]
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
            return "histogram"
    return None


def fmt(v: float) -> str:
    return repr(float(v))


@dataclass(frozen=True)
class _Sample:
    """One sample line: the text before and after its value, and how the value moves."""

    prefix: str
    base: float  # the recorded value; for "abort", the recorded "length" series' value
    suffix: str
    kind: str  # "moving" (counters, histograms) or "abort" (the added series)


class MovingPage:
    """The recorded page's text, rendered for a given elapsed time (pure; the server's core)."""

    def __init__(self, text: str, period_s: float = 10.0, abort_ratio: float = 0.0) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be positive")
        if not 0.0 <= abort_ratio < 1.0:
            raise ValueError("abort_ratio must be in [0, 1)")
        self.period_s = period_s
        self.abort_ratio = abort_ratio
        self.final_newline = text.endswith("\n")
        self._lines: list[str | _Sample] = []
        types: dict[str, str] = {}
        for line in text.splitlines():
            m = _TYPE.match(line)
            if m:
                types[m.group(1)] = m.group(2)
            s = None if line.startswith("#") else _SAMPLE.match(line)
            if s is None:
                self._lines.append(line)
                continue
            if family_of(s.group("name"), types) not in MOVING_TYPES:
                self._lines.append(line)  # gauges: the recorded text as it is
                continue
            prefix, base = line[: s.start("value")], float(s.group("value"))
            self._lines.append(_Sample(prefix, base, line[s.end("value"):], "moving"))
            if abort_ratio > 0 and s.group("name") == SUCCESS and 'finished_reason="length"' in prefix:
                aborted = prefix.replace('finished_reason="length"', 'finished_reason="abort"')
                self._lines.append(_Sample(aborted, base, "", "abort"))
        if not any(isinstance(x, _Sample) for x in self._lines):
            raise ValueError("the page has no counter or histogram samples")

    def factor(self, elapsed_s: float) -> float:
        return 1.0 + max(elapsed_s, 0.0) / self.period_s

    def value(self, sample: _Sample, elapsed_s: float) -> float:
        f = self.factor(elapsed_s)
        if sample.kind == "abort":  # aborted / (aborted + the length series' growth) == abort_ratio
            return sample.base * (f - 1.0) * self.abort_ratio / (1.0 - self.abort_ratio)
        return sample.base * f

    def render(self, elapsed_s: float) -> bytes:
        out = [x if isinstance(x, str) else x.prefix + fmt(self.value(x, elapsed_s)) + x.suffix
               for x in self._lines]
        return ("\n".join(out) + ("\n" if self.final_newline else "")).encode()


class VllmPage:
    """MovingPage served over HTTP on 127.0.0.1 (any path answers the page)."""

    def __init__(self, fixture: Path = VLLM_PROM, period_s: float = 10.0, abort_ratio: float = 0.0,
                 port: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.page = MovingPage(fixture.read_text(), period_s, abort_ratio)
        self.clock = clock
        self.started = clock()
        self.requests = 0
        page = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                body = page.page.render(page.clock() - page.started)
                page.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"vllm-page:{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def __enter__(self) -> VllmPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--period", type=float, default=10.0, help="seconds per repeat of the recorded traffic")
    ap.add_argument("--abort-ratio", type=float, default=0.0)
    args = ap.parse_args()
    with VllmPage(period_s=args.period, abort_ratio=args.abort_ratio, port=args.port) as page:
        print(page.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
