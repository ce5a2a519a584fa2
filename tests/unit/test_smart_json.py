"""The SMART source's JSON mode against recorded `smartctl --json` outputs, read in place.

The recordings are in ../shared/fixtures/smartctl/json (see its SOURCES.md): healthy NVMe,
SATA and SAS disks, a failed NVMe, a worn one, reallocating and failing HDDs, a sleeping
disk, an error and a scan. Each must read as smartctl_exporter reads it, under the names
the text path gives, with the values that make each recording what it is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.catalog import lookup
from agent.config import SmartDeviceConfig, SmartSourceConfig, load_agent_config
from agent.sources import smart
from agent.sources.base import Sample, SourceEnv
from tests.fakes.smart_fleet import FAILING, FIXTURES, HEALTHY, recorded_type, recording, replay_folder
from tests.fakes.smartctl import Replay, file_name

TS = 1_700_000_000_000
DOCUMENTS = sorted(p.name for p in FIXTURES.glob("*.json") if not p.name.startswith("scan_"))
STANDBY = "sata_standby_nocheck-standby_sdc.json"
ERROR = "error_unable-to-detect-device-type.json"
SMARTCTL_67 = "sas-hdd_healthy_smartctl6.7_seagate-st1200mm0088.json"


def by_name(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(dict(s.labels).get(k) == v for k, v in labels.items())]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = by_name(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def spec_of(doc: dict[str, Any]) -> smart.DeviceSpec:
    return smart.DeviceSpec(doc.get("device", {}).get("name", "/dev/nonexistent"), recorded_type(doc))


def read(fixture: str) -> list[Sample]:
    doc = recording(fixture)
    return smart.samples_from_json(doc, spec_of(doc), TS)


def test_the_corpus_is_there() -> None:
    assert len(DOCUMENTS) >= 15, f"smartctl JSON recordings missing under {FIXTURES}"
    assert set(HEALTHY.values()) | set(FAILING.values()) <= set(DOCUMENTS)


# ---- every recording, checked against the document itself ------------------------------


@pytest.mark.parametrize("fixture", [d for d in DOCUMENTS if d not in (STANDBY, ERROR)])
def test_every_recording_reads_as_the_exporter_maps_it(fixture: str) -> None:
    doc = recording(fixture)
    spec = spec_of(doc)
    samples = smart.samples_from_json(doc, spec, TS)
    assert {dict(s.labels)["device"] for s in samples} == {smart.device_label(spec.name, spec.type)}
    assert all(s.ts_ms == TS for s in samples)
    # Catalogued, with exactly the catalogued labels, like the text path's samples.
    for s in samples:
        entry = lookup(s.name)
        assert entry is not None and entry.source == "smart", s.name
        assert tuple(k for k, _ in s.labels) == entry.labels, (s.name, s.labels)
    assert len(set(samples)) == len(samples), "a series given twice"

    info = dict(by_name(samples, "smartctl_device")[0].labels)
    assert info["protocol"] == doc["device"]["protocol"]
    assert info["model_name"] == (doc.get("model_name") or doc.get("scsi_model_name"))
    assert info["serial_number"] == doc["serial_number"]
    assert value(samples, "smartctl_device_smartctl_exit_status") == doc["smartctl"]["exit_status"]
    assert value(samples, "smartctl_device_smart_status") == int(doc["smart_status"]["passed"])
    assert value(samples, "smartctl_device_temperature", temperature_type="current") == doc["temperature"]["current"]
    hours = doc["power_on_time"]["hours"] * 3600 + doc["power_on_time"].get("minutes", 0) * 60
    assert value(samples, "smartctl_device_power_on_seconds") == hours
    assert value(samples, "smartctl_device_power_mode", power_mode="ACTIVE") == 1

    table = doc.get("ata_smart_attributes", {}).get("table", [])
    assert len(by_name(samples, "smartctl_device_attribute")) == 4 * len(table)
    for a in table:
        for kind, want in (("value", a["value"]), ("worst", a["worst"]), ("thresh", a["thresh"]),
                           ("raw", a["raw"]["value"])):
            got = by_name(samples, "smartctl_device_attribute", attribute_id=str(a["id"]), attribute_value_type=kind)
            assert [s.value for s in got] == [want], (a["name"], kind)
            labels = dict(got[0].labels)
            assert labels["attribute_name"] == a["name"]
            # smartctl's own spelling of the flags (JSON flags.string) and the exporter's long form.
            assert labels["attribute_flags_short"] == a["flags"]["string"].strip(), a["flags"]
            assert labels["attribute_flags_long"].split(",") == [
                f for f in ("prefailure", "updated_online", "performance", "error_rate", "event_count", "auto_keep")
                if a["flags"][f]] or labels["attribute_flags_long"] == "", a["flags"]

    nvme = doc.get("nvme_smart_health_information_log")
    if nvme is None:
        assert not by_name(samples, "smartctl_device_percentage_used")
    else:
        for key in ("percentage_used", "available_spare", "available_spare_threshold", "critical_warning",
                    "media_errors", "num_err_log_entries"):
            assert value(samples, "smartctl_device_" + key) == nvme[key], key
        assert value(samples, "smartctl_device_bytes_written") == nvme["data_units_written"] * 512_000
        assert not by_name(samples, "smartctl_device_rotation_rate")
    if "scsi_grown_defect_list" in doc:
        assert value(samples, "smartctl_scsi_grown_defect_list") == doc["scsi_grown_defect_list"]
        log = doc["scsi_error_counter_log"]
        assert value(samples, "smartctl_read_total_uncorrected_errors") == log["read"]["total_uncorrected_errors"]
        assert value(samples, "smartctl_write_total_uncorrected_errors") == log["write"]["total_uncorrected_errors"]


# ---- what makes each recording what it is -----------------------------------------------

FACTS: list[tuple[str, str, dict[str, str], float]] = [
    # SMART FAILED with NVMe critical warning 0x10 (volatile memory backup failed), exit bit 3.
    ("nvme_failed_critical-warning_samsung-mzwll3t2hajq.json", "smartctl_device_smart_status", {}, 0),
    ("nvme_failed_critical-warning_samsung-mzwll3t2hajq.json", "smartctl_device_critical_warning", {}, 16),
    ("nvme_failed_critical-warning_samsung-mzwll3t2hajq.json", "smartctl_device_smartctl_exit_status", {}, 8),
    # Worn to 75 % of its rated endurance, still passing.
    ("nvme_datacenter_worn-75pct_intel-ssdpe2kx020t7.json", "smartctl_device_percentage_used", {}, 75),
    ("nvme_datacenter_worn-75pct_intel-ssdpe2kx020t7.json", "smartctl_device_smart_status", {}, 1),
    ("nvme_datacenter_worn-75pct_intel-ssdpe2kx020t7.json", "smartctl_device_power_cycle_count", {}, 121),
    # Reallocated sectors, still passing; the second behind a MegaRAID controller (exit bit 2).
    ("hdd_sata_reallocated-304_passed_seagate-st3500418as.json", "smartctl_device_attribute",
     {"attribute_name": "Reallocated_Sector_Ct", "attribute_value_type": "raw"}, 304),
    ("hdd_sata_reallocated-304_passed_seagate-st3500418as.json", "smartctl_device_smart_status", {}, 1),
    ("hdd_megaraid-sat_reallocated-387_wdc-wd4000fyyx.json", "smartctl_device_attribute",
     {"attribute_name": "Reallocated_Sector_Ct", "attribute_value_type": "raw"}, 387),
    ("hdd_megaraid-sat_reallocated-387_wdc-wd4000fyyx.json", "smartctl_device_smartctl_exit_status", {}, 4),
    # FAILED behind a USB bridge: Reallocated_Sector_Ct at 1 against a threshold of 5, 1975 raw.
    ("hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json", "smartctl_device_smart_status", {}, 0),
    ("hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json", "smartctl_device_attribute",
     {"attribute_id": "5", "attribute_value_type": "raw"}, 1975),
    ("hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json", "smartctl_device_attribute",
     {"attribute_id": "5", "attribute_value_type": "value"}, 1),
    ("hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json", "smartctl_device_attribute",
     {"attribute_id": "5", "attribute_value_type": "thresh"}, 5),
    ("hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json", "smartctl_device_attribute",
     {"attribute_name": "Current_Pending_Sector", "attribute_value_type": "raw"}, 8),
    ("hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json", "smartctl_device_error_log_count",
     {"error_log_type": "summary"}, 56),
    ("hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json", "smartctl_device_smartctl_exit_status", {}, 216),
    # Healthy ones: a multi-namespace NVMe's capacity is its total; SAS start-stop cycles.
    ("nvme_datacenter_healthy_samsung-pm9a3.json", "smartctl_device_capacity_bytes", {}, 3840755982336),
    ("nvme_datacenter_healthy_samsung-pm9a3.json", "smartctl_device_bytes_read", {}, 62679808 * 512_000),
    ("sas-hdd_healthy_hitachi-h109060sesun600g.json", "smartctl_device_power_cycle_count", {}, 70),
    ("sas-hdd_healthy_hitachi-h109060sesun600g.json", "smartctl_device_rotation_rate", {}, 10020),
    ("sata-ssd_datacenter_healthy_samsung-mz7lh1t9hmlt.json", "smartctl_device_rotation_rate", {}, 0),
    ("hdd_sata_healthy_seagate-exos-x16.json", "smartctl_device_capacity_bytes", {}, 16000900661248),
    # smartctl 6.7's experimental JSON (format 0.1): read, its older field names included.
    (SMARTCTL_67, "smartctl_scsi_grown_defect_list", {"model_name": "SEAGATE ST1200MM0088"}, 0),
    (SMARTCTL_67, "smartctl_device_power_on_seconds", {}, 5675 * 3600 + 39 * 60),
    (SMARTCTL_67, "smartctl_device", {"firmware_version": "N004", "protocol": "SCSI"}, 1),
]


@pytest.mark.parametrize(("fixture", "metric", "labels", "want"), FACTS,
                         ids=[f"{f.split('_')[0]}-{f.split('_')[2][:14]}-{m[17:]}" for f, m, _, _ in FACTS])
def test_the_recording_says_what_it_is(fixture: str, metric: str, labels: dict[str, str], want: float) -> None:
    assert value(read(fixture), metric, **labels) == want


def test_a_sleeping_disk_gives_its_power_mode_only() -> None:
    samples = read(STANDBY)
    assert {s.name for s in samples} == {"smartctl_device_power_mode", "smartctl_device_smartctl_exit_status"}
    assert value(samples, "smartctl_device_power_mode", power_mode="STANDBY") == 1
    assert value(samples, "smartctl_device_smartctl_exit_status") == 2


def test_a_sleeping_disk_told_by_power_mode_alone() -> None:
    """A smartctl that sets exit bit 1 and power_mode without the "Device is in" message."""
    doc = recording(STANDBY)
    doc["smartctl"]["messages"] = []
    doc["power_mode"]["name"] = "IDLE_B"
    samples = smart.samples_from_json(doc, smart.DeviceSpec("/dev/sdc", "sat"), TS)
    assert value(samples, "smartctl_device_power_mode", power_mode="IDLE_B") == 1


def test_the_error_recording_names_the_device() -> None:
    with pytest.raises(smart.SmartctlFailure) as caught:
        read(ERROR)
    assert caught.value.reason == "error"
    assert str(caught.value) == "smartctl /dev/nonexistent: /dev/nonexistent: Unable to detect device type"


def answer(doc: dict[str, Any], *messages: str, exit_status: int) -> dict[str, Any]:
    """A recording's header with other messages and exit status (what smartctl writes then)."""
    head = dict(doc["smartctl"], exit_status=exit_status, messages=[{"string": m, "severity": "error"}
                                                                     for m in messages])
    return {"json_format_version": doc["json_format_version"], "smartctl": head}


