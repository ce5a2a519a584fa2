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

from agent.wire import MetricType

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation: a series identity, its type, a value and when it was taken."""

    name: str
    labels: Labels
    mtype: MetricType
    value: float
    ts_ms: int


def http_get(url: str, timeout: float, headers: dict[str, str] | None = None) -> bytes:
    """GET a URL and return the body; raises OSError (or a subclass) on any failure."""
    import urllib.request

    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (configured URL)
        body: bytes = resp.read()
        return body


@dataclass(frozen=True)
class SourceEnv:
    """Everything a source touches, handed in so tests can substitute recorded data."""

    http_get: Callable[[str, float], bytes] = http_get
    wall_clock: Callable[[], float] = time.time
    proc_root: str = "/proc"
    sys_root: str = "/sys"
    extra: dict[str, object] = field(default_factory=dict)


class Source(Protocol):
    """What the runner needs from a source."""

    name: str

    def probe(self) -> str | None:
        """None if the source can run here, else a one-line reason it cannot."""
        ...

    def collect(self, now: float) -> list[Sample]:
        """Take one reading; `now` is wall-clock seconds for the samples' timestamps."""
        ...
