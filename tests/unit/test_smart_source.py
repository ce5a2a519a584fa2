"""The SMART source against recorded smartctl outputs, replayed through pySMART.

Recordings are read in place from ../shared/fixtures/smartctl/ with pySMART's own rule:
an argument list maps to the file `_` + args joined by `_`, with `/`, `\\` and `:` as `_`.
The source adds `-n standby` to every device read; the recordings were taken without it
(an awake drive answers the same), so the replay drops it, after checking it is there.
These are smartctl's plain-text answers, so every source here asks for `output="text"`
(the stand-in's `-V` says 7.3, for which "auto" would read JSON: tests/unit/test_smart_json.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.config import SmartDeviceConfig, SmartSourceConfig
from agent.sources import smart
from agent.sources.base import Sample, SourceEnv
from tests.fakes.smartctl import VERSION, Replay, file_name, read_recording  # noqa: F401

SHARED = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "smartctl"
if not SHARED.exists():
    SHARED = Path("/work/shared/fixtures/smartctl")
DATASET = SHARED / "text" / "pysmart" / "tests" / "dataset"
SINGLE = sorted(p for p in (DATASET / "singletests").iterdir() if p.is_dir())
LISTING = DATASET / "listingtests" / "linux_multiple_devices"
OTHER = SHARED / "text" / "other"
TS = 1_700_000_000_000


def by_name(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(dict(s.labels).get(k) == v for k, v in labels.items())]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = by_name(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def case(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "device.json").read_text())
    return data


# ---- pySMART over the stand-in runner reproduces pySMART's expected values --------------

SCALARS = ("assessment", "capacity", "dev_reference", "family", "firmware", "interface", "is_ssd",
           "logical_sector_size", "messages", "model", "name", "physical_sector_size", "rotation_rate",
           "sector_size", "serial", "size", "size_raw", "smart_capable", "smart_enabled", "smartctl_interface",
           "temperature", "temperatures", "test_capabilities", "vendor", "diags")


@pytest.mark.parametrize("folder", SINGLE, ids=[p.name for p in SINGLE])
def test_pysmart_replay_matches_device_json(folder: Path) -> None:
    data = case(folder)
    pysmart = smart._load_pysmart()
    runner = Replay(folder)
    sm = smart._runner_smartctl_class()(runner, 10.0, data["name"])
    dev = pysmart.Device(data["name"], interface=data.get("interface"), smartctl=sm)
    expected = data["values"]
    for key in SCALARS:
        got = getattr(dev, key)
        want = expected[key]
        if key == "temperatures":
            got = {str(k): v for k, v in got.items()}
        assert got == want, key
    for got_attr, want_attr in zip(dev.attributes, expected["attributes"], strict=True):
        if want_attr is None:
            assert got_attr is None
            continue
        for key in ("num", "name", "flags", "value_int", "worst", "thresh", "raw_int", "when_failed"):
            assert getattr(got_attr, key) == want_attr[key], (want_attr["name"], key)


# ---- the source's samples carry exactly what device.json holds --------------------------


def collect_one(folder: Path, name: str, dev_type: str, **replay: Any) -> tuple[list[Sample], Replay]:
    runner = Replay(folder, **replay)
    config = SmartSourceConfig(devices=(SmartDeviceConfig(name=name, type=dev_type),), output="text")
    source = smart.Smart(config, SourceEnv(extra={"smartctl_runner": runner}))
    assert source.probe() is None
    return source.collect(TS / 1000), runner


@pytest.mark.parametrize("folder", SINGLE, ids=[p.name for p in SINGLE])
def test_source_samples_match_device_json(folder: Path) -> None:
    data = case(folder)
    v = data["values"]
    samples, runner = collect_one(folder, data["name"], data.get("interface", ""))
    dev = smart.device_label(data["name"], data.get("interface", ""))
    assert {dict(s.labels)["device"] for s in samples} == {dev}
    assert all(s.ts_ms == TS for s in samples)
    info = by_name(samples, "smartctl_device")
    assert len(info) == 1 and info[0].value == 1
    labels = dict(info[0].labels)
    assert labels["model_name"] == v["model"] and labels["serial_number"] == v["serial"]
    assert labels["firmware_version"] == v["firmware"] and labels["interface"] == v["interface"]
    assert labels["model_family"] == (v["family"] or "")
    assert value(samples, "smartctl_device_smart_status") == (0 if v["assessment"] == "FAIL" else 1)
    assert value(samples, "smartctl_device_smartctl_exit_status") == 0
    assert value(samples, "smartctl_device_power_mode", power_mode="ACTIVE") == 1
    if v["temperature"] is None:
        assert not by_name(samples, "smartctl_device_temperature")
    else:
        assert value(samples, "smartctl_device_temperature", temperature_type="current") == v["temperature"]
    assert not by_name(samples, smart.ERRORS_METRIC)

    ifa = v["if_attributes"]
    if v["dev_interface"] == "nvme":
        assert labels["protocol"] == "NVMe"
        for metric, key in (("percentage_used", "percentageUsed"), ("available_spare", "availableSpare"),
                            ("available_spare_threshold", "availableSpareThreshold"),
                            ("critical_warning", "criticalWarning"), ("media_errors", "integrityErrors"),
                            ("num_err_log_entries", "errorEntries"), ("power_cycle_count", "powerCycles")):
            assert value(samples, "smartctl_device_" + metric) == ifa[key], metric
        assert value(samples, "smartctl_device_power_on_seconds") == ifa["powerOnHours"] * 3600
        assert value(samples, "smartctl_device_bytes_read") == ifa["dataUnitsRead"] * 512_000
        assert value(samples, "smartctl_device_bytes_written") == ifa["dataUnitsWritten"] * 512_000
        assert abs(ifa["dataUnitsRead"] * 512_000 - ifa["bytesRead"]) < 0.01 * ifa["bytesRead"]
        assert not by_name(samples, "smartctl_device_attribute")
    elif "legacyAttributes" in ifa:
        assert labels["protocol"] == "ATA"
        attrs = [a for a in v["attributes"] if a is not None]
        assert attrs
        assert len(by_name(samples, "smartctl_device_attribute")) == 4 * len(attrs) - sum(
            a["thresh"] is None for a in attrs)
        for a in attrs:
            sid = str(a["num"])
            for kind, key in (("value", "value_int"), ("worst", "worst"), ("thresh", "thresh"), ("raw", "raw_int")):
                if a[key] is not None:
                    got = value(samples, "smartctl_device_attribute", attribute_id=sid, attribute_value_type=kind)
                    assert got == a[key], (a["name"], kind)
            named = by_name(samples, "smartctl_device_attribute", attribute_id=sid)
            assert {dict(s.labels)["attribute_name"] for s in named} == {a["name"]}
        hours = next((a for a in attrs if a["num"] == 9), None)
        if hours is not None:
            assert value(samples, "smartctl_device_power_on_seconds") == int(hours["raw"].split("h")[0]) * 3600
    else:
        assert labels["protocol"] == "SCSI"
        d = v["diagnostics"]
        assert value(samples, "smartctl_scsi_grown_defect_list") == d["Reallocated_Sector_Ct"]
        assert value(samples, "smartctl_read_total_uncorrected_errors") == d["Uncorrected_Reads"]
        assert value(samples, "smartctl_write_total_uncorrected_errors") == d["Uncorrected_Writes"]
        assert value(samples, "smartctl_device_power_on_seconds") == d["Power_On_Hours"] * 3600
        assert value(samples, "smartctl_device_power_cycle_count") == d["Start_Stop_Cycles"]
    # Each recording is read once, however often pySMART asks for it.
    reads = [c for c in runner.calls if "--all" in c]
    assert len(reads) == len({tuple(c) for c in reads}) == 1


def test_type_detection_when_no_type_is_given() -> None:
    folder = DATASET / "singletests" / "nvme_0"
    samples, runner = collect_one(folder, "/dev/nvme0", "")
    assert runner.calls[1] == ["-d", "test", "/dev/nvme0"]
    assert dict(by_name(samples, "smartctl_device")[0].labels)["interface"] == "nvme"
    assert value(samples, "smartctl_device_percentage_used") == 28


# ---- the listing: scan, then one read per device ---------------------------------------


def test_listing_scan_open_finds_every_device() -> None:
    expected = case(LISTING)["count"]
    runner = Replay(LISTING)
    source = smart.Smart(SmartSourceConfig(output="text"), SourceEnv(extra={"smartctl_runner": runner}))
    samples = source.collect(TS / 1000)
    assert runner.calls[0] == ["--scan-open"]
    info = by_name(samples, "smartctl_device")
    assert len(info) == expected == 3
    assert {dict(s.labels)["device"] for s in info} == {"nvme0", "nvme1", "bus_0_sat+megaraid_60"}
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 0
    megaraid = dict(by_name(samples, "smartctl_device", device="bus_0_sat+megaraid_60")[0].labels)
    assert megaraid["model_name"] == "INTEL SSDSC2KB480G8"
    assert not by_name(samples, smart.ERRORS_METRIC)
    # pySMART's own listing reaches the same count through the same runner.
    pysmart = smart._load_pysmart()
    listed = pysmart.DeviceList(smartctl=smart._runner_smartctl_class()(Replay(LISTING), 10.0))
    assert len(listed.devices) == expected


# ---- failing and degrading drives (smartctl 5.x text, mapped to the calls we make) -----


def test_failing_drive_health_failed() -> None:
    names = {"_-d_usbjmicron_--all__dev_sda": OTHER / "ST910021AS.txt.health_failed"}
    samples, runner = collect_one(None, "/dev/sda", "usbjmicron", names=names)  # type: ignore[arg-type]
    assert runner.calls[1] == ["-n", "standby", "-d", "usbjmicron", "--all", "/dev/sda"]
    assert value(samples, "smartctl_device_smart_status") == 0
    info = dict(by_name(samples, "smartctl_device")[0].labels)
    assert (info["model_name"], info["serial_number"], info["interface"]) == ("ST910021AS", "3MH05H05", "usbjmicron")

    def attr(num: int, kind: str = "raw") -> float:
        return value(samples, "smartctl_device_attribute", attribute_id=str(num), attribute_value_type=kind)

    assert attr(5) == 16642 and attr(5, "value") == 1 and attr(5, "thresh") == 36
    assert attr(197) == 614
    assert attr(190, "worst") == 44 and attr(190, "thresh") == 45  # Airflow_Temperature failed in the past
    assert value(samples, "smartctl_device_error_log_count", error_log_type="summary") == 7731
    assert value(samples, "smartctl_device_power_on_seconds") == 4957 * 3600
    assert value(samples, "smartctl_device_power_cycle_count") == 1577
    assert value(samples, "smartctl_device_temperature") == 44
    flags = by_name(samples, "smartctl_device_attribute", attribute_id="5")[0].labels
    assert dict(flags)["attribute_flags_short"] == "PO--CK"


def test_degrading_drive_still_passes() -> None:
    names = {"_-d_sat_--all__dev_sdb": OTHER / "sea7200.7_80G_kolesn-a.37.errors"}
    samples, _ = collect_one(None, "/dev/sdb", "sat", names=names)  # type: ignore[arg-type]
    assert value(samples, "smartctl_device_smart_status") == 1
    raw = {dict(s.labels)["attribute_id"]: s.value
           for s in by_name(samples, "smartctl_device_attribute", attribute_value_type="raw")}
    assert raw["5"] == 311 and raw["197"] == 661
    assert value(samples, "smartctl_device_error_log_count", error_log_type="summary") == 1930
    assert value(samples, "smartctl_device_power_on_seconds") == 9130 * 3600
    assert value(samples, "smartctl_device_temperature") == 36


# ---- power mode and failure handling (scenarios from smartctl_exporter's JSON cases) -----


def json_case(name: str) -> tuple[int, bytes]:
    """A smartctl JSON document as the same call's plain-text answer: its messages and exit status."""
    doc = json.loads((SHARED / "json" / name).read_text())
    header = b"smartctl 7.5 2025-04-30 r5714 [x86_64-linux] (local build)\nCopyright (C) 2002-25\n\n"
    text = "".join(m["string"] + "\n" for m in doc["smartctl"]["messages"])
    return doc["smartctl"]["exit_status"], header + text.encode()


