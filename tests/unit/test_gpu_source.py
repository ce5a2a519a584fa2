"""The gpu source against a fake NVML built from recorded `nvidia-smi -q -x` output.

The fake answers with pynvml's own names, constants, structures and exceptions, with
what the XML says; "N/A" or a missing element is NVMLError_NotSupported, as NVML
answers. Expected values are read from the XML by this test, in the XML's own units,
independently of the source's mapping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest

import wire
from agent.config import GpuSourceConfig
from agent.sources.base import Sample, SourceEnv
from agent.sources.gpu import Gpu
from tests.fakes.nvml import (  # noqa: F401 (re-exported for the catalog test)
    MIB,
    NVSMI,
    REPO,
    XML_REASON_BITS,
    XMLS,
    FakeHandle,
    FakeNvml,
    SeriesKey,
    ecc_kind,
    load,
    number,
    nvml_error,
    text,
)
from wire import MetricType


def started(fake: FakeNvml) -> Gpu:
    source = Gpu(GpuSourceConfig(enabled=True), SourceEnv(extra={"nvml": fake}))
    assert source.probe() is None
    return source


def by_series(samples: list[Sample]) -> dict[SeriesKey, float]:
    out: dict[SeriesKey, float] = {}
    for s in samples:
        key = (s.name, s.labels)
        assert key not in out, f"duplicate series {key}"
        out[key] = s.value
    return out


def expected_from_xml(doc: ET.Element, first_index: int = 0) -> dict[SeriesKey, float]:
    """What dcgm-exporter would show for this nvidia-smi document, read straight from the XML."""
    out: dict[SeriesKey, float] = {}

    def opt(e: ET.Element, path: str, conv: Callable[[str], float] = number) -> float | None:
        try:
            return conv(text(e, path))
        except pynvml.NVMLError_NotSupported:
            return None

    for i, g in enumerate(doc.findall("gpu")):
        labels = (("gpu", str(first_index + i)), ("UUID", text(g, "uuid")), ("pci_bus_id", text(g, "pci/pci_bus_id")),
                  ("device", f"nvidia{text(g, 'minor_number')}"), ("modelName", text(g, "product_name")))

        def put(name: str, value: float | None, extra: tuple[tuple[str, str], ...] = (),
                labels: tuple[tuple[str, str], ...] = labels) -> None:
            if value is not None:
                out[(name, labels + extra)] = value

        put("waystation_gpu_info", 1, (("driver_version", text(doc, "driver_version")),
                                       ("vbios_version", text(g, "vbios_version")),
                                       ("cuda_version", text(doc, "cuda_version"))))
        put("waystation_gpu_lost", 0)
        if opt(g, "utilization/memory_util") is not None:
            put("DCGM_FI_DEV_GPU_UTIL", opt(g, "utilization/gpu_util"))
            put("DCGM_FI_DEV_MEM_COPY_UTIL", opt(g, "utilization/memory_util"))
        put("DCGM_FI_DEV_ENC_UTIL", opt(g, "utilization/encoder_util"))
        put("DCGM_FI_DEV_DEC_UTIL", opt(g, "utilization/decoder_util"))
        for f in ("total", "used", "free", "reserved"):
            put(f"DCGM_FI_DEV_FB_{f.upper()}", opt(g, f"fb_memory_usage/{f}"))
        put("DCGM_FI_DEV_GPU_TEMP", opt(g, "temperature/gpu_temp"))
        put("DCGM_FI_DEV_SLOWDOWN_TEMP", opt(g, "temperature/gpu_temp_slow_threshold"))
        put("DCGM_FI_DEV_MEMORY_TEMP", opt(g, "temperature/memory_temp"))
        power = g.find("gpu_power_readings") or g.find("power_readings")
        assert power is not None
        put("DCGM_FI_DEV_POWER_USAGE", opt(power, "power_draw"))
        put("DCGM_FI_DEV_POWER_MGMT_LIMIT", opt(power, "enforced_power_limit") or opt(power, "current_power_limit"))
        put("DCGM_FI_DEV_SM_CLOCK", opt(g, "clocks/sm_clock"))
        put("DCGM_FI_DEV_MEM_CLOCK", opt(g, "clocks/mem_clock"))
        put("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", opt(g, "pci/replay_counter"))
        put("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", opt(g, "pci/tx_util"))
        put("DCGM_FI_DEV_PCIE_RX_THROUGHPUT", opt(g, "pci/rx_util"))
        reasons = g.find("clocks_event_reasons")
        reasons = reasons if reasons is not None else g.find("clocks_throttle_reasons")
        assert reasons is not None
        mask = 0
        for r in reasons:
            if r.tag.split("_reason_", 1)[-1] not in XML_REASON_BITS:
                continue  # newer drivers list more reasons than the nine NVML has always had
            reason, active = r.tag.split("_reason_", 1)[1], (r.text or "").strip() == "Active"
            mask |= XML_REASON_BITS[reason] if active else 0
            put("waystation_gpu_clocks_event_reason_active", float(active), (("reason", reason),))
        put("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", mask)
        for scope, tag in (("volatile", "VOL"), ("aggregate", "AGG")):
            node = g.find(f"ecc_errors/{scope}")
            assert node is not None
            for kind in ("sbe", "dbe"):
                put(f"DCGM_FI_DEV_ECC_{kind.upper()}_{tag}_TOTAL",
                    sum(number(text(node, c.tag)) for c in node if ecc_kind(c.tag) == kind))
        put("DCGM_FI_DEV_RETIRED_SBE", opt(g, "retired_pages/multiple_single_bit_retirement/retired_count"))
        put("DCGM_FI_DEV_RETIRED_DBE", opt(g, "retired_pages/double_bit_retirement/retired_count"))
        put("DCGM_FI_DEV_RETIRED_PENDING", opt(g, "retired_pages/pending_retirement", lambda v: float(v == "Yes")))
        put("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", opt(g, "remapped_rows/remapped_row_corr"))
        put("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", opt(g, "remapped_rows/remapped_row_unc"))
        put("DCGM_FI_DEV_ROW_REMAP_PENDING", opt(g, "remapped_rows/remapped_row_pending", lambda v: float(v == "Yes")))
        put("DCGM_FI_DEV_ROW_REMAP_FAILURE", opt(g, "remapped_rows/remapped_row_failure", lambda v: float(v == "Yes")))
        put("DCGM_FI_DEV_FAN_SPEED", opt(g, "fan_speed"))
        put("DCGM_FI_DEV_PSTATE", opt(g, "performance_state", lambda v: float(v.lstrip("P"))))
        seen_gi: set[str] = set()
        for mig in g.findall("mig_devices/mig_device"):
            gi = text(mig, "gpu_instance_id")
            if gi in seen_gi:
                continue
            seen_gi.add(gi)
            # The profile is not in the XML; these A100-80GB slices (14 SMs, 19968 MiB) are 1g.20gb.
            extra = (("GPU_I_ID", gi), ("GPU_I_PROFILE", "1g.20gb"))
            for f in ("total", "used", "free", "reserved"):
                put(f"DCGM_FI_DEV_FB_{f.upper()}", opt(mig, f"fb_memory_usage/{f}"), extra)
    return out


@pytest.mark.parametrize("xml_name", XMLS)
def test_source_shows_what_nvidia_smi_recorded(xml_name: str) -> None:
    (doc,) = load(xml_name)
    source = started(FakeNvml(doc))
    samples = source.collect(1_700_000_000.0)
    source.close()
    assert {s.ts_ms for s in samples} == {1_700_000_000_000}
    got = by_series(samples)
    expected = expected_from_xml(doc)
    assert sorted(got) == sorted(expected)
    assert got == pytest.approx(expected, rel=1e-9)


def test_mig_devices_and_not_supported_fields_of_the_a100() -> None:
    got = by_series(started(FakeNvml(*load("a100-sxm4-v12.xml"))).collect(0.0))
    migs = sorted(dict(k[1])["GPU_I_ID"] for k in got if k[0] == "DCGM_FI_DEV_FB_USED" and len(k[1]) > 5)
    assert migs == ["3", "4", "5", "6"]
    names = {k[0] for k in got}
    assert "DCGM_FI_DEV_GPU_UTIL" not in names  # N/A with MIG on
    assert "DCGM_FI_DEV_MEMORY_TEMP" in names and "DCGM_FI_DEV_FAN_SPEED" not in names


def test_metric_types_follow_dcgm_exporter() -> None:
    """TYPE lines of the recorded dcgm-exporter page, for every name both emit."""
    prom = NVSMI.parent / "metrics" / "dcgm-exporter.prom"
    dcgm_types = {}
    for line in prom.read_text().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            dcgm_types[name] = kind
    samples = started(FakeNvml(*load("tesla-t4.xml"))).collect(0.0)
    compared = 0
    for s in samples:
        if s.name in dcgm_types:
            want = MetricType.COUNTER if dcgm_types[s.name] == "counter" else MetricType.GAUGE
            assert s.mtype == want, s.name
            compared += 1
    assert compared >= 15


def test_not_supported_fields_are_not_asked_again() -> None:
    fake = FakeNvml(*load("tesla-t4.xml"))
    source = started(fake)
    first = by_series(source.collect(0.0))
    calls_after_first = Counter(fake.calls)
    second = by_series(source.collect(10.0))
    assert first == second
    delta = fake.calls - calls_after_first
    # Not supported on this T4 (fan N/A, no energy in the record, memory temp N/A, no NVLink, no MIG).
    for fn in ("nvmlDeviceGetFanSpeed", "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues",
               "nvmlDeviceGetMigMode", "nvmlDeviceGetCurrentClocksEventReasons"):
        assert calls_after_first[(fn, 0)] == 1, fn
        assert delta[(fn, 0)] == 0, fn
    # Supported ones are read every time.
    for fn in ("nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        assert delta[(fn, 0)] == 1, fn


def test_a_lost_gpu_is_reported_and_the_others_carry_on() -> None:
    t4, a10g = load("tesla-t4.xml", "a10g.xml")
    fake = FakeNvml(t4, a10g)
    source = started(fake)
    before = by_series(source.collect(0.0))
    fake.handles[0].lost = True
    after = by_series(source.collect(10.0))
    calls = Counter(fake.calls)
    again = by_series(source.collect(20.0))

    def of(series: dict[SeriesKey, float], gpu: str) -> dict[SeriesKey, float]:
        return {k: v for k, v in series.items() if dict(k[1])["gpu"] == gpu}

    assert of(after, "1") == of(before, "1") == pytest.approx(expected_from_xml(a10g, first_index=1))
    lost = of(after, "0")
    assert {k[0] for k in lost} == {"waystation_gpu_info", "waystation_gpu_lost"}
    assert [v for k, v in lost.items() if k[0] == "waystation_gpu_lost"] == [1.0]
    assert again == after
    assert sum(n for (_, i), n in (fake.calls - calls).items() if i == 0) == 0  # no more calls to the lost GPU


def test_xid_events_count_per_code() -> None:
    fake = FakeNvml(*load("tesla-t4.xml", "a10g.xml"))
    source = started(fake)
    assert fake.registered == [0, 1]
    fake.inject_xid(1, 79)
    fake.inject_xid(1, 79)
    fake.inject_xid(0, 13)

    def xids() -> dict[tuple[str, str], float]:
        return {(dict(s.labels)["gpu"], dict(s.labels)["xid"]): s.value
                for s in source.collect(0.0) if s.name == "waystation_gpu_xid_errors_total"}

    deadline = time.monotonic() + 10
    while xids() != {("1", "79"): 2.0, ("0", "13"): 1.0}:
        assert time.monotonic() < deadline, xids()
        time.sleep(0.02)
    xid = next(s for s in source.collect(0.0) if s.name == "waystation_gpu_xid_errors_total")
    assert xid.mtype == MetricType.COUNTER
    assert dict(xid.labels)["UUID"].startswith("GPU-")
    started_at = time.monotonic()
    source.close()
    assert time.monotonic() - started_at < 5
    assert source._event_thread is not None and not source._event_thread.is_alive()


def wait_for_xid(source: Gpu, count: float) -> None:
    """Until the event thread has counted `count` XIDs (a direct collect: not seen by any runner)."""
    deadline = time.monotonic() + 10
    while [s.value for s in source.collect(0.0) if s.name == "waystation_gpu_xid_errors_total"] != [count]:
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("first_at", [660.0, 675.0], ids=["on-a-window-boundary", "mid-window"])
def test_a_first_xid_comes_with_a_zero_point_so_increase_counts_it(first_at: float) -> None:
    """The counter of a code appears with its first event, already at 1: the runner sees it
    born (the source was reporting a moment before) and the summarizer forwards a 0 just
    before it, so increase() counts the event. On a window boundary that 0 lies in the window
    already flushed when the read ends: it travels with the first point's window, not dropped."""
    from agent.runner import Runner, Scheduled
    from agent.summarize import Summarizer

    fake = FakeNvml(*load("tesla-t4.xml"))
    source = started(fake)
    summarizer = Summarizer(60.0)
    runner = Runner([Scheduled(source, 15.0)], summarizer.add)
    (item,) = runner.scheduled
    out: list[wire.Series] = []
    runner.run_once(item, 600.0)  # the baseline reading: no XID yet
    runner.run_once(item, 645.0)
    out += summarizer.flush(660_000)  # window [600 s, 660 s) is gone before the next read
    fake.inject_xid(0, 79)
    wait_for_xid(source, 1.0)
    runner.run_once(item, first_at)
    (last,) = [s for s in source.collect(first_at) if s.name == "waystation_gpu_xid_last_timestamp_seconds"]
    assert dict(last.labels)["xid"] == "79" and last.mtype == MetricType.GAUGE
    assert time.time() - 15 < last.value <= time.time()  # the event's wall time, not the reading's
    fake.inject_xid(0, 79)
    wait_for_xid(source, 2.0)
    runner.run_once(item, 690.0)
    out += summarizer.flush(720_000)
    assert summarizer.dropped_samples == 0
    (xid,) = [s for s in out if s.name == "waystation_gpu_xid_errors_total"]
    assert xid.mtype == MetricType.COUNTER
    first_ms = round(first_at * 1000)
    assert list(zip(xid.timestamps_ms, xid.values, strict=True)) == [
        (first_ms - 1, 0.0), (first_ms, 1.0), (690_000, 2.0)]
    # The batch carrying it is valid: its window simply starts a millisecond earlier.
    batch = wire.prepare_data(out)
    assert batch.window_start_ms == min(s.timestamps_ms[0] for s in out)
    source.close()