def test_permission_and_open_failures_are_told_apart() -> None:
    base = recording(ERROR)
    spec = smart.DeviceSpec("/dev/sda", "sat")
    denied = answer(base, "Smartctl open device: /dev/sda [SAT] failed: Permission denied", exit_status=2)
    with pytest.raises(smart.SmartctlPermission, match="CAP_SYS_RAWIO"):
        smart.samples_from_json(denied, spec, TS)
    missing = answer(base, "Smartctl open device: /dev/sda [SAT] failed: No such device", exit_status=2)
    with pytest.raises(smart.SmartctlOpenFailed, match="^smartctl /dev/sda: .*No such device"):
        smart.samples_from_json(missing, spec, TS)
    empty = answer(base, exit_status=0)
    with pytest.raises(smart.SmartctlFailure, match="no SMART data"):
        smart.samples_from_json(empty, spec, TS)


def test_unknown_json_format_is_refused_clearly() -> None:
    doc = recording("nvme_datacenter_healthy_samsung-pm9a3.json")
    doc["json_format_version"] = [2, 0]
    with pytest.raises(smart.SmartctlFailure, match=r"/dev/nvme9: .*json_format_version \[2, 0\]"):
        smart.samples_from_json(doc, smart.DeviceSpec("/dev/nvme9", "nvme"), TS)


