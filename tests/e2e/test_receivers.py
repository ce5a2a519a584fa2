"""The remote-write harness itself (tests/e2e/receivers.py), against the real binaries:
Prometheus 2.42 and VictoriaMetrics 1.79 (Debian) accept remote-write requests built with
collector.remote_write_proto, `.samples()` gives back exactly what was written with its
original timestamps (old, out of order), both restart on the same port and data, and the
FaultProxy's modes do what the scenarios in test_remote_write.py rely on.

The receivers' answers asserted here are what was observed with those versions; the
forwarder's classification of answers (collector/remote_write.py, classify) depends on them.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.receivers import (
    PROMETHEUS,
    REFUSE_400_BODY,
    VICTORIA_METRICS,
    FaultProxy,
    PrometheusReceiver,
    Samples,
    VictoriaMetricsReceiver,
    decode_request,
    http_request,
    labels_of,
    parse_export_line,
    post_write,
    require_loopback,
    write_request,
)
from tests.integration.harness import wait_for

needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="needs prometheus (apt-get install prometheus)")
needs_vm = pytest.mark.skipif(VICTORIA_METRICS is None,
                              reason="needs victoria-metrics (apt-get install victoria-metrics)")

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR


def now_ms() -> int:
    return int(time.time() * 1000)


def series(name: str, **labels: str) -> dict[str, str]:
    return {"__name__": name, "site": "lab", "node": "node-1", **labels}


def expected(*entries: tuple[dict[str, str], list[tuple[int, float]]]) -> Samples:
    out: Samples = {}
    for labels, points in entries:
        out.setdefault(labels_of(labels), []).extend(points)
    for pts in out.values():
        pts.sort(key=lambda p: p[0])
    return out


def write(url: str, *entries: tuple[dict[str, str], list[tuple[int, float]]]) -> tuple[int, bytes]:
    return post_write(url, write_request(entries))


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusReceiver]:
    if PROMETHEUS is None:
        pytest.skip("needs prometheus")
    r = PrometheusReceiver(tmp_path_factory.mktemp("prom"))
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetricsReceiver]:
    if VICTORIA_METRICS is None:
        pytest.skip("needs victoria-metrics")
    r = VictoriaMetricsReceiver(tmp_path_factory.mktemp("vm"))
    r.start()
    try:
        yield r
    finally:
        r.stop()


# -- Prometheus 2.42 ----------------------------------------------------------------------------

@needs_prometheus
def test_prometheus_config_has_the_out_of_order_window(prom: PrometheusReceiver) -> None:
    status, _, body = http_request("GET", prom.base_url + "/api/v1/status/config")
    assert status == 200
    assert "out_of_order_time_window: 1d" in json.loads(body)["data"]["yaml"]


@needs_prometheus
def test_prometheus_returns_raw_samples_with_original_timestamps(prom: PrometheusReceiver) -> None:
    t = now_ms()
    a = series("rt_prom_raw", job="scrape")
    b = series("rt_prom_raw:window_mean", job="scrape")  # same labels as a but __name__
    # In order, then older ones out of order in the same request and in a later one.
    first = [(t - 10_123, 1.5), (t - 30_007, 2.25), (t - 20_001, 3.0)]
    later = [(t - 3 * HOUR, 4.0), (t - 23 * HOUR, 5.5), (t - 1, 6.0)]
    assert write(prom.write_url, (a, first), (b, [(t - 5 * HOUR - 17, 0.125)])) == (204, b"")
    assert write(prom.write_url, (a, later)) == (204, b"")

    got = prom.samples('{__name__=~"rt_prom_raw.*"}', t - DAY, t)
    assert got == expected((a, first + later), (b, [(t - 5 * HOUR - 17, 0.125)]))
    # Both ends of the range are included; nothing outside it.
    assert prom.samples("rt_prom_raw", t - 30_007, t - 10_123) == expected((a, first))
    assert prom.samples("rt_prom_raw", t - 30_006, t - 10_124) == expected((a, [(t - 20_001, 3.0)]))
    assert prom.samples("rt_prom_raw", t - 1, t - 1) == expected((a, [(t - 1, 6.0)]))
    assert prom.samples("rt_prom_raw_none", t - DAY, t) == {}


@needs_prometheus
def test_prometheus_refusals_as_observed_in_2_42(prom: PrometheusReceiver) -> None:
    """What the forwarder sees. Recorded with Debian's prometheus 2.42.0+ds:

    - older than the out-of-order window (newest sample in the head - 1d), for an existing
      or a new series: 500, body "too old sample\\n" (2.50+ answers 400);
    - another value at the newest timestamp of a series: 400 "duplicate sample for timestamp\\n";
    - the same sample again: 204 (in order or out of order); another value at an older,
      out-of-order timestamp: 204, and the first value stays;
    - one refused sample refuses the whole request: nothing of it is stored."""
    t = now_ms()
    s = series("rt_prom_refuse")
    good = series("rt_prom_refuse_good")
    assert write(prom.write_url, (s, [(t - 2 * HOUR, 1.0), (t, 2.0)])) == (204, b"")

    status, body = write(prom.write_url, (good, [(t, 7.0)]), (s, [(t - 2 * DAY, 3.0), (t - 500, 4.0)]))
    assert (status, body) == (500, b"too old sample\n")
    status, body = write(prom.write_url, (series("rt_prom_refuse_new"), [(t - 2 * DAY, 3.0)]))
    assert (status, body) == (500, b"too old sample\n")
    assert prom.samples('{__name__=~"rt_prom_refuse_(good|new)"}', t - 3 * DAY, t) == {}, \
        "a request with one too-old sample must be refused as a whole"

    assert write(prom.write_url, (s, [(t, 9.0)])) == (400, b"duplicate sample for timestamp\n")
    assert write(prom.write_url, (s, [(t, 2.0)])) == (204, b"")
    assert write(prom.write_url, (s, [(t - 2 * HOUR, 1.0)])) == (204, b"")
    assert write(prom.write_url, (s, [(t - 2 * HOUR, 8.0)])) == (204, b"")
    assert prom.samples("rt_prom_refuse", t - 3 * DAY, t) == expected((s, [(t - 2 * HOUR, 1.0), (t, 2.0)]))


@needs_prometheus
def test_prometheus_restarts_on_the_same_port_and_data(tmp_path: Path) -> None:
    r = PrometheusReceiver(tmp_path)
    r.start()
    try:
        t = now_ms()
        s = series("rt_prom_restart")
        assert write(r.write_url, (s, [(t - 1000, 1.0)])) == (204, b"")
        assert write(r.write_url, (s, [(t - 3 * HOUR, 2.0)])) == (204, b"")  # out of order: the WBL
        port = r.port
        r.stop()
        with pytest.raises(OSError):
            write(r.write_url, (s, [(t, 3.0)]))
        r.start()
        assert r.port == port and r.starts == 2
        assert write(r.write_url, (s, [(t, 3.0)])) == (204, b"")
        assert r.samples("rt_prom_restart", t - DAY, t) == expected((s, [(t - 3 * HOUR, 2.0), (t - 1000, 1.0),
                                                                          (t, 3.0)]))
    finally:
        r.stop()


# -- VictoriaMetrics 1.79 -----------------------------------------------------------------------

@needs_vm
def test_victoria_metrics_returns_raw_samples_with_original_timestamps(vm: VictoriaMetricsReceiver) -> None:
    t = now_ms()
    a = series("rt_vm_raw", job="scrape")
    b = series("rt_vm_raw:window_max")
    first = [(t - 10_123, 1.5), (t - 30_007, 2.25), (t - 20_001, 3.0)]
    later = [(t - 3 * DAY, 4.0), (t - 40 * DAY, 5.5), (t - 1, 6.0)]
    assert write(vm.write_url, (a, first), (b, [(t - 5 * HOUR - 17, 31_957_712_896.0)])) == (204, b"")
    assert write(vm.write_url, (a, later)) == (204, b"")
    assert vm.rows_inserted() >= 7
    # No sleep: samples() force-flushes, so a brand new series is searchable at once.
    got = vm.samples('{__name__=~"rt_vm_raw.*"}', t - 60 * DAY, t)
    assert got == expected((a, first + later), (b, [(t - 5 * HOUR - 17, 31_957_712_896.0)]))
    assert vm.samples("rt_vm_raw", t - 30_007, t - 10_123) == expected((a, first))
    assert vm.samples("rt_vm_raw", t - 30_006, t - 10_124) == expected((a, [(t - 20_001, 3.0)]))
    assert vm.samples("rt_vm_raw", t - 1, t - 1) == expected((a, [(t - 1, 6.0)]))
    assert vm.samples("rt_vm_raw_none", t - DAY, t) == {}


@needs_vm
def test_victoria_metrics_behaviour_as_observed_in_1_79(vm: VictoriaMetricsReceiver) -> None:
    """Recorded with Debian's victoria-metrics 1.79: it never refuses a sample for its time.

    - more than 2 days in the future (or outside the retention): 204, dropped silently
      (a warning in its log only);
    - NaN: 204, dropped silently; +Inf/-Inf are kept;
    - the same sample again: stored again (no dedup with -dedup.minScrapeInterval=0), as is
      another value at the same timestamp: export returns both."""
    t = now_ms()
    s = series("rt_vm_obs")
    assert write(vm.write_url, (s, [(t - 3000, 1.0), (t + 3 * DAY, 2.0)])) == (204, b"")
    assert write(vm.write_url, (s, [(t - 2000, math.nan), (t - 1000, math.inf), (t, -math.inf)])) == (204, b"")
    assert write(vm.write_url, (s, [(t - 3000, 1.0)])) == (204, b"")
    assert write(vm.write_url, (s, [(t - 3000, 5.0)])) == (204, b"")
    got = vm.samples("rt_vm_obs", t - DAY, t + 10 * DAY)
    assert list(got) == [labels_of(s)]
    points = got[labels_of(s)]
    assert sorted(p for p in points if p[0] == t - 3000) == [(t - 3000, 1.0), (t - 3000, 1.0), (t - 3000, 5.0)]
    assert [p for p in points if p[0] != t - 3000] == [(t - 1000, math.inf), (t, -math.inf)]
    assert "too big timestamp" in vm.log_tail(100_000)


@needs_vm
def test_victoria_metrics_restarts_on_the_same_port_and_data(tmp_path: Path) -> None:
    r = VictoriaMetricsReceiver(tmp_path)
    r.start()
    try:
        t = now_ms()
        s = series("rt_vm_restart")
        assert write(r.write_url, (s, [(t - 1000, 1.0), (t - 3 * DAY, 2.0)])) == (204, b"")
        port = r.port
        r.stop()  # without a flush before: a clean stop persists what was accepted
        with pytest.raises(OSError):
            write(r.write_url, (s, [(t, 3.0)]))
        r.start()
        assert r.port == port and r.starts == 2
        assert write(r.write_url, (s, [(t, 3.0)])) == (204, b"")
        assert r.samples("rt_vm_restart", t - 4 * DAY, t) == expected((s, [(t - 3 * DAY, 2.0), (t - 1000, 1.0),
                                                                            (t, 3.0)]))
    finally:
        r.stop()


def test_parse_export_line_reads_vms_non_json_numbers() -> None:
    line = ('{"metric":{"__name__":"x","weird":"a,Inf,NaN,b"},"values":[-Inf,+Inf,1.5,NaN,Inf],'
            '"timestamps":[1,2,3,4,5]}')
    doc = parse_export_line(line)
    assert doc["metric"] == {"__name__": "x", "weird": "a,Inf,NaN,b"}
    assert doc["values"][:3] == [-math.inf, math.inf, 1.5]
    assert math.isnan(doc["values"][3]) and doc["values"][4] == math.inf


# -- FaultProxy ---------------------------------------------------------------------------------

@needs_vm
def test_fault_proxy_modes(vm: VictoriaMetricsReceiver) -> None:
    t = now_ms()
    s = series("rt_proxy")
    with FaultProxy(vm.write_url) as proxy:
        assert proxy.url == f"http://127.0.0.1:{proxy.port}/api/v1/write"
        assert proxy.mode == "pass"
        assert write(proxy.url, (s, [(t - 4000, 1.0)])) == (204, b"")

        proxy.mode = "down"
        body_down = write_request([(s, [(t - 3000, 2.0)])])
        status, headers, answer = http_request("POST", proxy.url, body_down,
                                               {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"})
        assert status == 503 and headers.get("Retry-After") == "1", (status, headers, answer)
        assert proxy.mode == "down"

        proxy.mode = "refuse_next_400"
        refused_points = [(t - 2000, 3.0), (t - 2500, 3.5)]
        assert write(proxy.url, (s, refused_points)) == (400, REFUSE_400_BODY)
        assert proxy.mode == "pass", "refuse_next_400 refuses one request, then passes"
        assert write(proxy.url, (s, [(t - 1000, 4.0)])) == (204, b"")

        assert [(r.mode, r.status, r.origin) for r in proxy.requests] == [
            ("pass", 204, "upstream"), ("down", 503, "proxy"), ("refuse_next_400", 400, "proxy"),
            ("pass", 204, "upstream")]
        refused = proxy.refused
        assert [r.status for r in refused] == [503, 400]
        assert refused[0].request_body == body_down
        assert decode_request(refused[0].request_body) == expected((s, [(t - 3000, 2.0)]))
        assert refused[1].request_body is not None
        assert decode_request(refused[1].request_body) == expected((s, refused_points))
        assert all(r.request_body is None for r in proxy.requests if not r.refused)
        # Only what passed reached the receiver.
        assert vm.samples("rt_proxy", t - DAY, t) == expected((s, [(t - 4000, 1.0), (t - 1000, 4.0)]))

        with pytest.raises(ValueError):
            proxy.mode = "slow"


@needs_vm
def test_fault_proxy_refuses_exactly_one_of_concurrent_requests(vm: VictoriaMetricsReceiver) -> None:
    t = now_ms()
    with FaultProxy(vm.write_url) as proxy:
        proxy.mode = "refuse_next_400"
        statuses: list[int] = []
        lock = threading.Lock()

        def post(i: int) -> None:
            st, _ = write(proxy.url, (series("rt_proxy_conc", i=str(i)), [(t - i, float(i))]))
            with lock:
                statuses.append(st)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert sorted(statuses) == [204] * 7 + [400]
        assert len(proxy.refused) == 1
        refused = decode_request(proxy.refused[0].request_body or b"")
        stored = vm.samples("rt_proxy_conc", t - DAY, t)
        assert len(stored) == 7 and not set(stored) & set(refused)


def test_fault_proxy_drops_the_connection_when_the_upstream_is_unreachable() -> None:
    with FaultProxy(f"http://127.0.0.1:{free_port()}/api/v1/write") as proxy:
        with pytest.raises(OSError):  # as without the proxy: no HTTP answer, a connection error
            write(proxy.url, (series("rt_proxy_gone"), [(now_ms(), 1.0)]))
        (r,) = proxy.refused
        assert r.status == 0 and b"upstream unreachable" in r.response_body and r.request_body


@needs_vm
def test_fault_proxy_delay_and_a_sender_that_goes_away(vm: VictoriaMetricsReceiver) -> None:
    t = now_ms()
    s = series("rt_proxy_delay")
    with FaultProxy(vm.write_url) as proxy:
        proxy.delay_s = 0.5
        started = time.monotonic()
        assert write(proxy.url, (s, [(t - 2000, 1.0)])) == (204, b"")
        assert time.monotonic() - started >= 0.5
        # A sender that gives up (or is killed) while its request is delayed: still forwarded.
        with pytest.raises(OSError):
            post_write(proxy.url, write_request([(s, [(t - 1000, 2.0)])]), timeout=0.1)
        wait_for(lambda: proxy.accepted_since(0) == 2, 10, "the abandoned request forwarded")
        assert vm.samples("rt_proxy_delay", t - DAY, t) == expected((s, [(t - 2000, 1.0), (t - 1000, 2.0)]))


def test_only_loopback_targets() -> None:
    for url in ("http://127.0.0.1:9/x", "http://[::1]:9/x", "http://127.0.0.2:9/x"):
        require_loopback(url)
    for url in ("http://10.0.0.1:9/x", "http://example.com/x", "http://localhost:9/x", "http://0.0.0.0:9/x"):
        with pytest.raises(AssertionError):
            require_loopback(url)
    with pytest.raises(AssertionError):
        FaultProxy("http://192.0.2.1:9090/api/v1/write")
