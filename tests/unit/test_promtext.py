"""The agent's text-format parser, checked against prometheus_client's parser and writer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.sources import promtext

METRICS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "metrics"
PAGES = sorted(METRICS.glob("*.prom"))


def _key(value: float) -> object:
    return "nan" if math.isnan(value) else value


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_recorded_page_reads_as_prometheus_client_reads_it(page: Path) -> None:
    text = page.read_text()
    ours = [(name, labels, _key(value), ts) for f in promtext.parse(text) for name, labels, value, ts in f.samples]
    # prometheus_client renames a counter `foo`'s samples to foo_total and gives seconds.
    theirs = [
        (s.name, s.labels, _key(s.value), None if s.timestamp is None else round(s.timestamp * 1000))
        for f in text_string_to_metric_families(text)
        for s in f.samples
    ]
    assert len(ours) == len(theirs) > 10
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine[0].removesuffix("_total") == ref[0].removesuffix("_total")
        assert mine[1:] == ref[1:]


def test_families_keep_declared_names_and_types() -> None:
    page = (
        "# HELP req_total Requests.\n# TYPE req_total counter\nreq_total{code=\"200\"} 7\n"
        "req_created{code=\"200\"} 1.7e9\n"
        "# TYPE up counter\nup 3\nup_total 4\nup_created 5\n"
        "# TYPE lat histogram\nlat_bucket{le=\"1\"} 2\nlat_bucket{le=\"+Inf\"} 3\nlat_sum 1.5\nlat_count 3\n"
        "# TYPE q summary\nq{quantile=\"0.5\"} 0.2\nq_sum 4\nq_count 9\n"
        "loose 1\nloose{a=\"b\"} 2\n"
        "# TYPE g gauge\ng 1\ng_sum 2\n"
    )
    got = [(f.name, f.type, [s[0] for s in f.samples]) for f in promtext.parse(page)]
    assert got == [
        ("req_total", "counter", ["req_total"]),
        ("req_created", "untyped", ["req_created"]),
        ("up", "counter", ["up", "up_total", "up_created"]),
        ("lat", "histogram", ["lat_bucket", "lat_bucket", "lat_sum", "lat_count"]),
        ("q", "summary", ["q", "q_sum", "q_count"]),
        ("loose", "untyped", ["loose", "loose"]),
        ("g", "gauge", ["g"]),
        ("g_sum", "untyped", ["g_sum"]),
    ]


def test_line_endings_trailing_commas_blanks_and_timestamps() -> None:
    page = '# TYPE a gauge\r\na{x="1",} 1 1700000000123\r\n\n\ta{ x = "2" , y="z" ,}\t-Inf\nb NaN'
    (a, b) = promtext.parse(page)
    assert a.samples == [("a", {"x": "1"}, 1.0, 1700000000123), ("a", {"x": "2", "y": "z"}, -math.inf, None)]
    assert b.name == "b" and math.isnan(b.samples[0][2])


def test_label_values_hold_escapes_braces_and_other_line_breaks() -> None:
    page = 'a{p="C:\\\\dir",q="say \\"hi\\"",r="two\\nlines",s="} 5",t="x\\ty",u="cr\rin"} 2\n'
    (fam,) = promtext.parse(page)
    assert fam.samples == [
        ("a", {"p": "C:\\dir", "q": 'say "hi"', "r": "two\nlines", "s": "} 5", "t": "x\\ty", "u": "cr\rin"},
            2.0, None)
    ]


@pytest.mark.parametrize(
    ("page", "names"),
    [
        ("ok 1\na{x=1} 1\n", ["line 2", "malformed label set", "a{x=1} 1"]),
        ('a{x="1",x="2"} 1\n', ["line 1", "label 'x' given twice"]),
        ("a 1_000\n", ["line 1", "invalid value '1_000'"]),
        ("a one\n", ["invalid value 'one'"]),
        ("a 1 2 3\n", ["line 1", "not a sample"]),
        ("a 1 NaN\n", ["invalid timestamp 'NaN'"]),
        ("# TYPE a weird\na 1\n", ["line 1", "unknown metric type 'weird'"]),
        ("# TYPE 9a gauge\n", ["invalid metric name '9a'"]),
        ("# TYPE a\n", ["TYPE without a type"]),
        ('a{x="1" 1\n', ["line 1"]),
    ],
)
def test_malformed_lines_are_refused_naming_the_line(page: str, names: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        promtext.parse(page)
    for part in names:
        assert part in str(err.value)


def test_comments_are_ignored() -> None:
    got = promtext.parse("# a comment\n#\n# TYPE\n# EOF\nx 1\n")
    assert [(f.name, f.samples) for f in got] == [("x", [("x", {}, 1.0, None)])]


label_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
sample_values = st.floats(allow_nan=False) | st.sampled_from([math.inf, -math.inf])


@settings(max_examples=150, deadline=None)
@given(rows=st.dictionaries(st.tuples(label_values, label_values), sample_values, min_size=1, max_size=8))
def test_reads_back_whatever_prometheus_client_writes(rows: dict[tuple[str, str], float]) -> None:
    registry = CollectorRegistry()
    gauge = Gauge("written", "Any label text.", ["a", "b"], registry=registry)
    for (a, b), value in rows.items():
        gauge.labels(a, b).set(value)
    (fam,) = [f for f in promtext.parse(generate_latest(registry).decode()) if f.name == "written"]
    assert fam.type == "gauge"
    assert {(labels["a"], labels["b"]): value for _, labels, value, _ in fam.samples} == rows