def test_answers_that_are_no_document() -> None:
    # A smartctl without --json rejects the option: exit bit 0, its words, the device named.
    old = (b"smartctl 6.6 2016-05-31 r4324\n\n=======> UNRECOGNIZED OPTION: json\n\n"
           b"Use smartctl -h to get a usage summary\n")
    with pytest.raises(smart.SmartctlFailure, match="^smartctl /dev/sda: =======> UNRECOGNIZED OPTION: json$"):
        smart.json_document(1, old, "/dev/sda")
    with pytest.raises(smart.SmartctlFailure, match="^smartctl /dev/sda: unparseable output.*Segmentation"):
        smart.json_document(0, b"Segmentation fault\n", "/dev/sda")
    # smartctl before 7.3 could print a text line ahead of a SCSI disk's document.
    raw = (FIXTURES / "sas-hdd_healthy_hitachi-h109060sesun600g.json").read_bytes()
    doc = smart.json_document(0, b"  Pending defect count:0 Pending Defects\n" + raw, "/dev/sdb")
    assert doc["scsi_grown_defect_list"] == 0


def test_the_recorded_scan() -> None:
    found, failed = smart.parse_scan_json(recording("scan_linux_7-scsi-devices.json"))
    assert found == [smart.DeviceSpec(f"/dev/sd{c}", "scsi") for c in "abcdefg"]
    assert failed == []


