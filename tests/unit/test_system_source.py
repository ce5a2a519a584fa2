"""The system source: recorded readings through parse(), node_exporter's names, the real host."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import SystemSourceConfig
from agent.sources.base import Sample, SourceEnv
from agent.sources.system import System, SystemReading, parse, parse_meminfo
from wire import MetricType

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures" / "system"
NODE_EXPORTER_PROM = HERE.parents[2] / "shared" / "fixtures" / "metrics" / "node_exporter.prom"
if not NODE_EXPORTER_PROM.exists():  # checkout not beside shared/: fall back to the workspace
    NODE_EXPORTER_PROM = Path("/work/shared/fixtures/metrics/node_exporter.prom")

EXCLUDE = SystemSourceConfig().exclude_fstypes
TS = 1_700_000_000_123
TYPE_OF = {"gauge": MetricType.GAUGE, "counter": MetricType.COUNTER}

# Present in node_exporter's output but not in its e2e golden file (no filesystem collector
# there, and its fake meminfo predates MemAvailable); checked against the real binary below.
NOT_IN_GOLDEN = {
    "node_memory_MemAvailable_bytes",
    "node_filesystem_size_bytes",
    "node_filesystem_avail_bytes",
    "node_filesystem_free_bytes",
    "node_filesystem_files",
    "node_filesystem_files_free",
    "node_filesystem_readonly",
}


def reading(name: str) -> SystemReading:
    return SystemReading.from_json(json.loads((FIXTURES / name).read_text()))


Shapes = dict[str, tuple[str, frozenset[str]]]
Values = dict[tuple[str, frozenset[tuple[str, str]]], float]


def exposition(text: str) -> tuple[Shapes, Values]:
    """Page -> ({sample name: (TYPE, label names)}, {(name, labels): value})."""
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    shapes: Shapes = {}
    values: Values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            shapes[s.name] = (declared.get(s.name, "untyped"), frozenset(s.labels))
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return shapes, values


def by_key(samples: list[Sample]) -> dict[tuple[str, frozenset[tuple[str, str]]], Sample]:
    out = {(s.name, frozenset(s.labels)): s for s in samples}
    assert len(out) == len(samples), "duplicate series in one reading"
    return out


def test_names_types_and_labels_match_node_exporter_golden_output() -> None:
    shapes, _ = exposition(NODE_EXPORTER_PROM.read_text())
    samples = parse(reading("node_exporter_e2e_reading.json"), TS, EXCLUDE)
    emitted = {(s.name, s.mtype, frozenset(k for k, _ in s.labels)) for s in samples}
    names = {n for n, _, _ in emitted}
    # Every metric the brief asks for is emitted by this reading.
    assert names >= {"node_cpu_seconds_total", "node_load1", "node_load5", "node_load15",
                     "node_boot_time_seconds", "node_disk_io_time_seconds_total"}
    for name, mtype, labelnames in emitted:
        if name in NOT_IN_GOLDEN:
            continue
        assert name in shapes, f"{name} is not a node_exporter metric"
        ne_type, ne_labels = shapes[name]
        assert TYPE_OF[ne_type] == mtype, name
        assert ne_labels == labelnames, name


def test_values_equal_node_exporter_for_the_same_raw_readings() -> None:
    """The fixture holds the raw (psutil/meminfo) form of node_exporter's golden values."""
    _, ne_values = exposition(NODE_EXPORTER_PROM.read_text())
    samples = parse(reading("node_exporter_e2e_reading.json"), TS, EXCLUDE)
    compared = 0
    for key, s in by_key(samples).items():
        if s.name in NOT_IN_GOLDEN:
            continue
        assert key in ne_values, key
        assert math.isclose(s.value, ne_values[key], rel_tol=1e-12), (key, s.value, ne_values[key])
        compared += 1
    # 2 CPUs x 8 modes + 3 load + 6 memory + 3 disks x 7 + boot time
    assert compared == 16 + 3 + 6 + 21 + 1


def test_parse_filters_and_dedupes_like_node_exporter() -> None:
    samples = parse(reading("node_exporter_e2e_reading.json"), TS, EXCLUDE)
    assert {s.ts_ms for s in samples} == {TS}
    disks = {dict(s.labels)["device"] for s in samples if s.name.startswith("node_disk_")}
    # partitions of sd*/nvme*, loop and zram are excluded by node_exporter's default; mmcblk
    # partitions are not.
    assert disks == {"nvme0n1", "sda", "mmcblk0p1"}
    mounts = [dict(s.labels)["mountpoint"] for s in samples if s.name == "node_filesystem_size_bytes"]
    # "/" appears twice in the reading; overlay is an excluded fstype; /dev/shm an excluded path.
    assert sorted(mounts) == ["/", "/media/cdrom", "/run"]
    ro = {dict(s.labels)["mountpoint"]: s.value for s in samples if s.name == "node_filesystem_readonly"}
    assert ro == {"/": 0.0, "/media/cdrom": 1.0, "/run": 0.0}
    # guest time is not a mode of node_cpu_seconds_total
    modes = {dict(s.labels)["mode"] for s in samples if s.name == "node_cpu_seconds_total"}
    assert modes == {"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"}
    assert not any(k in ("site", "node") for s in samples for k, _ in s.labels)


