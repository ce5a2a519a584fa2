"""Recorded disks, healthy and failing, as a node the real agent reads through smartctl --json.

`replay_folder(dest, disks)` writes a SMARTCTL_REPLAY folder for tests/fakes/smartctl-replay
(the agent's reader child) and tests/fakes/smartctl.Replay (in-process) in which each device
answers the JSON read the SMART source makes (`smart.json_read_args`) with a recorded
`smartctl --json` document from ../shared/fixtures/smartctl/json, and the exit status that
recording states (`smartctl.exit_status`). The folder holds symbolic links to the
recordings, read in place, plus small files of its own: each link's NAME.exit, the answer
to `--scan-open --json` listing the same devices, and `_-V` (a smartctl >= 7.0, so the
agent's `output = "auto"` reads JSON here).

Each device's -d type is the one its recording was read with (its command line's `-d`, else
the type smartctl detected), so a MegaRAID disk is read as `/dev/bus/0 -d megaraid,1`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.sources.smart import JSON_MIN_VERSION, JSON_SCAN_ARGS, DeviceSpec, json_read_args
from tests.fakes.smartctl import file_name

REPO = Path(__file__).resolve().parents[2]
# WAYSTATION_SHARED as in tests/conftest.py, for a checkout whose ../shared is elsewhere.
FIXTURES = Path(os.environ.get("WAYSTATION_SHARED", REPO.parent / "shared")) / "fixtures" / "smartctl" / "json"

# Healthy disks of each kind, as smartctl >= 7.0 reports them (the 6.7 SAS recording is
# left out: a JSON-reading agent has a smartctl that writes JSON 1.x).
HEALTHY: dict[str, str] = {
    "/dev/nvme0": "nvme_datacenter_healthy_samsung-pm9a3.json",
    "/dev/nvme1": "nvme_client_healthy_full-a-j_corsair-mp510.json",
    "/dev/sda": "sata-ssd_datacenter_healthy_samsung-mz7lh1t9hmlt.json",
    "/dev/sdb": "sata-ssd_client_healthy_full-x-j_samsung-860evo.json",
    "/dev/sdc": "hdd_sata_healthy_seagate-exos-x16.json",
    "/dev/sdd": "hdd_sata_healthy_full-a-j_wdc-wd140edfz.json",
    "/dev/sde": "sas-hdd_healthy_hitachi-h109060sesun600g.json",
}

# Disks that fail or wear: SMART FAILED with NVMe critical warning 0x10, 75 % worn NVMe,
# 304 and 387 reallocated sectors (still PASSED; the second behind MegaRAID), and a FAILED
# HDD (Reallocated_Sector_Ct 1975 FAILING_NOW) behind a USB JMicron bridge.
FAILING: dict[str, str] = {
    "/dev/nvme2": "nvme_failed_critical-warning_samsung-mzwll3t2hajq.json",
    "/dev/nvme3": "nvme_datacenter_worn-75pct_intel-ssdpe2kx020t7.json",
    "/dev/sdf": "hdd_sata_reallocated-304_passed_seagate-st3500418as.json",
    "/dev/bus/0": "hdd_megaraid-sat_reallocated-387_wdc-wd4000fyyx.json",
    "/dev/sdg": "hdd_usb-jmicron-bridge_failed_hitachi-hds721050dle630.json",
}


def recording(fixture: str) -> dict[str, Any]:
    """One recorded document, read in place."""
    doc: dict[str, Any] = json.loads((FIXTURES / fixture).read_text())
    return doc


def recorded_type(doc: dict[str, Any]) -> str:
    """The -d type a recording was read with: its command line's, else the one smartctl detected."""
    argv = [str(a) for a in doc.get("smartctl", {}).get("argv", [])]
    for i, arg in enumerate(argv):
        if arg in ("-d", "--device") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    device = doc.get("device")
    return str(device.get("type", "")) if isinstance(device, dict) else ""


def replay_folder(dest: Path, disks: dict[str, str]) -> list[tuple[str, str]]:
    """Write a SMARTCTL_REPLAY folder serving `disks` (device path -> json fixture name) in JSON mode;
    returns the (device, smartctl -d type) pairs to put in [[sources.smart.devices]].

    The folder also answers `smartctl --scan-open --json` with the same devices and types,
    so an agent configured with no devices finds the same disks through its scan. A
    recording without a device (smartctl could not type it) is listed by the scan as a
    device it could not open, in smartctl's words.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pairs: list[tuple[str, str]] = []
    scanned: list[dict[str, Any]] = []
    version = JSON_MIN_VERSION
    for device, fixture in disks.items():
        source = FIXTURES / fixture
        doc = recording(fixture)
        head = doc["smartctl"]
        dev_type = recorded_type(doc)
        name = file_name(json_read_args(DeviceSpec(device, dev_type))[2:])  # the stand-ins drop -n standby
        link = dest / name
        link.unlink(missing_ok=True)
        link.symlink_to(source)
        (dest / f"{name}.exit").write_text(f"{int(head['exit_status'])}\n")
        pairs.append((device, dev_type))
        version = max(version, (int(head["version"][0]), int(head["version"][1])))
        entry: dict[str, Any] = {"name": device, "info_name": device, "type": dev_type or "auto",
                                 "protocol": str(doc.get("device", {}).get("protocol", ""))}
        if "device" not in doc:
            entry["open_error"] = "; ".join(str(m.get("string", "")) for m in head.get("messages", []))
        scanned.append(entry)
    scan = {"json_format_version": [1, 0],
            "smartctl": {"version": list(version), "argv": ["smartctl", *JSON_SCAN_ARGS], "exit_status": 0},
            "devices": scanned}
    (dest / file_name(JSON_SCAN_ARGS)).write_text(json.dumps(scan, indent=2) + "\n")
    (dest / "_-V").write_text(f"smartctl {version[0]}.{version[1]} (replaying recorded smartctl --json outputs)\n")
    return pairs
