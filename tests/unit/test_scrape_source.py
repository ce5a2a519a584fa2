"""The scrape source: every recorded /metrics page, checked against counts taken from the text."""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.config import ScrapeSourceConfig
from agent.sources.base import HTTPStatusError, Sample, SourceEnv, http_get
from agent.sources.scrape import Scrape, parse
from wire import MetricType

HERE = Path(__file__).resolve().parent
METRICS = HERE.parents[2] / "shared" / "fixtures" / "metrics"
if not METRICS.exists():
    METRICS = Path("/work/shared/fixtures/metrics")
PAGES = sorted(METRICS.glob("*.prom"))
TS = 1_700_000_000_000
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def sample_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.split("\n") if ln.strip() and not ln.lstrip().startswith("#")]


def expected_types(text: str) -> dict[str, MetricType]:
    """Sample name -> type, worked out from the page's TYPE lines alone."""
    out: dict[str, MetricType] = {}
    for m in re.finditer(r"^# TYPE (\S+) (\S+)\s*$", text, re.M):
        base, kind = m.groups()
        if kind == "counter":
            out[base] = MetricType.COUNTER
        elif kind == "gauge":
            out[base] = MetricType.GAUGE
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[base + suffix] = MetricType.COUNTER
        elif kind == "summary":
            out[base] = MetricType.GAUGE
            out[base + "_sum"] = out[base + "_count"] = MetricType.COUNTER
    return out


def by_key(samples: list[Sample]) -> dict[tuple[str, frozenset[tuple[str, str]]], Sample]:
    return {(s.name, frozenset(s.labels)): s for s in samples}