# ---- mode selection ---------------------------------------------------------------------


@pytest.mark.parametrize(("said", "version", "mode"), [
    (b"smartctl 7.3 2022-02-28 r5338 [x86_64-linux-6.1.0] (local build)\nCopyright (C) 2002-22\n", (7, 3), "json"),
    (b"smartctl 7.0 2018-12-30 r4883 [x86_64-linux] (local build)\n", (7, 0), "json"),
    (b"smartctl 6.6 2016-05-31 r4324 [x86_64-linux-4.9.0] (local build)\n", (6, 6), "text"),
])
def test_auto_reads_json_from_smartctl_7(said: bytes, version: tuple[int, int], mode: str) -> None:
    assert smart.smartctl_version(said) == version
    runner = Replay(None, answers={"_-V": (0, said)})
    source = smart.Smart(SmartSourceConfig(), SourceEnv(extra={"smartctl_runner": runner}))
    assert source.probe() is None
    assert source.output() == mode
    assert runner.calls == [["-V"]]  # asked once


def test_auto_on_an_old_smartctl_reads_its_text_through_pysmart() -> None:
    folder = FIXTURES.parent / "text" / "pysmart" / "tests" / "dataset" / "singletests" / "nvme_0"
    runner = Replay(folder, answers={"_-V": (0, b"smartctl 6.6 2016-05-31 r4324 [x86_64-linux]\n")})
    config = SmartSourceConfig(devices=(SmartDeviceConfig("/dev/nvme0", "nvme"),))
    samples = smart.Smart(config, SourceEnv(extra={"smartctl_runner": runner})).collect(TS / 1000)
    assert value(samples, "smartctl_device_percentage_used") == 28
    assert runner.calls[1] == ["-n", "standby", "-d", "nvme", "--all", "/dev/nvme0"]