def test_standby_disk_is_reported_not_woken_and_errors_do_not_stop_the_others() -> None:
    nvme = DATASET / "singletests" / "nvme_0"
    answers = {"_-d_sat_--all__dev_sdc": json_case("sata_standby_nocheck-standby_sdc.json"),
               "_-d_test__dev_nonexistent": json_case("error_unable-to-detect-device-type.json")}
    names = {"_-d_nvme_--all__dev_nvme0": nvme / "_-d_nvme_--all__dev_nvme0"}
    runner = Replay(None, names=names, answers=answers)
    devices = (SmartDeviceConfig("/dev/sdc", "sat"), SmartDeviceConfig("/dev/nonexistent", ""),
               SmartDeviceConfig("/dev/nvme0", "nvme"))
    source = smart.Smart(SmartSourceConfig(devices=devices, output="text"),
                         SourceEnv(extra={"smartctl_runner": runner}))
    samples = source.collect(TS / 1000)
    # Standby: the power mode and exit status, no SMART read beyond the one -n standby call.
    sdc = [s for s in samples if dict(s.labels)["device"] == "sdc"]
    assert {s.name for s in sdc} == {"smartctl_device_power_mode", "smartctl_device_smartctl_exit_status"}
    assert value(sdc, "smartctl_device_power_mode", power_mode="STANDBY") == 1
    assert value(sdc, "smartctl_device_smartctl_exit_status") == 2
    assert [c for c in runner.calls if "/dev/sdc" in c] == [["-n", "standby", "-d", "sat", "--all", "/dev/sdc"]]
    # The device smartctl cannot open is counted; the NVMe drive after it is still read.
    assert value(samples, smart.ERRORS_METRIC, device="nonexistent", reason="error") == 1
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 28
    # Counted again next interval: a counter since the agent started.
    samples = source.collect(TS / 1000 + 600)
    assert value(samples, smart.ERRORS_METRIC, device="nonexistent", reason="error") == 2


