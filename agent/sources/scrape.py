"""Scrape a Prometheus text-format /metrics page (vLLM, Triton, TGI, TorchServe, dcgm-exporter).

Raw I/O (the HTTP GET through env.http_get) lives in Scrape.collect(); `parse()` turns
page text into samples and is what the tests drive with recorded pages. Names and
labels are kept exactly as scraped; only `job` is added, as Prometheus does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from agent.config import ScrapeSourceConfig
from agent.sources import promtext
from agent.sources.base import Sample, SourceEnv
from wire import MetricType

G = MetricType.GAUGE
C = MetricType.COUNTER

# Sample-name suffix -> type, per family type. The empty suffix is the family name itself.
_SUFFIX_TYPES: dict[str, dict[str, MetricType]] = {
    "counter": {"_total": C, "": C},
    "histogram": {"_bucket": C, "_count": C, "_sum": C},
    "gaugehistogram": {"_bucket": G, "_gcount": G, "_gsum": G},
    "summary": {"": G, "_count": C, "_sum": C},
    "gauge": {"": G},
    "info": {"": G, "_info": G},
    "stateset": {"": G},
    "unknown": {"": MetricType.UNTYPED},
    "untyped": {"": MetricType.UNTYPED},
}
# Families whose `<base>_created` sample carries a creation time, not a value.
_HAS_CREATED = ("counter", "histogram", "gaugehistogram", "summary")


def _base(family: promtext.Family) -> str:
    """The name a family's suffixes hang off: a counter declared `foo_total` owns `foo_created`."""
    if family.type == "counter" and family.name.endswith("_total"):
        return family.name[:-6]
    return family.name


def _compile(patterns: Iterable[str | re.Pattern[str]]) -> re.Pattern[str] | None:
    sources = [p.pattern if isinstance(p, re.Pattern) else p for p in patterns]
    if not sources:
        return None
    return re.compile("|".join(f"(?:{s})" for s in sources))


SERIES_DROPPED = "waystation_scrape_series_dropped_total"

# Labels the fleet owns: job is set here, site and node by the collector from the signed header.
RESERVED_LABELS = ("job", "site", "node")


def _with_job(labels: dict[str, str], job: str) -> tuple[tuple[str, str], ...]:
    """Add job=..., moving a scraped job/site/node (e.g. a NUMA node label) aside as Prometheus does."""
    labels = dict(labels)
    for name in RESERVED_LABELS:
        if name in labels:
            moved = "exported_" + name
            while moved in labels:
                moved = "exported_" + moved
            labels[moved] = labels.pop(name)
    labels["job"] = job
    return tuple(sorted(labels.items()))


def parse(
    text: str,
    job: str,
    allow: Sequence[str | re.Pattern[str]],
    deny: Sequence[str | re.Pattern[str]],
    ts_ms: int,
) -> list[Sample]:
    """Page text -> samples; allow/deny regexes fullmatch the sample name (empty allow = all).

    Raises ValueError on a malformed page, naming the line.
    """
    return [s for family in parse_families(text, job, allow, deny, ts_ms) for s in family]


def limit_series(families: Iterable[list[Sample]], max_series: int) -> tuple[list[Sample], int]:
    """Keep whole families, in page order, while they fit in max_series; return (kept, dropped).

    A family that does not fit is dropped whole (half a histogram would give wrong
    quantiles) and later, smaller families may still fit: the family whose labels
    exploded goes, the rest of the server's metrics stay.
    """
    kept: list[Sample] = []
    dropped = 0
    for family in families:
        if len(kept) + len(family) <= max_series:
            kept.extend(family)
        else:
            dropped += len(family)
    return kept, dropped


def parse_families(
    text: str,
    job: str,
    allow: Sequence[str | re.Pattern[str]],
    deny: Sequence[str | re.Pattern[str]],
    ts_ms: int,
) -> list[list[Sample]]:
    """parse(), grouped by metric family in page order (families left empty are omitted)."""
    allow_re = _compile(allow)
    deny_re = _compile(deny)
    families = promtext.parse(text)
    created = {_base(f) + "_created" for f in families if f.type in _HAS_CREATED}
    decided: dict[str, bool] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    grouped: list[list[Sample]] = []
    for fam in families:
        out: list[Sample] = []
        suffixes = _SUFFIX_TYPES.get(fam.type, {"": MetricType.UNTYPED})
        base = _base(fam)
        for name, scraped_labels, value, ts in fam.samples:
            if name in created:
                continue
            mtype = suffixes.get(name[len(base):] if name.startswith(base) else "")
            if mtype is None:
                mtype = MetricType.UNTYPED
            ok = decided.get(name)
            if ok is None:
                ok = (allow_re is None or allow_re.fullmatch(name) is not None) and (
                    deny_re is None or deny_re.fullmatch(name) is None
                )
                decided[name] = ok
            if not ok:
                continue
            labels = _with_job(scraped_labels, job)
            # A repeated series in one page: Prometheus keeps the first and drops the rest.
            if (name, labels) in seen:
                continue
            seen.add((name, labels))
            out.append(Sample(name, labels, mtype, value, ts_ms if ts is None else ts))
        if out:
            grouped.append(out)
    return grouped


class Scrape:
    """A [[sources.scrape]] entry: one /metrics URL, its samples labelled job=<name>.

    With a preset (vllm, triton, tgi, torchserve) the config already carries the preset's
    URL; here the preset's family list becomes the allow-list unless `allow` is given.
    Every collect() also emits waystation_scrape_series_dropped_total{job}: series beyond
    max_series dropped so far (a counter from 0, so rate() sees the first drop).
    """

    def __init__(self, config: ScrapeSourceConfig, env: SourceEnv) -> None:
        self.config = config
        self.env = env
        self.name = config.name
        allow: tuple[str, ...] = config.allow
        if not allow and config.preset:
            from agent.sources.scrape_presets import PRESETS

            allow = PRESETS[config.preset].allow()
        # Compiled once; parse() accepts compiled patterns as they are.
        self._allow = [re.compile(p) for p in allow]
        self._deny = [re.compile(p) for p in config.deny]
        self.series_dropped = 0
        # A page with families dropped over max_series is incomplete: a dropped counter family
        # that fits later must not look born (agent/runner.py, counter births).
        self.partial = False

    def probe(self) -> str | None:
        """Always runnable: the endpoint may come up later, and each failed GET is counted."""
        return None

    def collect(self, now: float) -> list[Sample]:
        """GET the page once and parse it; called from this source's worker thread."""
        body = self.env.http_get(self.config.url, float(self.config.timeout))
        text = body.decode("utf-8", errors="replace")
        return self.parse_page(text, round(now * 1000))

    def parse_page(self, text: str, ts_ms: int) -> list[Sample]:
        """One page through this entry's allow/deny lists and series limit (pure but for the count)."""
        families = parse_families(text, self.name, self._allow, self._deny, ts_ms)
        kept, dropped = limit_series(families, self.config.max_series)
        self.series_dropped += dropped
        self.partial = dropped > 0
        kept.append(Sample(SERIES_DROPPED, (("job", self.name),), C, float(self.series_dropped), ts_ms))
        return kept