def test_output_is_checked_in_the_config(tmp_path: Path) -> None:
    assert SmartSourceConfig().output == "auto"
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[sources.smart]\noutput = "json"\n')
    assert load_agent_config(cfg).sources.smart.output == "json"
    cfg.write_text('[sources.smart]\noutput = "xml"\n')
    with pytest.raises(ValueError, match="output 'xml' must be auto, json or text"):
        load_agent_config(cfg)


# ---- the recorded fleet through the source, in-process -----------------------------------


def fleet_source(folder: Path, pairs: Sequence[tuple[str, str]]) -> tuple[smart.Smart, Replay]:
    runner = Replay(folder)
    config = SmartSourceConfig(devices=tuple(SmartDeviceConfig(n, t) for n, t in pairs))
    return smart.Smart(config, SourceEnv(extra={"smartctl_runner": runner})), runner


def test_the_recorded_fleet_reads_through_the_source(tmp_path: Path) -> None:
    pairs = replay_folder(tmp_path, {**HEALTHY, **FAILING})
    assert ("/dev/bus/0", "megaraid,1") in pairs and ("/dev/sdg", "usbjmicron") in pairs
    links = [p for p in tmp_path.glob("*--info*") if not p.name.endswith(".exit")]
    assert len(links) == len(pairs)
    assert all(p.is_symlink() and p.resolve().parent == FIXTURES.resolve() for p in links), \
        "the folder links the recordings, read in place"
    source, runner = fleet_source(tmp_path, pairs)
    assert source.probe() is None and source.output() == "json"  # the folder's _-V says 7.x
    samples = source.collect(TS / 1000)
    # One call per device, `-n standby` first, smartctl_exporter's options after it.
    reads = runner.calls[1:]
    assert reads == [smart.json_read_args(smart.DeviceSpec(n, t)) for n, t in pairs]
    assert reads[0] == ["-n", "standby", "-d", "nvme", "--json", "--info", "--health", "--attributes",
                        "--tolerance=verypermissive", "--format=brief", "--log=error", "/dev/nvme0"]
    assert not by_name(samples, smart.ERRORS_METRIC)
    assert len(by_name(samples, "smartctl_device")) == len(HEALTHY) + len(FAILING)
    assert {dict(s.labels)["device"] for s in samples if s.name == "smartctl_device_smart_status" and s.value == 0} \
        == {"nvme2", "sdg"}
    assert value(samples, "smartctl_device_critical_warning", device="nvme2") == 16
    assert value(samples, "smartctl_device_percentage_used", device="nvme3") == 75
    realloc = {dict(s.labels)["device"]: s.value for s in by_name(
        samples, "smartctl_device_attribute", attribute_name="Reallocated_Sector_Ct", attribute_value_type="raw")}
    assert {d: v for d, v in realloc.items() if v} == {"sdf": 304, "bus_0_megaraid_1": 387, "sdg": 1975}
    assert dict(by_name(samples, "smartctl_device", device="bus_0_megaraid_1")[0].labels)["model_name"] == "WD4000FYYX"
    # The healthy half alone raises none of the failing signs.
    healthy = [s for s in samples if dict(s.labels)["device"] in {smart.device_label(n, t) for n, t in pairs[:7]}]
    assert {s.value for s in by_name(healthy, "smartctl_device_smart_status")} == {1}
    assert {s.value for s in by_name(healthy, "smartctl_device_critical_warning")} == {0}