def test_timeout_skips_the_device_and_bounds_its_calls() -> None:
    nvme = DATASET / "singletests" / "nvme_0"
    slow_calls: list[list[str]] = []
    replay = Replay(nvme)

    def runner(args: Sequence[str], timeout: float) -> tuple[int, bytes]:
        if "/dev/sdz" in args:
            slow_calls.append(list(args))
            assert timeout <= 2.0
            raise subprocess.TimeoutExpired(["smartctl", *args], timeout)
        return replay(args, timeout)

    devices = (SmartDeviceConfig("/dev/sdz", "scsi"), SmartDeviceConfig("/dev/nvme0", "nvme"))
    config = SmartSourceConfig(devices=devices, timeout=2.0, output="text")  # type: ignore[arg-type]
    samples = smart.Smart(config, SourceEnv(extra={"smartctl_runner": runner})).collect(TS / 1000)
    assert len(slow_calls) == 1  # pySMART's follow-up calls for that device fail fast
    assert value(samples, smart.ERRORS_METRIC, device="sdz", reason="timeout") == 1
    assert value(samples, "smartctl_device_temperature", device="nvme0") == 42


def test_real_subprocess_timeout(tmp_path: Path) -> None:
    script = tmp_path / "smartctl"
    script.write_text("#!/bin/sh\nsleep 5\n")
    script.chmod(0o755)
    with pytest.raises(subprocess.TimeoutExpired):
        smart.run_smartctl(["-V"], 0.2, smartctl=str(script))