def test_fixture_corpus_is_present() -> None:
    assert {p.name for p in PAGES} >= {
        "dcgm-exporter.prom", "node_exporter.prom", "tgi.prom", "torchserve.prom",
        "triton.prom", "vllm.prom",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_sample_line_becomes_one_sample_named_as_on_the_page(page: Path) -> None:
    text = page.read_text()
    lines = sample_lines(text)
    samples = parse(text, "model", [], [], TS)
    assert len(samples) == len(lines)
    assert Counter(s.name for s in samples) == Counter(NAME.match(ln).group(0) for ln in lines)  # type: ignore[union-attr]
    types = expected_types(text)
    for s in samples:
        assert s.mtype == types.get(s.name, MetricType.UNTYPED), s.name
        assert s.ts_ms == TS
        labels = dict(s.labels)
        assert labels["job"] == "model"
        assert list(s.labels) == sorted(s.labels)
    # One sample per series: nothing collapsed, nothing duplicated.
    assert len(by_key(samples)) == len(samples)


def test_exact_counts_per_page() -> None:
    # Counted once by hand with grep -v '^#' | grep -c . and kept here as a second opinion.
    counts = {p.name: len(parse(p.read_text(), "j", [], [], TS)) for p in PAGES}
    assert counts == {
        "dcgm-exporter.prom": 23,
        "node_exporter.prom": 3027,
        "tgi.prom": 1888,
        "torchserve.prom": 45,
        "triton.prom": 377,
        "vllm.prom": 185,
    }


def test_spot_values() -> None:
    pages = {p.name: parse(p.read_text(), "j", [], [], TS) for p in PAGES}

    def value(page: str, name: str, **labels: str) -> Sample:
        key = (name, frozenset({**labels, "job": "j"}.items()))
        return by_key(pages[page])[key]

    # TorchServe's trailing comma inside the label set
    s = value("torchserve.prom", "Requests5XX", Level="Host", Hostname="21c5890122fc")
    assert (s.value, s.mtype) == (60.0, MetricType.COUNTER)
    # TGI declares `# TYPE tgi_request_success counter` without _total: the name stays as is
    assert value("tgi.prom", "tgi_request_input_length_bucket", le="+Inf").value == 109
    assert "tgi_request_success" in {s.name for s in pages["tgi.prom"]}
    assert "tgi_request_success_total" not in {s.name for s in pages["tgi.prom"]}
    # Triton summary quantile (gauge)
    q = value("triton.prom", "nv_inference_request_summary_us",
              model="simple_string", version="1", quantile="0.5")
    assert (q.value, q.mtype) == (3.0, MetricType.GAUGE)
    # dcgm-exporter keeps its upper-case labels and values
    d = value("dcgm-exporter.prom", "DCGM_FI_DEV_MEM_CLOCK", gpu="0",
              UUID="GPU-20c56d28-0da5-6d26-a36a-e7af1ce2586e", device="nvidia0",
              modelName="Tesla T4", Hostname="424773df46e0",
              DCGM_FI_DRIVER_VERSION="460.106.00", DCGM_FI_PROCESS_NAME="/usr/bin/dcgm-exporter")
    assert (d.value, d.mtype) == (405.0, MetricType.GAUGE)
    v = value("vllm.prom", "python_gc_objects_collected_total", generation="1")
    assert (v.value, v.mtype) == (4936.0, MetricType.COUNTER)
    cpu = value("node_exporter.prom", "node_cpu_seconds_total", cpu="0", mode="idle")
    assert cpu.value == 10870.69


def test_types_of_every_kind_and_created_dropped() -> None:
    page = (
        "# TYPE req_total counter\nreq_total{code=\"200\"} 5\nreq_created{code=\"200\"} 1.7e9\n"
        "# TYPE legacy counter\nlegacy 3\n"
        "# TYPE lat histogram\nlat_bucket{le=\"0.1\"} 1\nlat_bucket{le=\"+Inf\"} 2\n"
        "lat_sum 0.3\nlat_count 2\nlat_created 1.7e9\n"
        "# TYPE q summary\nq{quantile=\"0.5\"} NaN\nq_sum 1\nq_count 1\nq_created 1.7e9\n"
        "# TYPE temp gauge\ntemp -1.5\n"
        "# TYPE build info\nbuild{version=\"1\"} 1\n"
        "# TYPE up_created gauge\nup_created 9\n"  # a gauge that merely ends in _created
        "bare 7"
    )
    got = {(s.name, tuple(s.labels)): s for s in parse(page, "j", [], [], TS)}
    types = {name: s.mtype for (name, _), s in got.items()}
    assert types == {
        "req_total": MetricType.COUNTER,
        "legacy": MetricType.COUNTER,
        "lat_bucket": MetricType.COUNTER,
        "lat_sum": MetricType.COUNTER,
        "lat_count": MetricType.COUNTER,
        "q": MetricType.GAUGE,
        "q_sum": MetricType.COUNTER,
        "q_count": MetricType.COUNTER,
        "temp": MetricType.GAUGE,
        "build": MetricType.GAUGE,
        "up_created": MetricType.GAUGE,
        "bare": MetricType.UNTYPED,
    }
    assert len(got) == 13  # two buckets
    assert math.isnan(got[("q", (("job", "j"), ("quantile", "0.5")))].value)
    assert got[("lat_bucket", (("job", "j"), ("le", "+Inf")))].value == 2


def test_job_label_and_exported_job() -> None:
    page = 'a{job="node",x="1"} 1\nb{job="n",exported_job="m"} 2\nc 3\n'
    got = {s.name: dict(s.labels) for s in parse(page, "vllm", [], [], TS)}
    assert got["a"] == {"job": "vllm", "exported_job": "node", "x": "1"}
    assert got["b"] == {"job": "vllm", "exported_exported_job": "n", "exported_job": "m"}
    assert got["c"] == {"job": "vllm"}


def test_scraped_site_and_node_labels_move_aside() -> None:
    """node_exporter's NUMA `node` label must not collide with the fleet's node label."""
    page = 'node_memory_numa_foreign_total{node="0"} 5\nx{site="a",exported_site="b"} 1\n'
    got = {s.name: dict(s.labels) for s in parse(page, "ne", [], [], TS)}
    assert got["node_memory_numa_foreign_total"] == {"job": "ne", "exported_node": "0"}
    assert got["x"] == {"job": "ne", "exported_exported_site": "a", "exported_site": "b"}


def test_explicit_timestamps_are_kept() -> None:
    page = "a 1 1700000000123\nb 2\nc 3 -5\n"
    got = {s.name: s.ts_ms for s in parse(page, "j", [], [], TS)}
    assert got == {"a": 1700000000123, "b": TS, "c": -5}


def test_allow_and_deny_fullmatch_sample_names() -> None:
    text = (METRICS / "vllm.prom").read_text()
    names = Counter(NAME.match(ln).group(0) for ln in sample_lines(text))  # type: ignore[union-attr]
    allowed = parse(text, "j", [r"vllm:.*"], [r".*_bucket"], TS)
    expect = sum(n for name, n in names.items()
                 if name.startswith("vllm:") and not name.endswith("_bucket"))
    assert expect > 0 and len(allowed) == expect
    # fullmatch, not search: "vllm" alone matches no name
    assert parse(text, "j", ["vllm"], [], TS) == []
    # deny alone removes exactly the denied names
    no_python = parse(text, "j", [], [r"python_.*", "process_.*"], TS)
    assert len(no_python) == sum(
        n for name, n in names.items() if not name.startswith(("python_", "process_"))
    )


def test_duplicate_series_in_a_page_keeps_the_first() -> None:
    got = parse('a{x="1"} 1\na{x="1"} 2\na{x="2"} 3\n', "j", [], [], TS)
    assert [(dict(s.labels)["x"], s.value) for s in got] == [("1", 1.0), ("2", 3.0)]


def test_unparseable_page_raises() -> None:
    with pytest.raises(ValueError):
        parse("# TYPE a weird\na 1\n", "j", [], [], TS)
    with pytest.raises(ValueError):
        parse("a{x=1} 1\n", "j", [], [], TS)


@pytest.fixture
def served_page() -> Iterator[tuple[str, bytes]]:
    body = (METRICS / "triton.prom").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/moved":
                self.send_response(301)
                self.send_header("Location", "/metrics")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path != "/metrics":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_collect_over_real_http(served_page: tuple[str, bytes]) -> None:
    base, body = served_page
    source = Scrape(ScrapeSourceConfig(name="triton", url=base + "/metrics"), SourceEnv())
    assert source.name == "triton"
    assert source.probe() is None
    samples = source.collect(1_700_000_000.5)
    # Every page line, plus the source's own dropped-series counter (nothing dropped).
    assert len(samples) == len(sample_lines(body.decode())) + 1
    assert samples[-1].name == "waystation_scrape_series_dropped_total" and samples[-1].value == 0
    assert {s.ts_ms for s in samples} == {1_700_000_000_500}
    assert {dict(s.labels)["job"] for s in samples} == {"triton"}

    missing = Scrape(ScrapeSourceConfig(name="t", url=base + "/nope"), SourceEnv())
    with pytest.raises(OSError, match="/nope: HTTP 404"):
        missing.collect(0.0)


def test_http_get_names_what_went_wrong(served_page: tuple[str, bytes]) -> None:
    base, body = served_page
    assert http_get(base + "/metrics", 5) == body
    with pytest.raises(HTTPStatusError, match=r"HTTP 301 .*\(redirects to /metrics\)"):
        http_get(base + "/moved", 5)
    with pytest.raises(OSError, match=f"body larger than {len(body) - 1} bytes"):
        http_get(base + "/metrics", 5, max_bytes=len(body) - 1)
    with pytest.raises(OSError, match="not an http"):
        http_get("ftp://127.0.0.1/metrics", 5)