def test_with_no_devices_configured_the_scan_finds_the_same_fleet(tmp_path: Path) -> None:
    pairs = replay_folder(tmp_path, {**HEALTHY, **FAILING})
    configured, _ = fleet_source(tmp_path, pairs)
    scanned, runner = fleet_source(tmp_path, [])
    got, want = scanned.collect(TS / 1000), configured.collect(TS / 1000)
    assert len(got) == len(want) > 500 and set(got) == set(want)
    assert runner.calls[1] == ["--scan-open", "--json"]


def test_scan_open_failures_are_counted(tmp_path: Path) -> None:
    replay_folder(tmp_path, {"/dev/nvme0": HEALTHY["/dev/nvme0"]})
    scan = json.loads((tmp_path / "_--scan-open_--json").read_text())
    scan["devices"].append({"name": "/dev/sdx", "info_name": "/dev/sdx", "type": "sat", "protocol": "ATA",
                            "open_error": "Permission denied"})
    (tmp_path / "_--scan-open_--json").write_text(json.dumps(scan))
    samples = fleet_source(tmp_path, [])[0].collect(TS / 1000)
    assert value(samples, smart.ERRORS_METRIC, device="sdx", reason="permission") == 1
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 3


def test_a_device_missing_from_the_folder_and_a_timeout_cost_only_themselves(tmp_path: Path) -> None:
    pairs = replay_folder(tmp_path, {"/dev/nvme0": HEALTHY["/dev/nvme0"]})
    replay = Replay(tmp_path)

    def runner(args: Sequence[str], timeout: float) -> tuple[int, bytes]:
        if "/dev/sdz" in args:
            raise subprocess.TimeoutExpired(["smartctl", *args], timeout)
        return replay(args, timeout)

    devices = (SmartDeviceConfig("/dev/sdz", "sat"), SmartDeviceConfig("/dev/sdy", "sat"),
               *(SmartDeviceConfig(n, t) for n, t in pairs))
    samples = smart.Smart(SmartSourceConfig(devices=devices, output="json"),
                          SourceEnv(extra={"smartctl_runner": runner})).collect(TS / 1000)
    assert value(samples, smart.ERRORS_METRIC, device="sdz", reason="timeout") == 1
    assert value(samples, smart.ERRORS_METRIC, device="sdy", reason="error") == 1
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 3


def test_the_folder_serves_the_exit_status_the_recording_states(tmp_path: Path) -> None:
    replay_folder(tmp_path, FAILING)
    name = file_name(smart.json_read_args(smart.DeviceSpec("/dev/sdg", "usbjmicron"))[2:])
    assert (tmp_path / f"{name}.exit").read_text().strip() == "216"
    rc, raw = Replay(tmp_path)(smart.json_read_args(smart.DeviceSpec("/dev/sdg", "usbjmicron")), 1.0)
    assert rc == 216 and json.loads(raw)["smartctl"]["exit_status"] == 216


def test_the_real_smartctl_in_json_mode() -> None:
    """The real smartctl on a device it cannot type (/dev/null): JSON mode names the device and
    smartctl's reason, as the text path does."""
    if shutil.which("smartctl") is None:
        pytest.skip("smartmontools not installed here (apt-get install smartmontools)")
    rc, out = smart.run_smartctl(["-V"], 30.0)
    version = smart.smartctl_version(out)
    assert rc == 0 and version is not None
    if version < smart.JSON_MIN_VERSION:
        pytest.skip(f"smartctl {version} predates --json")
    result = smart.read_device_json(smart.run_smartctl, smart.DeviceSpec("/dev/null"), 30.0, TS)
    assert result.samples == [] and result.error is not None
    assert str(result.error) == "smartctl /dev/null: /dev/null: Unable to detect device type"