def test_permission_denied_names_the_capabilities() -> None:
    denied = (2, b"smartctl 7.3\n\nSmartctl open device: /dev/sda failed: Permission denied\n")
    runner = Replay(None, answers={"_-d_sat_--all__dev_sda": denied})
    config = SmartSourceConfig(devices=(SmartDeviceConfig("/dev/sda", "sat"),), output="text")
    source = smart.Smart(config, SourceEnv(extra={"smartctl_runner": runner}))
    with pytest.raises(smart.SmartctlPermission, match="CAP_SYS_RAWIO.*CAP_SYS_ADMIN"):
        source.collect(TS / 1000)
    assert source.errors == {("sda", "permission"): 1}


def test_scan_failures_are_counted() -> None:
    scan = (b"/dev/nvme0 -d nvme # /dev/nvme0, NVMe device\n"
            b"# /dev/sda -d scsi # /dev/sda, SCSI device open failed: Permission denied\n")
    nvme = DATASET / "singletests" / "nvme_0"
    runner = Replay(nvme, answers={"_--scan-open": (0, scan)})
    source = smart.Smart(SmartSourceConfig(output="text"), SourceEnv(extra={"smartctl_runner": runner}))
    samples = source.collect(TS / 1000)
    assert value(samples, smart.ERRORS_METRIC, device="sda", reason="permission") == 1
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 28


