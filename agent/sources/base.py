"""The source contract: what every source module provides and what it may touch.

Who calls what:
- the runner builds each enabled source once, from its options and a SourceEnv;
- `probe()` is called once at start, from the runner's thread; a non-None answer
  ("unavailable: no NVIDIA driver") disables the source and is logged once;
- `collect(now)` is called every interval from that source's own worker thread,
  never concurrently with itself; it may raise, which the runner counts in
  waystation_source_errors_total{source,stage="collect"} and retries next interval.
Raw I/O stays in collect(); turning raw bytes into samples is a pure `parse(raw)`
function in the source module, which tests drive with recorded outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from wire import MetricType

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation: a series identity, its type, a value and when it was taken."""

    name: str
    labels: Labels
    mtype: MetricType
    value: float
    ts_ms: int


# A /metrics page beyond this is a misconfigured or exploding target, not telemetry to keep.
MAX_BODY_BYTES = 32 * 1024 * 1024


class HTTPStatusError(OSError):
    """The target answered, but not with 200."""


def http_get(url: str, timeout: float, headers: dict[str, str] | None = None,
             max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """GET a URL and return the body; raises OSError (or a subclass) on any failure.

    http.client, not urllib.request: the uplink already loads it, and urllib.request
    would add its own modules (~0.1 MB of RSS here, more where nothing else loads them).
    Redirects are not followed: a /metrics endpoint that redirects is misconfigured, and
    the error says where it points.
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError(f"{url}: not an http(s) URL")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        import ssl  # http.client has loaded it already; this only names it

        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1",
                                           "User-Agent": "waystation-agent/1", **(headers or {})})
        resp = conn.getresponse()
        if resp.status != 200:
            where = resp.getheader("Location")
            raise HTTPStatusError(f"{url}: HTTP {resp.status} {resp.reason}"
                                  + (f" (redirects to {where})" if where else ""))
        body = resp.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise OSError(f"{url}: body larger than {max_bytes} bytes")
        return body
    except http.client.HTTPException as exc:
        raise OSError(f"{url}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


@dataclass(frozen=True)
class SourceEnv:
    """Everything a source touches, handed in so tests can substitute recorded data."""

    http_get: Callable[[str, float], bytes] = http_get
    wall_clock: Callable[[], float] = time.time
    proc_root: str = "/proc"
    sys_root: str = "/sys"
    extra: dict[str, object] = field(default_factory=dict)


class Source(Protocol):
    """What the runner needs from a source.

    Optionally a source sets `partial = True` after a collect that may lack counters it has
    (a read that failed this once, families dropped over a limit), so that a counter showing
    up later is not taken for one born at its first event (agent/runner.py); absent: False.
    """

    name: str

    def probe(self) -> str | None:
        """None if the source can run here, else a one-line reason it cannot."""
        ...

    def collect(self, now: float) -> list[Sample]:
        """Take one reading; `now` is wall-clock seconds for the samples' timestamps."""
        ...