def test_an_xid_at_the_first_reading_is_the_baseline_not_born() -> None:
    """Before its first reading the source was not reporting: what it sees then may be old."""
    from agent.runner import Runner, Scheduled
    from agent.summarize import Summarizer

    fake = FakeNvml(*load("tesla-t4.xml"))
    source = started(fake)
    fake.inject_xid(0, 13)
    wait_for_xid(source, 1.0)
    summarizer = Summarizer(60.0)
    runner = Runner([Scheduled(source, 15.0)], summarizer.add)
    runner.run_once(runner.scheduled[0], 600.0)
    (xid,) = [s for s in summarizer.flush_all() if s.name == "waystation_gpu_xid_errors_total"]
    assert list(zip(xid.timestamps_ms, xid.values, strict=True)) == [(600_000, 1.0)]
    source.close()


def test_a_counter_read_that_failed_before_it_ever_succeeded_makes_the_reading_partial() -> None:
    """ECC totals since the driver loaded, missing once by a transient error: when they come
    back they are not born (a 0 before them would invent every error since boot)."""
    from agent.runner import Runner, Scheduled
    from agent.summarize import Summarizer

    fake = FakeNvml(*load("a10g.xml"))
    real = fake.nvmlDeviceGetTotalEccErrors
    failures = [pynvml.NVML_ERROR_UNKNOWN]

    def flaky(h: FakeHandle, error_type: int, counter: int) -> int:
        if failures:
            raise nvml_error(failures.pop())
        return int(real(h, error_type, counter)) + 7  # the records have none: 7 since the driver loaded

    fake.nvmlDeviceGetTotalEccErrors = flaky  # type: ignore[method-assign]
    source = started(fake)
    summarizer = Summarizer(60.0)
    runner = Runner([Scheduled(source, 10.0)], summarizer.add)
    (item,) = runner.scheduled
    runner.run_once(item, 600.0)
    assert source.partial
    runner.run_once(item, 610.0)  # the ECC series show up: after a partial reading, not born
    assert not source.partial
    failures.append(pynvml.NVML_ERROR_UNKNOWN)
    runner.run_once(item, 620.0)  # read once already: a later failure is not partial
    assert not source.partial
    runner.run_once(item, 630.0)
    ecc = [s for s in summarizer.flush_all() if s.name.startswith("DCGM_FI_DEV_ECC_")]
    assert len(ecc) == 4
    for s in ecc:
        # The first ECC read (volatile corrected) failed at 600 s; the other three were read.
        first = 610_000 if s.name == "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL" else 600_000
        assert list(zip(s.timestamps_ms, s.values, strict=True)) == [(first, 7.0), (630_000, 7.0)], s.name
    source.close()