# ---- pure helpers, probe ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dev_type", "label"), [
    ("/dev/sda", "sat", "sda"), ("/dev/bus/0", "megaraid,1", "bus_0_megaraid_1"),
    ("/dev/cciss/c0d0", "cciss,0", "cciss_c0d0_cciss_0"), ("/dev/disk/by-id/abcd", "", "abcd"),
])
def test_device_label_as_smartctl_exporter(name: str, dev_type: str, label: str) -> None:
    assert smart.device_label(name, dev_type) == label


def test_unknown_to_pysmart_types_are_passed_through() -> None:
    seen: list[list[str]] = []

    def runner(args: Sequence[str], timeout: float) -> tuple[int, bytes]:
        seen.append(list(args))
        raise subprocess.TimeoutExpired(list(args), timeout)

    config = SmartSourceConfig(devices=(SmartDeviceConfig("/dev/sg1", "cciss,3"),), output="text")
    smart.Smart(config, SourceEnv(extra={"smartctl_runner": runner})).collect(TS / 1000)
    assert seen == [["-n", "standby", "-d", "cciss,3", "--all", "/dev/sg1"]]


def test_probe_reports_missing_smartctl() -> None:
    source = smart.Smart(SmartSourceConfig(smartctl="/nonexistent/smartctl"), SourceEnv())
    reason = source.probe()
    assert reason is not None and reason.startswith("unavailable: smartctl not found")
    assert "apt-get install smartmontools" in reason


def test_probe_runs_the_real_smartctl() -> None:
    import shutil

    if shutil.which("smartctl") is None:
        pytest.skip("smartmontools not installed here")
    assert smart.Smart(SmartSourceConfig(), SourceEnv()).probe() is None


def test_attribute_flags() -> None:
    assert smart.attribute_flags(0x33) == ("PO--CK", "prefailure,updated_online,event_count,auto_keep")
    assert smart.attribute_flags(0x22) == ("-O---K", "updated_online,auto_keep")


def test_reading_devices_never_runs_charset_detection() -> None:
    """pySMART's own decoder guesses the charset with chardet, whose tables cost ~22 MB of
    agent memory; the source decodes smartctl's ASCII itself (agent footprint)."""
    code = (
        "import tracemalloc\n"
        "from tests.unit.test_smart_source import DATASET, collect_one\n"
        "NVME = DATASET / 'singletests' / 'nvme_0'\n"
        "tracemalloc.start()\n"
        "samples, _ = collect_one(NVME, '/dev/nvme0', 'nvme')\n"
        "assert samples\n"
        "print(tracemalloc.get_traced_memory()[1])\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                         env=dict(os.environ, PYTHONPATH=str(repo)))
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 8 * 2**20, "reading one device allocated more than 8 MiB"


def test_a_device_error_is_said_once_in_smartctls_words(caplog: pytest.LogCaptureFixture) -> None:
    answers = {"_-d_test__dev_nonexistent": json_case("error_unable-to-detect-device-type.json")}
    runner = Replay(None, answers=answers)
    source = smart.Smart(SmartSourceConfig(devices=(SmartDeviceConfig("/dev/nonexistent", ""),), output="text"),
                         SourceEnv(extra={"smartctl_runner": runner}))
    caplog.set_level("WARNING", logger="waystation.smart")
    for interval in range(3):
        samples = source.collect(TS / 1000 + 600 * interval)
    assert value(samples, smart.ERRORS_METRIC, device="nonexistent", reason="error") == 3
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert "/dev/nonexistent" in said[0] and "Unable to detect device type" in said[0]
    assert "Copyright" not in said[0] and "smartctl -h" not in said[0]


def test_real_smartctl_error_is_told_without_its_banner() -> None:
    """The real smartctl on a device it cannot type (/dev/null): the error names the
    device and smartctl's reason, not its banner or usage hint."""
    rc, out = smart.run_smartctl(["-n", "standby", "-d", "test", "/dev/null"], 30.0)
    lines = out.decode().splitlines()
    problem = smart.classify_failure(rc, lines, "/dev/null")
    assert isinstance(problem, smart.SmartctlFailure), (rc, lines)
    assert str(problem).startswith("smartctl /dev/null: /dev/null: Unable to detect device type"), str(problem)
    assert "Copyright" not in str(problem) and "smartctl -h" not in str(problem)
