"""Scrape presets: each recorded model-server page through its preset, and the series limit."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from agent.config import ScrapeSourceConfig
from agent.sources.base import Sample, SourceEnv
from agent.sources.scrape import SERIES_DROPPED, Scrape
from agent.sources.scrape_presets import PRESETS
from wire import MetricType
from wire.config import ConfigError

HERE = Path(__file__).resolve().parent
METRICS = HERE.parents[2] / "shared" / "fixtures" / "metrics"
if not METRICS.exists():
    METRICS = Path("/work/shared/fixtures/metrics")
TS = 1_700_000_000_000
C, G = MetricType.COUNTER, MetricType.GAUGE

# Series each page keeps through its preset: counted by hand from the pages (sample lines
# minus vLLM's 10 python_* and 6 process_* lines) and re-derived from the text below.
EXPECTED = {"vllm": 169, "triton": 377, "tgi": 1888, "torchserve": 45}
# The server's own metrics on each page, by name prefix (TorchServe's have none: all of them).
OWN = {"vllm": "vllm:", "triton": "nv_", "tgi": "tgi_", "torchserve": ""}


def sample_lines(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.strip() and not ln.startswith("#")]


def run(preset: str, **options: object) -> tuple[Scrape, list[Sample]]:
    source = Scrape(ScrapeSourceConfig(preset=preset, **options), SourceEnv())  # type: ignore[arg-type]
    return source, source.parse_page((METRICS / f"{preset}.prom").read_text(), TS)


def value(samples: list[Sample], name: str, **labels: str) -> float:
    want = frozenset(labels.items())
    found = [s for s in samples if s.name == name and frozenset(s.labels) == want]
    assert len(found) == 1, (name, labels, len(found))
    return found[0].value


def test_presets_default_url_and_name() -> None:
    assert {p: (ScrapeSourceConfig(preset=p).name, ScrapeSourceConfig(preset=p).url) for p in PRESETS} == {
        "vllm": ("vllm", "http://127.0.0.1:8000/metrics"),
        "triton": ("triton", "http://127.0.0.1:8002/metrics"),
        "tgi": ("tgi", "http://127.0.0.1:3000/metrics"),
        "torchserve": ("torchserve", "http://127.0.0.1:8082/metrics"),
    }
    own = ScrapeSourceConfig(name="llm", preset="vllm", url="http://10.0.0.5:9000/metrics")
    assert (own.name, own.url) == ("llm", "http://10.0.0.5:9000/metrics")
    with pytest.raises(ValueError, match="not one of"):
        ScrapeSourceConfig(preset="ollama")
    with pytest.raises(ValueError, match="url"):
        ScrapeSourceConfig(name="x")
    with pytest.raises(ValueError, match="max_series"):
        ScrapeSourceConfig(preset="tgi", max_series=0)


def test_preset_from_toml(tmp_path: Path) -> None:
    from agent.config import load_agent_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[[sources.scrape]]\npreset = "triton"\nmax_series = 500\n')
    (sc,) = load_agent_config(cfg).sources.scrape
    assert (sc.name, sc.url, sc.max_series) == ("triton", "http://127.0.0.1:8002/metrics", 500)
    cfg.write_text('[[sources.scrape]]\npreset = "trtion"\n')
    with pytest.raises(ConfigError, match="sources.scrape"):
        load_agent_config(cfg)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_each_page_through_its_preset(preset: str) -> None:
    text = (METRICS / f"{preset}.prom").read_text()
    own = [ln for ln in sample_lines(text) if ln.startswith(OWN[preset])]
    assert len(own) == EXPECTED[preset]
    source, samples = run(preset)
    *kept, dropped = samples
    assert (dropped.name, dropped.labels, dropped.mtype, dropped.value) == (SERIES_DROPPED, (("job", preset),), C, 0)
    assert len(kept) == EXPECTED[preset]
    # Names kept exactly as the server wrote them, one sample per page line.
    assert Counter(s.name for s in kept) == Counter(re.match(r"[^{ ]+", ln).group(0) for ln in own)  # type: ignore[union-attr]
    assert all(dict(s.labels)["job"] == preset and s.ts_ms == TS for s in kept)
    # Histograms stay histograms: per label set, every bucket plus _sum and _count, all counters.
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
    for family, kind in declared.items():
        if kind == "counter":
            assert all(s.mtype == C for s in kept if s.name == family), family
        if kind != "histogram" or not family.startswith(OWN[preset]):
            continue
        buckets = [s for s in kept if s.name == family + "_bucket"]
        assert len(buckets) == text.count(f"\n{family}_bucket{{") and buckets, family
        assert all(s.mtype == C for s in kept if s.name.startswith(family + "_"))
        sets = {frozenset((k, v) for k, v in s.labels if k != "le") for s in buckets}
        for suffix in ("_sum", "_count"):
            assert {frozenset(s.labels) for s in kept if s.name == family + suffix} == sets, family
        # Every label set ends in a +Inf bucket equal to its _count.
        for labels in sets:
            inf = [s.value for s in buckets if frozenset(s.labels) == labels | {("le", "+Inf")}]
            count = [s.value for s in kept if s.name == family + "_count" and frozenset(s.labels) == labels]
            assert inf == count, family


def test_spot_values() -> None:
    _, vllm = run("vllm")
    m = {"model_name": "facebook/opt-125m", "job": "vllm"}
    assert value(vllm, "vllm:prompt_tokens_total", **m) == 5.0
    assert value(vllm, "vllm:time_to_first_token_seconds_count", **m) == 1.0
    assert value(vllm, "vllm:time_to_first_token_seconds_sum", **m) == 0.31326723098754883
    assert value(vllm, "vllm:time_to_first_token_seconds_bucket", le="0.04", **m) == 0.0
    assert not [s for s in vllm if s.name.startswith(("python_", "process_"))]

    _, triton = run("triton")
    d = {"model": "densenet_onnx", "version": "1", "job": "triton"}
    assert value(triton, "nv_inference_request_success", **d) == 3
    assert [s.mtype for s in triton if s.name == "nv_inference_request_success"][0] == C
    assert value(triton, "nv_inference_count", **d) == 3
    # Summaries: quantiles are gauges, _sum/_count counters.
    q = [s for s in triton if s.name == "nv_inference_request_summary_us"]
    assert q and all(s.mtype == G and "quantile" in dict(s.labels) for s in q)

    _, tgi = run("tgi")
    # Long float bucket bounds survive as written by the Rust exporter.
    assert value(tgi, "tgi_request_duration_bucket", le="0.00015000000000000001", job="tgi") == 0
    assert value(tgi, "tgi_request_skipped_tokens", quantile="0", job="tgi") == 0

    _, ts = run("torchserve")
    # Trailing commas in label sets: labels parsed whole, names kept without a prefix.
    assert value(ts, "Requests5XX", Level="Host", Hostname="21c5890122fc", job="torchserve") == 60.0
    assert value(ts, "ts_inference_requests_total", model_name="linear_regression_1_1",
                 model_version="default", hostname="21c5890122fc", job="torchserve") == 11.0
    assert value(ts, "HandlerTime", ModelName="linear_regression_2_3", Level="Model",
                 Hostname="21c5890122fc", job="torchserve") == 0.92


def test_own_allow_replaces_the_preset_list_and_deny_applies_on_top() -> None:
    _, samples = run("vllm", allow=("process_.*",))
    assert {s.name for s in samples} - {SERIES_DROPPED} == {
        "process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
        "process_cpu_seconds_total", "process_open_fds", "process_max_fds"}
    _, samples = run("vllm", deny=("vllm:request_.*",))
    assert not [s for s in samples if s.name.startswith("vllm:request_")]
    assert [s for s in samples if s.name == "vllm:prompt_tokens_total"]


def test_series_limit_drops_whole_families_and_counts() -> None:
    page = (
        "# TYPE a gauge\na{i=\"1\"} 1\na{i=\"2\"} 2\na{i=\"3\"} 3\n"
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n"
        "# TYPE c counter\nc_total{x=\"y\"} 7\nc_total{x=\"z\"} 8\n"
    )
    source = Scrape(ScrapeSourceConfig(name="s", url="http://127.0.0.1:1/m", max_series=6), SourceEnv())
    first = source.parse_page(page, TS)
    # a (3) fits, h (4) would make 7 > 6 and goes whole, c (2) still fits.
    assert [s.name for s in first] == ["a", "a", "a", "c_total", "c_total", SERIES_DROPPED]
    assert first[-1].value == 4 and first[-1].mtype == C
    assert source.parse_page(page, TS + 10_000)[-1].value == 8  # a counter across scrapes


def test_series_limit_on_a_real_page() -> None:
    source, samples = run("tgi", max_series=300)
    *kept, dropped = samples
    assert 0 < len(kept) <= 300
    assert dropped.value == EXPECTED["tgi"] - len(kept)
    _, full = run("tgi")
    families_full = Counter(re.sub(r"_(bucket|sum|count)$", "", s.name) for s in full[:-1])
    families_kept = Counter(re.sub(r"_(bucket|sum|count)$", "", s.name) for s in kept)
    # Whatever was kept was kept whole.
    assert all(families_kept[f] == families_full[f] for f in families_kept)