def test_counter_readers_are_the_reads_that_give_counters() -> None:
    from agent.sources.gpu import COUNTER_READERS, FALLBACKS, METRICS, READERS

    assert COUNTER_READERS <= set(READERS)
    checked = set()
    for xml_name in XMLS:
        fake = FakeNvml(*load(xml_name))
        handle = fake.nvmlDeviceGetHandleByIndex(0)
        for key, reader in READERS.items():
            if key in FALLBACKS:
                continue
            try:
                got = reader(fake, handle)
            except pynvml.NVMLError:
                continue
            checked.add(key)
            gives_counter = any(METRICS[k][1] == MetricType.COUNTER for k in got)
            assert (key in COUNTER_READERS) == gives_counter, (xml_name, key)
    assert COUNTER_READERS - {"energy"} <= checked  # energy is in none of the records


def test_without_a_driver_the_source_says_why() -> None:
    fake = FakeNvml()
    fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    reason = Gpu(GpuSourceConfig(), SourceEnv(extra={"nvml": fake})).probe()
    assert reason is not None and reason.startswith("unavailable: no NVIDIA driver (")
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    reason = Gpu(GpuSourceConfig(), SourceEnv(extra={"nvml": fake})).probe()
    assert reason is not None and "Driver Not Loaded" in reason


def test_pynvml_is_imported_only_by_probe() -> None:
    code = ("import sys\nfrom agent.sources.gpu import Gpu\nassert 'pynvml' not in sys.modules\n"
            "import agent.daemon\nassert 'pynvml' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_driver_is_said_without_importing_pynvml(tmp_path: Path) -> None:
    """A node without the NVIDIA driver pays nothing for the GPU source (agent footprint)."""
    code = (
        "import sys\n"
        "from agent.config import GpuSourceConfig\n"
        "from agent.sources.base import SourceEnv\n"
        "from agent.sources.gpu import Gpu\n"
        f"print(Gpu(GpuSourceConfig(), SourceEnv(proc_root={str(tmp_path)!r})).probe())\n"
        "print('pynvml' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    reason, imported = out.stdout.splitlines()
    assert reason.startswith("unavailable: no NVIDIA driver loaded") and imported == "False"
