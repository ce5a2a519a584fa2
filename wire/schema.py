"""Schema rules every reader applies to a data batch's series (docs/wire.md §3.0, "Schema").

The payload format carries any UTF-8 names; a collector exposes them as Prometheus series,
so a batch whose names Prometheus cannot carry is refused whole (`schema`), whichever path
it arrived by. `site` and `node` are ordinary label names here: the collector replaces
them with the header's site and node, which the node's key proved.
"""

from __future__ import annotations

import re

from wire.model import Series

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
RESERVED_LABEL_PREFIX = "__"  # Prometheus keeps these for itself (__name__, __address__)


def schema_problem(series: list[Series]) -> str | None:
    """Why these series cannot be Prometheus series, naming the first offender; None when they can."""
    # Each distinct name is matched once: a batch repeats the same few names many times.
    seen_names: set[str] = set()
    seen_labels: set[str] = set()
    for s in series:
        if s.name not in seen_names:
            if not METRIC_NAME.fullmatch(s.name):
                return f"metric name {s.name[:100]!r} is not a valid Prometheus name"
            seen_names.add(s.name)
        keys = [k for k, _ in s.labels]
        for k in keys:
            if k not in seen_labels:
                if not LABEL_NAME.fullmatch(k) or k.startswith(RESERVED_LABEL_PREFIX):
                    return f"label name {k[:100]!r} of {s.name!r} is not a valid Prometheus name"
                seen_labels.add(k)
        if len(set(keys)) != len(keys):
            return f"series {s.name!r} repeats a label name"
    return None