def test_parse_recorded_vm_reading() -> None:
    raw = reading("vm_reading.json")
    samples = by_key(parse(raw, TS, EXCLUDE))
    counts: dict[str, int] = defaultdict(int)
    for name, _ in samples:
        counts[name] += 1
    assert counts["node_cpu_seconds_total"] == 8 * len(raw.cpu_times) == 16
    assert counts["node_disk_reads_completed_total"] == 1  # vda; loop0-7 and zram0 left out
    assert counts["node_filesystem_size_bytes"] == 1
    mem_total = samples[("node_memory_MemTotal_bytes", frozenset())].value
    assert mem_total == 24683656 * 1024
    avail = samples[("node_memory_MemAvailable_bytes", frozenset())].value
    assert 0 < avail <= mem_total
    vda = frozenset({("device", "vda")})
    assert samples[("node_disk_read_bytes_total", vda)].value == 1520190464
    assert samples[("node_disk_io_time_seconds_total", vda)].value == 10.144


def test_parse_meminfo_units() -> None:
    text = "MemTotal:  100 kB\nHugePages_Total:   7\nbogus line\nEmpty:\n"
    assert parse_meminfo(text) == {"MemTotal": 102400, "HugePages_Total": 7}


def test_reading_round_trips_through_json() -> None:
    raw = reading("vm_reading.json")
    again = SystemReading.from_json(json.loads(json.dumps(raw.to_json())))
    assert parse(again, TS, EXCLUDE) == parse(raw, TS, EXCLUDE)


def _proc_stat_cpu_seconds() -> dict[tuple[str, str], float]:
    ticks = os.sysconf("SC_CLK_TCK")
    modes = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    out: dict[tuple[str, str], float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            for mode, v in zip(modes, m.group(2).split(), strict=False):
                out[(m.group(1), mode)] = int(v) / ticks
    return out


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_collect_on_this_machine_agrees_with_proc() -> None:
    source = System(SystemSourceConfig(), SourceEnv())
    assert source.probe() is None
    before = _proc_stat_cpu_seconds()
    now = time.time()
    samples = source.collect(now)
    after = _proc_stat_cpu_seconds()
    assert {s.ts_ms for s in samples} == {round(now * 1000)}
    got = by_key(samples)

    cpu = {
        (dict(s.labels)["cpu"], dict(s.labels)["mode"]): s.value
        for s in samples
        if s.name == "node_cpu_seconds_total"
    }
    assert set(cpu) == set(before)
    for key, value in cpu.items():
        assert before[key] - 1e-6 <= value <= after[key] + 1e-6, key

    meminfo = parse_meminfo(Path("/proc/meminfo").read_text())
    assert got[("node_memory_MemTotal_bytes", frozenset())].value == meminfo["MemTotal"]
    assert got[("node_memory_SwapTotal_bytes", frozenset())].value == meminfo["SwapTotal"]
    free = got[("node_memory_MemFree_bytes", frozenset())].value
    assert 0 < free <= meminfo["MemTotal"]

    btime = int(re.search(r"^btime (\d+)", Path("/proc/stat").read_text(), re.M).group(1))  # type: ignore[union-attr]
    assert abs(got[("node_boot_time_seconds", frozenset())].value - btime) <= 1
    assert got[("node_load1", frozenset())].value >= 0

    root = [s for s in samples if s.name == "node_filesystem_size_bytes"
            and dict(s.labels)["mountpoint"] == "/"]
    assert len(root) == 1
    st = os.statvfs("/")
    assert root[0].value == st.f_blocks * st.f_frsize
    for s in samples:
        if s.name.startswith("node_filesystem_"):
            assert dict(s.labels)["fstype"] not in SystemSourceConfig().exclude_fstypes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


NODE_EXPORTER_BIN = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


@pytest.mark.skipif(NODE_EXPORTER_BIN is None, reason="node_exporter not installed "
                    "(apt-get install prometheus-node-exporter)")
def test_names_and_values_match_real_node_exporter_on_this_machine() -> None:
    """Covers what the golden file lacks (filesystem, MemAvailable) against the real binary."""
    assert NODE_EXPORTER_BIN is not None
    port = _free_port()
    collectors = ("cpu", "loadavg", "meminfo", "filesystem", "diskstats", "stat")
    proc = subprocess.Popen(
        [NODE_EXPORTER_BIN, f"--web.listen-address=127.0.0.1:{port}",
         "--collector.disable-defaults", *(f"--collector.{c}" for c in collectors)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    page = r.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    shapes, values = exposition(page)
    samples = System(SystemSourceConfig(), SourceEnv()).collect(time.time())
    for s in samples:
        assert s.name in shapes, f"{s.name} not exported by node_exporter here"
        ne_type, ne_labels = shapes[s.name]
        assert TYPE_OF[ne_type] == s.mtype, s.name
        assert ne_labels == {k for k, _ in s.labels}, s.name
    # Values that do not move between the two readings agree exactly.
    ours = by_key(samples)
    for name in ("node_memory_MemTotal_bytes", "node_memory_SwapTotal_bytes"):
        assert ours[(name, frozenset())].value == values[(name, frozenset())]
    assert abs(ours[("node_boot_time_seconds", frozenset())].value
               - values[("node_boot_time_seconds", frozenset())]) <= 1
    ne_root = [v for (n, ls), v in values.items()
               if n == "node_filesystem_size_bytes" and ("mountpoint", "/") in ls]
    our_root = [s.value for s in samples if s.name == "node_filesystem_size_bytes"
                and dict(s.labels)["mountpoint"] == "/"]
    assert ne_root and ne_root == our_root
