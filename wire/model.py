"""The data model both sides share: metric types, series, limits, and the one error type.

Everything in wire/ is pure: bytes in, bytes or dataclasses out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1


class MetricType(IntEnum):
    GAUGE = 0
    COUNTER = 1
    UNTYPED = 2
    INFO = 3



class WireError(ValueError):
    """A batch that cannot be accepted; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Series(NamedTuple):
    """One time series in a batch: identity plus its points, oldest first.

    A NamedTuple rather than a frozen dataclass: the collector builds one per series it
    decodes, and tuple construction is several times cheaper."""

    name: str
    labels: tuple[tuple[str, str], ...]
    mtype: MetricType
    timestamps_ms: tuple[int, ...]
    values: tuple[float, ...]



@dataclass(frozen=True)
class Limits:
    """Schema and cardinality limits the decoder enforces (collector input is hostile)."""

    max_series: int = 200_000
    max_samples: int = 5_000_000
    max_labels: int = 64
    max_string_len: int = 4096

