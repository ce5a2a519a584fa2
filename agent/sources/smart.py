"""Disk health through smartctl, under smartctl_exporter's names.

Every smartctl invocation goes through one runner, `(args, timeout) -> (exit status,
stdout bytes)`: `run_smartctl` by default, `env.extra["smartctl_runner"]` in tests,
which replay recorded outputs. smartctl's answer is read in one of two modes,
`[sources.smart] output`:
- "json" (smartctl >= 7.0): one call per device, `smartctl -n standby [-d TYPE] --json
  --info --health --attributes --tolerance=verypermissive --format=brief --log=error DEV`
  (smartctl_exporter's read, plus our `-n standby`), and `--scan-open --json` to find the
  devices. `samples_from_json()` maps the document with smartctl_exporter's field mapping
  and is pure; pySMART is not imported at all.
- "text": smartctl's plain text, interpreted by pySMART: it gets a `Smartctl` subclass
  whose low-level `generic_call` goes through that runner (the same injection point
  pySMART's own tests use). `device_samples()` maps one parsed pySMART Device to samples
  and is pure. For a smartctl older than 7.0, which has no stable JSON.
- "auto" (the default): json when `smartctl -V` says 7.0 or later, else text; decided once
  per agent start (at the probe), so a smartctl upgraded under a running agent is picked
  up at its next restart.
Both modes give the same metric names, labels and types; the exit status and smartctl's
messages are classified the same way (standby, permission, open failed, command line).

Rules that keep SMART harmless on a production node:
- never wake a sleeping disk: every call that reads a device carries `-n standby`, so
  smartctl answers "Device is in STANDBY mode" (exit bit 1) instead of spinning it up;
  the source then reports the power mode and skips the read;
- every call has a timeout, and a device's calls share one budget of `timeout`, so a
  collect() takes at most timeout x (devices + 1); a device that timed out or failed is
  counted in waystation_smart_device_errors_total{device,reason} and skipped, the others
  go on;
- missing permissions (smartctl exit bit 1 with "Permission denied"/"Operation not
  permitted") are reported as such: the agent needs CAP_SYS_RAWIO (ATA/SCSI) and
  CAP_SYS_ADMIN (NVMe), as packaging/systemd/waystation-agent.service grants.
The agent itself never imports pySMART: each read runs in a short-lived child process,
`python -m agent.sources.smart_reader` (JSON request on stdin, JSON lines on stdout; see
that module). pySMART with what it imports costs ~3.5 MB of RSS, which would otherwise stay
resident for a read every 10 minutes; in json mode the child does not import it either.
The child also contains a read that stalls past what smartctl's own timeout can stop
(pySMART on odd output, a disk in uninterruptible I/O):
each reply must come within the timeout plus READER_GRACE_S, or the child's whole process
group is killed, that device is counted as a timeout, and a new child reads the devices
after it. A device whose smartctl outlives SIGKILL (stuck in the kernel) is then skipped,
counted as "stalled", until that process is gone. A runner injected in
`env.extra["smartctl_runner"]` (tests) reads in-process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import SmartSourceConfig
from agent.sources.base import Labels, Sample, SourceEnv
from wire import MetricType

G = MetricType.GAUGE
C = MetricType.COUNTER

SmartctlRunner = Callable[[Sequence[str], float], tuple[int, bytes]]

CAPS_HINT = (
    "the agent needs CAP_SYS_RAWIO (ATA/SCSI) and CAP_SYS_ADMIN (NVMe) to read SMART; "
    "see packaging/systemd/waystation-agent.service (AmbientCapabilities)"
)
CAP_SYS_RAWIO = 17
CAP_SYS_ADMIN = 21

# smartctl exit status bits (smartctl(8) "RETURN VALUES").
EXIT_CMDLINE = 1 << 0  # command line did not parse
EXIT_OPEN = 1 << 1  # device open failed, or device in a low-power mode (with -n)
EXIT_FAILING = 1 << 3  # SMART status check returned "DISK FAILING"

log = logging.getLogger("waystation.smart")

ERRORS_METRIC = "waystation_smart_device_errors_total"
POWER_MODE_METRIC = "smartctl_device_power_mode"

_LOW_POWER = re.compile(r"Device is in (.+?) mode")
_POWER_MODE_LINE = re.compile(r"^Power mode (?:is|was):\s+(.+?)\s*$")
_ATA_ERROR_COUNT = re.compile(r"^ATA Error Count:\s+(\d+)")
_SCAN_LINE = re.compile(r"^(\S+)\s+-d\s+(\S+)")
_PERMISSION = ("Permission denied", "Operation not permitted")


def run_smartctl(args: Sequence[str], timeout: float, smartctl: str = "smartctl") -> tuple[int, bytes]:
    """The one place smartctl is started: (exit status, stdout+stderr); raises TimeoutExpired."""
    env = {**os.environ, "LANG": "C", "LC_ALL": "C"}
    proc = subprocess.run(  # noqa: S603 (configured binary, fixed arguments)
        [smartctl, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, env=env, check=False
    )
    return proc.returncode, proc.stdout


@dataclass(frozen=True)
class DeviceSpec:
    """One device to read: its path and smartctl -d type ("" lets smartctl detect it)."""

    name: str
    type: str = ""


class SmartctlFailure(Exception):
    """A device could not be read; `reason` labels the error counter."""

    reason = "error"


class SmartctlTimeout(SmartctlFailure):
    reason = "timeout"


class SmartctlPermission(SmartctlFailure):
    reason = "permission"


class SmartctlOpenFailed(SmartctlFailure):
    reason = "open"


class SmartctlStalled(SmartctlFailure):
    """An earlier read of this device is stuck past SIGKILL (uninterruptible I/O); not retried
    while that smartctl lives, so stuck processes do not pile up one per interval."""

    reason = "stalled"


class LowPowerMode(Exception):
    """The device sleeps; smartctl -n standby declined to wake it."""

    def __init__(self, mode: str, exit_status: int) -> None:
        super().__init__(mode)
        self.mode = mode
        self.exit_status = exit_status


# ---- pure helpers ---------------------------------------------------------------------


def parse_scan(lines: Iterable[str]) -> list[DeviceSpec]:
    """`smartctl --scan-open` lines -> devices; commented-out (failed) lines are skipped."""
    out: list[DeviceSpec] = []
    for line in lines:
        m = _SCAN_LINE.match(line.strip())
        if m and not line.lstrip().startswith("#") and "failed:" not in line:
            out.append(DeviceSpec(m.group(1), m.group(2)))
    return out


def scan_failures(lines: Iterable[str]) -> list[tuple[str, str]]:
    """(device, message) for scan lines smartctl could not open (`# /dev/sda -d ... failed: ...`)."""
    out = []
    for line in lines:
        if "failed:" in line:
            m = _SCAN_LINE.match(line.lstrip("# ").strip())
            out.append((m.group(1) if m else line.strip(), line.strip()))
    return out


def device_label(name: str, dev_type: str) -> str:
    """smartctl_exporter's device label: /dev/bus/0 + megaraid,1 -> bus_0_megaraid_1."""
    label = re.sub(r"^/dev/(?:disk/by-id/|disk/by-path/|)", "", name).replace("/", "_")
    if "," in dev_type:
        label += "_" + dev_type.replace(",", "_")
    return label


def low_power_mode(lines: Iterable[str]) -> str | None:
    """"Device is in STANDBY mode, exit(2)" -> "STANDBY"."""
    for line in lines:
        m = _LOW_POWER.search(line)
        if m:
            return normalize_power_mode(m.group(1))
    return None


def normalize_power_mode(text: str) -> str:
    return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_")


def power_mode_line(lines: Iterable[str]) -> str | None:
    """"Power mode is:    ACTIVE or IDLE" (printed with -n for ATA) -> "ACTIVE_OR_IDLE"."""
    for line in lines:
        m = _POWER_MODE_LINE.match(line)
        if m:
            return normalize_power_mode(m.group(1))
    return None


def ata_error_count(lines: Iterable[str]) -> int | None:
    """The ATA error log's count: "ATA Error Count: 7731 (...)" or 0 for "No Errors Logged"."""
    in_log = False
    for line in lines:
        m = _ATA_ERROR_COUNT.match(line)
        if m:
            return int(m.group(1))
        if line.startswith("SMART Error Log Version"):
            in_log = True
        elif in_log and line.strip() == "No Errors Logged":
            return 0
    return None


_BOILERPLATE = ("smartctl ", "Copyright (C)", "Use smartctl -h")


def smartctl_said(lines: Sequence[str], rc: int) -> str:
    """What smartctl said, without its banner and usage hint: "/dev/vda: Unable to detect
    device type Please specify device type with the -d option." """
    said = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(_BOILERPLATE)]
    return " ".join(said[:3])[:300] or f"exit status {rc}"


def classify_failure(rc: int, lines: Sequence[str], device: str) -> LowPowerMode | SmartctlFailure | None:
    """What a non-zero exit means for reading this device; None when the output is usable."""
    if rc & EXIT_OPEN:
        mode = low_power_mode(lines)
        if mode is not None:
            return LowPowerMode(mode, rc)
        text = "\n".join(lines)
        if any(p in text for p in _PERMISSION):
            return SmartctlPermission(f"smartctl {device}: permission denied: {CAPS_HINT}")
        return SmartctlOpenFailed(f"smartctl {device}: {smartctl_said(lines, rc)}")
    if rc & EXIT_CMDLINE:
        return SmartctlFailure(f"smartctl {device}: {smartctl_said(lines, rc)}")
    return None


def attribute_flags(flags: int) -> tuple[str, str]:
    """ATA attribute flag word -> smartctl's short ("PO--CK") and long forms."""
    bits = (("P", "prefailure"), ("O", "updated_online"), ("S", "performance"),
            ("R", "error_rate"), ("C", "event_count"), ("K", "auto_keep"))
    short = "".join(c if flags & (1 << i) else "-" for i, (c, _) in enumerate(bits))
    long = ",".join(name for i, (_, name) in enumerate(bits) if flags & (1 << i))
    return short, long


def protocol_of(dev_type: str, nvme: bool, scsi: bool) -> str:
    """smartctl JSON's device.protocol: ATA, SCSI or NVMe."""
    if nvme:
        return "NVMe"
    if scsi:
        return "SCSI"
    return "ATA"


def _int(value: object) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value).replace(",", "").split()[0])
    except (ValueError, IndexError):
        return None


def device_samples(dev: Any, spec: DeviceSpec, ts_ms: int, exit_status: int, lines: Sequence[str]) -> list[Sample]:
    """One pySMART Device (already read) -> smartctl_exporter-named samples. Pure.

    All gauges, counts included, as smartctl_exporter exposes them (no _total names).
    """
    from pySMART.interface import AtaAttributes, NvmeAttributes, SCSIAttributes

    label = device_label(spec.name, spec.type)
    dev_l: Labels = (("device", label),)
    out: list[Sample] = []

    def add(name: str, value: float | int | None, extra: Labels = (), mtype: MetricType = G) -> None:
        if value is not None:
            out.append(Sample(name, dev_l + extra, mtype, float(value), ts_ms))

    attrs = dev.if_attributes
    nvme = isinstance(attrs, NvmeAttributes)
    scsi = isinstance(attrs, SCSIAttributes)
    interface = spec.type or (dev.smartctl_interface or "")
    model, serial = dev.model or "", dev.serial or ""
    family = dev.family or ""
    out.append(Sample("smartctl_device", dev_l + (
        ("interface", interface), ("protocol", protocol_of(interface, nvme, scsi)),
        ("model_family", family), ("model_name", model), ("serial_number", serial),
        ("firmware_version", dev.firmware or "")), G, 1.0, ts_ms))
    if dev.assessment in ("PASS", "WARN", "FAIL"):
        add("smartctl_device_smart_status", 0 if dev.assessment == "FAIL" else 1)
    add("smartctl_device_smartctl_exit_status", exit_status)
    add(POWER_MODE_METRIC, 1, (("power_mode", power_mode_line(lines) or "ACTIVE"),))
    add("smartctl_device_temperature", dev.temperature, (("temperature_type", "current"),))
    if dev._capacity is not None:  # the exact byte count; .size is parsed from the rounded string
        add("smartctl_device_capacity_bytes", dev._capacity)
    if not nvme:
        add("smartctl_device_rotation_rate", 0 if dev.is_ssd and dev.rotation_rate is None else dev.rotation_rate)

    if nvme:
        add("smartctl_device_power_on_seconds", None if attrs.powerOnHours is None else attrs.powerOnHours * 3600)
        add("smartctl_device_power_cycle_count", attrs.powerCycles)
        add("smartctl_device_percentage_used", attrs.percentageUsed)
        add("smartctl_device_available_spare", attrs.availableSpare)
        add("smartctl_device_available_spare_threshold", attrs.availableSpareThreshold)
        add("smartctl_device_critical_warning", attrs.criticalWarning)
        add("smartctl_device_media_errors", attrs.integrityErrors)
        add("smartctl_device_num_err_log_entries", attrs.errorEntries)
        # NVMe data units are 1000 blocks of 512 bytes; smartctl_exporter multiplies the same way.
        add("smartctl_device_bytes_read",
            None if attrs.dataUnitsRead is None else attrs.dataUnitsRead * 512_000)
        add("smartctl_device_bytes_written",
            None if attrs.dataUnitsWritten is None else attrs.dataUnitsWritten * 512_000)
    elif isinstance(attrs, AtaAttributes):
        by_id = {a.num: a for a in attrs.legacyAttributes if a is not None}
        for num, a in sorted(by_id.items()):
            short, long = attribute_flags(a.flags)
            base: Labels = (("attribute_name", a.name), ("attribute_flags_short", short),
                            ("attribute_flags_long", long), ("attribute_id", str(num)))
            for kind, value in (("value", a.value_int), ("worst", a.worst), ("thresh", a.thresh), ("raw", a.raw_int)):
                add("smartctl_device_attribute", value, base + (("attribute_value_type", kind),))
        if 9 in by_id:
            hours = _int(by_id[9].raw)
            add("smartctl_device_power_on_seconds", None if hours is None else hours * 3600)
        if 12 in by_id:
            add("smartctl_device_power_cycle_count", by_id[12].raw_int)
        add("smartctl_device_error_log_count", ata_error_count(lines), (("error_log_type", "summary"),))
    elif scsi:
        diag = attrs.diagnostics
        ident: Labels = (("model_family", family), ("model_name", model), ("serial_number", serial))
        add("smartctl_device_power_on_seconds", None if diag.Power_On_Hours is None else diag.Power_On_Hours * 3600)
        add("smartctl_device_power_cycle_count", diag.Start_Stop_Cycles)
        add("smartctl_scsi_grown_defect_list", diag.Reallocated_Sector_Ct, ident)
        add("smartctl_read_total_uncorrected_errors", diag.Uncorrected_Reads, ident)
        add("smartctl_write_total_uncorrected_errors", diag.Uncorrected_Writes, ident)
    return out


def standby_samples(spec: DeviceSpec, mode: str, exit_status: int, ts_ms: int) -> list[Sample]:
    """A sleeping device: its power mode and smartctl's exit status, nothing read."""
    dev_l: Labels = (("device", device_label(spec.name, spec.type)),)
    return [
        Sample(POWER_MODE_METRIC, dev_l + (("power_mode", mode),), G, 1.0, ts_ms),
        Sample("smartctl_device_smartctl_exit_status", dev_l, G, float(exit_status), ts_ms),
    ]


def capability_problem(proc_root: str) -> str | None:
    """Why this process cannot read SMART (not root and no CAP_SYS_RAWIO), else None."""
    if os.geteuid() == 0:
        return None
    try:
        with open(os.path.join(proc_root, "self", "status")) as f:
            cap_eff = next((int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:")), 0)
    except OSError:
        return None
    if not cap_eff & (1 << CAP_SYS_RAWIO):
        return f"not root and without CAP_SYS_RAWIO: {CAPS_HINT}"
    return None


# ---- smartctl --json (smartctl >= 7.0), pure -------------------------------------------

# smartctl_exporter's read in one call: identity, health, ATA attributes / NVMe health log /
# SCSI counters, and the ATA error log's count. `-n standby` and `-d TYPE` go before these.
JSON_READ_OPTIONS = ("--json", "--info", "--health", "--attributes", "--tolerance=verypermissive",
                     "--format=brief", "--log=error")
JSON_SCAN_ARGS = ("--scan-open", "--json")
# smartctl 6.x's JSON was experimental (json_format_version 0.x): "auto" reads its text.
JSON_MIN_VERSION = (7, 0)
OUTPUT_MODES = ("json", "text")
_VERSION = re.compile(rb"^smartctl (\d+)\.(\d+)", re.M)
# Keys that only a document with something read from the device has.
_DEVICE_DATA = ("model_name", "scsi_model_name", "serial_number", "smart_status", "ata_smart_attributes",
                "nvme_smart_health_information_log", "scsi_grown_defect_list")


def smartctl_version(out: bytes) -> tuple[int, int] | None:
    """`smartctl -V` output -> (major, minor): "smartctl 7.3 2022-02-28 r5338 ..." -> (7, 3)."""
    m = _VERSION.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def output_for(version: tuple[int, int]) -> str:
    """The output mode "auto" picks for this smartctl version."""
    return "json" if version >= JSON_MIN_VERSION else "text"


def json_read_args(spec: DeviceSpec) -> list[str]:
    """One device's JSON read; without a type smartctl detects it (and says which in device.type)."""
    return ["-n", "standby", *(("-d", spec.type) if spec.type else ()), *JSON_READ_OPTIONS, spec.name]


def json_document(rc: int, raw: bytes, device: str) -> dict[str, Any]:
    """smartctl's answer to a --json call -> its document.

    An answer that is no smartctl document (a smartctl too old for --json, a wrapper's own
    error) is classified from its text as in text mode, else refused as unparseable; either
    way the error names the device.
    """
    text = raw.decode("utf-8", errors="replace")
    # smartctl before 7.3 can print a text line ("  Pending defect count:...") ahead of a
    # SCSI disk's document (smartctl_exporter strips it too): the document is the first line
    # that opens one.
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    try:
        doc = json.loads(text[start:])
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("smartctl"), dict):
        doc["smartctl"].setdefault("exit_status", rc)
        return doc
    lines = text.splitlines()
    problem = classify_failure(rc, lines, device)
    if isinstance(problem, SmartctlFailure):
        raise problem
    raise SmartctlFailure(f"smartctl {device}: unparseable output, not a smartctl JSON document: "
                          f"{smartctl_said(lines, rc)}")


def _num(value: object) -> float | None:
    """A JSON number as a float; anything else (absent, a string, a bool) is None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _text(doc: dict[str, Any], *keys: str) -> str:
    """The first of `keys` that holds a non-empty string, stripped ("" when none does)."""
    for key in keys:
        value = doc.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def json_messages(doc: dict[str, Any]) -> list[str]:
    """smartctl.messages[].string: what smartctl said, errors included."""
    messages = _obj(doc, "smartctl").get("messages")
    return [str(m.get("string", "")) for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def samples_from_json(doc: dict[str, Any], spec: DeviceSpec, ts_ms: int) -> list[Sample]:
    """One device's `smartctl --json` document -> the samples device_samples() gives for its
    text, under the same names, labels and types. Pure.

    A sleeping device (exit bit 1, "Device is in STANDBY mode") gives standby_samples(); a
    document saying the device could not be read raises SmartctlFailure naming the device
    (SmartctlPermission, SmartctlOpenFailed, or the command-line error). Fields follow
    smartctl_exporter's mapping; where smartctl's JSON differs between versions or device
    kinds (SCSI's scsi_model_name, 6.x's revision) the first present one is used.
    """
    head = _obj(doc, "smartctl")
    fmt = doc.get("json_format_version")
    if not head or not isinstance(fmt, list) or not fmt or fmt[0] not in (0, 1):
        # 0.x: smartctl 6.x's experimental JSON, whose fields read here are named as in 1.x.
        raise SmartctlFailure(f"smartctl {spec.name}: not a smartctl JSON document this agent reads "
                              f"(json_format_version {fmt!r}; 1.x expected)")
    rc = int(_num(head.get("exit_status")) or 0)
    messages = json_messages(doc)
    power = _obj(doc, "power_mode").get("name")
    power_mode = normalize_power_mode(power) if isinstance(power, str) and power.strip() else None
    problem = classify_failure(rc, messages, spec.name)
    if isinstance(problem, LowPowerMode):
        return standby_samples(spec, power_mode or problem.mode, rc, ts_ms)
    if problem is not None:
        if power_mode is not None and isinstance(problem, SmartctlOpenFailed):
            # Low power told by power_mode alone, without the message text mode matches.
            return standby_samples(spec, power_mode, rc, ts_ms)
        raise problem
    if not any(key in doc for key in _DEVICE_DATA):
        said = "; ".join(messages)
        raise SmartctlFailure(f"smartctl {spec.name}: no SMART data in the output" + (f" ({said})" if said else ""))

    device = _obj(doc, "device")
    label = device_label(spec.name, spec.type)
    dev_l: Labels = (("device", label),)
    out: list[Sample] = []

    def add(name: str, value: float | None, extra: Labels = ()) -> None:
        if value is not None:
            out.append(Sample(name, dev_l + extra, G, float(value), ts_ms))

    protocol = _text(device, "protocol")
    family = _text(doc, "model_family")
    model = _text(doc, "model_name", "scsi_model_name")
    serial = _text(doc, "serial_number")
    out.append(Sample("smartctl_device", dev_l + (
        ("interface", spec.type or _text(device, "type")), ("protocol", protocol),
        ("model_family", family), ("model_name", model), ("serial_number", serial),
        ("firmware_version", _text(doc, "firmware_version", "scsi_revision", "revision"))), G, 1.0, ts_ms))
    passed = _obj(doc, "smart_status").get("passed")
    if isinstance(passed, bool):
        add("smartctl_device_smart_status", 1 if passed else 0)
    add("smartctl_device_smartctl_exit_status", rc)
    add(POWER_MODE_METRIC, 1, (("power_mode", power_mode or "ACTIVE"),))
    for kind, degrees in _obj(doc, "temperature").items():  # current, drive_trip, ...
        add("smartctl_device_temperature", _num(degrees), (("temperature_type", str(kind)),))
    capacity = _num(_obj(doc, "user_capacity").get("bytes"))
    # A multi-namespace NVMe read by its controller has no user_capacity, only the total.
    add("smartctl_device_capacity_bytes", capacity if capacity is not None else _num(doc.get("nvme_total_capacity")))
    nvme = _obj(doc, "nvme_smart_health_information_log")
    if protocol != "NVMe" and not nvme:
        add("smartctl_device_rotation_rate", _num(doc.get("rotation_rate")))
    on_time = _obj(doc, "power_on_time")
    hours = _num(on_time.get("hours"))
    if hours is not None:
        add("smartctl_device_power_on_seconds", hours * 3600 + (_num(on_time.get("minutes")) or 0) * 60)
    cycles = _num(doc.get("power_cycle_count"))
    if cycles is None:
        cycles = _num(_obj(doc, "scsi_start_stop_cycle_counter").get("accumulated_start_stop_cycles"))
    if cycles is None:
        cycles = _num(nvme.get("power_cycles"))
    add("smartctl_device_power_cycle_count", cycles)

    if nvme:
        for metric in ("percentage_used", "available_spare", "available_spare_threshold", "critical_warning",
                       "media_errors", "num_err_log_entries"):
            add("smartctl_device_" + metric, _num(nvme.get(metric)))
        # NVMe data units are 1000 blocks of 512 bytes whatever the LBA size (NVMe base spec).
        for metric, key in (("bytes_read", "data_units_read"), ("bytes_written", "data_units_written")):
            units = _num(nvme.get(key))
            add("smartctl_device_" + metric, None if units is None else units * 512_000)
    table = _obj(doc, "ata_smart_attributes").get("table")
    for a in table if isinstance(table, list) else []:
        if not isinstance(a, dict) or _num(a.get("id")) is None:
            continue
        short, long = attribute_flags(int(_num(_obj(a, "flags").get("value")) or 0))
        base: Labels = (("attribute_name", str(a.get("name", ""))), ("attribute_flags_short", short),
                        ("attribute_flags_long", long), ("attribute_id", str(int(a["id"]))))
        for kind, value in (("value", a.get("value")), ("worst", a.get("worst")), ("thresh", a.get("thresh")),
                            ("raw", _obj(a, "raw").get("value"))):
            add("smartctl_device_attribute", _num(value), base + (("attribute_value_type", kind),))
    for log_type, log in _obj(doc, "ata_smart_error_log").items():  # summary, extended
        if isinstance(log, dict):
            add("smartctl_device_error_log_count", _num(log.get("count")), (("error_log_type", str(log_type)),))
    ident: Labels = (("model_family", family), ("model_name", model), ("serial_number", serial))
    add("smartctl_scsi_grown_defect_list", _num(doc.get("scsi_grown_defect_list")), ident)
    counters = _obj(doc, "scsi_error_counter_log")
    for direction in ("read", "write"):
        add(f"smartctl_{direction}_total_uncorrected_errors",
            _num(_obj(counters, direction).get("total_uncorrected_errors")), ident)
    return out


def parse_scan_json(doc: dict[str, Any]) -> tuple[list[DeviceSpec], list[tuple[str, str]]]:
    """`smartctl --scan-open --json` -> (devices, [(device, message)] for those it could not open)."""
    found: list[DeviceSpec] = []
    failed: list[tuple[str, str]] = []
    devices = doc.get("devices")
    for d in devices if isinstance(devices, list) else []:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            continue
        name, dev_type = d["name"], str(d.get("type") or "")
        if "open_error" in d:
            failed.append((name, f"{name} -d {dev_type}: open failed: {d['open_error']}"))
        else:
            found.append(DeviceSpec(name, dev_type))
    return found, failed


# ---- raw I/O ----------------------------------------------------------------------------


def _load_pysmart() -> Any:
    """Import pySMART without letting it change the agent's LANG (it sets LANG=C on import)."""
    saved = os.environ.get("LANG")
    try:
        import pySMART
    finally:
        if saved is None:
            os.environ.pop("LANG", None)
        else:
            os.environ["LANG"] = saved
    return pySMART


def _runner_smartctl_class() -> Any:
    from pySMART.smartctl import Smartctl

    class RunnerSmartctl(Smartctl):  # type: ignore[misc]
        """pySMART's smartctl wrapper, with every call going through our runner.

        One instance reads one device: it adds `-n standby` to device reads, gives the
        device's calls one shared time budget, answers a repeated call (pySMART's
        classification re-reads `--all` for SCSI and MegaRAID) from what it already has,
        and turns exit statuses that make the output useless into exceptions.
        """

        def __init__(self, runner: SmartctlRunner, timeout: float, device: str = "", real_type: str = "") -> None:
            super().__init__(smartctl_path="smartctl", options=[], sudo=False)
            self.runner = runner
            self.deadline = time.monotonic() + timeout
            self.device = device
            self.real_type = real_type  # a -d type pySMART does not know (cciss,N, usbjmicron)
            self.cache: dict[tuple[str, ...], tuple[list[str], int]] = {}
            self.failure: BaseException | None = None
            self.all_lines: list[str] = []
            self.all_status = 0

        def generic_call(self, params: list[str], pass_options: bool = False) -> tuple[list[str], int]:
            args = list(params)
            if self.real_type and "-d" in args[:-1]:
                i = args.index("-d")
                if args[i + 1] != "test":
                    args[i + 1] = self.real_type
            if not any(a.startswith("--scan") for a in args) and "test" not in args and "-V" not in args:
                args = ["-n", "standby", *args]
            key = tuple(args)
            if key in self.cache:
                return self.cache[key]
            if self.failure is not None:  # one timeout ends this device's read
                raise self.failure
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.failure = SmartctlTimeout(f"smartctl {self.device}: time budget spent")
                raise self.failure
            try:
                rc, raw = self.runner(args, remaining)
            except subprocess.TimeoutExpired as exc:
                self.failure = SmartctlTimeout(f"smartctl {self.device}: timed out after {exc.timeout:.0f}s")
                raise self.failure from exc
            # Not pySMART's _decode_output: its chardet guess costs ~22 MB of tables per agent,
            # and smartctl under LANG=C writes ASCII.
            lines: list[str] = raw.decode("utf-8", errors="replace").splitlines()
            problem = classify_failure(rc, lines, self.device or " ".join(args))
            if problem is not None:
                raise problem
            if "--all" in args:
                self.all_lines, self.all_status = lines, rc
            self.cache[key] = (lines, rc)
            return lines, rc

    return RunnerSmartctl


def pysmart_type(dev_type: str) -> str | None:
    """The -d type to hand pySMART, which knows only some; the real one is put back per call."""
    from pySMART.utils import smartctl_isvalid_type

    if not dev_type:
        return None
    if smartctl_isvalid_type(dev_type.lower()):
        return dev_type
    return "nvme" if dev_type.startswith(("nvme", "snt")) else "sat"


@dataclass
class DeviceRead:
    """The outcome of reading one device."""

    spec: DeviceSpec
    samples: list[Sample]
    error: SmartctlFailure | None = None


def read_device(runner: SmartctlRunner, spec: DeviceSpec, timeout: float, ts_ms: int) -> DeviceRead:
    """Read one device through pySMART; failures come back in .error, never raised."""
    pysmart = _load_pysmart()
    real = spec.type if spec.type and pysmart_type(spec.type) != spec.type else ""
    sm = _runner_smartctl_class()(runner, timeout, spec.name, real)
    try:
        dev = pysmart.Device(spec.name, interface=pysmart_type(spec.type), smartctl=sm)
    except LowPowerMode as exc:
        return DeviceRead(spec, standby_samples(spec, exc.mode, exc.exit_status, ts_ms))
    except SmartctlFailure as exc:
        return DeviceRead(spec, [], exc)
    except Exception as exc:  # noqa: BLE001 (pySMART on an output it cannot parse)
        return DeviceRead(spec, [], SmartctlFailure(f"smartctl {spec.name}: unparseable output: {exc!r}"))
    if not sm.all_lines:
        return DeviceRead(spec, [], SmartctlOpenFailed(f"smartctl {spec.name}: no data (device missing?)"))
    if dev.if_attributes is None and dev.model is None:
        return DeviceRead(spec, [], SmartctlFailure(f"smartctl {spec.name}: no SMART data in the output"))
    resolved = spec if spec.type else DeviceSpec(spec.name, dev.smartctl_interface or "")
    return DeviceRead(spec, device_samples(dev, resolved, ts_ms, sm.all_status, sm.all_lines))


def scan_devices(runner: SmartctlRunner, timeout: float) -> tuple[list[DeviceSpec], list[DeviceRead]]:
    """What `smartctl --scan-open` finds, plus the devices it could not open (as failed reads)."""
    sm = _runner_smartctl_class()(runner, timeout, "--scan-open")
    lines, _ = sm.generic_call(["--scan-open"])
    failed = []
    for name, msg in scan_failures(lines):
        err: SmartctlFailure = (SmartctlPermission(f"smartctl {name}: permission denied: {CAPS_HINT}")
                                if any(p in msg for p in _PERMISSION) else SmartctlOpenFailed(msg))
        failed.append(DeviceRead(DeviceSpec(name), [], err))
    return parse_scan(lines), failed


def read_device_json(runner: SmartctlRunner, spec: DeviceSpec, timeout: float, ts_ms: int) -> DeviceRead:
    """Read one device with `smartctl --json`, no pySMART; failures come back in .error, never raised."""
    try:
        rc, raw = runner(json_read_args(spec), timeout)
    except subprocess.TimeoutExpired as exc:
        return DeviceRead(spec, [], SmartctlTimeout(f"smartctl {spec.name}: timed out after {exc.timeout:.0f}s"))
    except OSError as exc:
        return DeviceRead(spec, [], SmartctlFailure(f"smartctl {spec.name}: {exc}"))
    try:
        doc = json_document(rc, raw, spec.name)
        resolved = spec if spec.type else DeviceSpec(spec.name, _text(_obj(doc, "device"), "type"))
        return DeviceRead(spec, samples_from_json(doc, resolved, ts_ms))
    except SmartctlFailure as exc:
        return DeviceRead(spec, [], exc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a document shaped like no smartctl's
        return DeviceRead(spec, [], SmartctlFailure(f"smartctl {spec.name}: unparseable output: {exc!r}"))


def scan_devices_json(runner: SmartctlRunner, timeout: float) -> tuple[list[DeviceSpec], list[DeviceRead]]:
    """scan_devices() through `smartctl --scan-open --json`."""
    try:
        rc, raw = runner(list(JSON_SCAN_ARGS), timeout)
    except subprocess.TimeoutExpired as exc:
        raise SmartctlTimeout(f"smartctl --scan-open: timed out after {exc.timeout:.0f}s") from exc
    found, failures = parse_scan_json(json_document(rc, raw, "--scan-open"))
    failed = []
    for name, msg in failures:
        err: SmartctlFailure = (SmartctlPermission(f"smartctl {name}: permission denied: {CAPS_HINT}")
                                if any(p in msg for p in _PERMISSION) else SmartctlOpenFailed(f"smartctl {msg}"))
        failed.append(DeviceRead(DeviceSpec(name), [], err))
    return found, failed


def _ignore(_: object) -> None:
    return None


def read_devices(runner: SmartctlRunner, configured: Sequence[DeviceSpec], timeout: float, ts_ms: int,
                 skip: Sequence[DeviceSpec] = (), listed: Callable[[list[DeviceSpec]], None] = _ignore,
                 starting: Callable[[DeviceSpec], None] = _ignore, output: str = "text") -> Iterator[DeviceRead]:
    """Every device's read, one at a time: the configured devices, or a scan's; not `skip`.

    `listed(specs)` is told the devices about to be read, and `starting(spec)` each one
    before it is read, so whoever watches the reads knows which device a stall belongs to
    and which are left after it. `output` is "json" or "text" (see the module docstring).
    """
    if output not in OUTPUT_MODES:
        raise ValueError(f"output {output!r} must be one of {OUTPUT_MODES}")
    json_mode = output == "json"
    specs = list(configured)
    if not specs:
        specs, failed = scan_devices_json(runner, timeout) if json_mode else scan_devices(runner, timeout)
        yield from failed
    specs = [s for s in specs if s not in skip]
    listed(specs)
    read = read_device_json if json_mode else read_device
    for spec in specs:
        starting(spec)
        yield read(runner, spec, timeout, ts_ms)


# ---- the reader child process ---------------------------------------------------------

_ERROR_CLASSES: dict[str, type[SmartctlFailure]] = {
    cls.reason: cls
    for cls in (SmartctlFailure, SmartctlTimeout, SmartctlPermission, SmartctlOpenFailed, SmartctlStalled)}


def read_to_json(r: DeviceRead) -> str:
    return json.dumps({"read": {
        "name": r.spec.name, "type": r.spec.type,
        "samples": [[s.name, s.labels, int(s.mtype), s.value, s.ts_ms] for s in r.samples],
        "error": None if r.error is None else [r.error.reason, str(r.error)]}})


def read_from_json(doc: dict[str, Any]) -> DeviceRead:
    """One `{"read": ...}` line -> DeviceRead; KeyError/TypeError/ValueError on a malformed one."""
    spec = DeviceSpec(str(doc["name"]), str(doc["type"]))
    samples = [Sample(str(name), tuple((str(k), str(v)) for k, v in labels), MetricType(mtype), float(value),
                      int(ts)) for name, labels, mtype, value, ts in doc["samples"]]
    error = None
    if doc["error"] is not None:
        reason, message = doc["error"]
        error = _ERROR_CLASSES.get(reason, SmartctlFailure)(str(message))
    return DeviceRead(spec, samples, error)


def spec_list(value: object) -> list[DeviceSpec]:
    """[[name, type], ...] from a request or reply -> specs; TypeError/ValueError when malformed."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list of [name, type], got {value!r:.100}")
    return [DeviceSpec(str(name), str(dev_type)) for name, dev_type in value]


class SmartReaderError(Exception):
    """The reader child process failed outside any device's read (at start, or on exit)."""


class ReaderAborted(SmartctlFailure):
    """The child was killed or died while reading `spec`; `reason` says how."""

    def __init__(self, message: str, spec: DeviceSpec, reason: str) -> None:
        super().__init__(message)
        self.spec = spec
        self.reason = reason


# Beyond smartctl's own timeout, what the child may take per reply: interpreter start and
# pySMART's import on a busy node.
READER_GRACE_S = 10.0
# One device's reply is tens of KB; a line beyond this means the child has gone wrong.
READER_MAX_LINE = 4 * 1024 * 1024


def reader_command() -> tuple[list[str], dict[str, str] | None]:
    """The child's command line and environment (None: the agent's own).

    The child runs with cwd "/" so its first sys.path entry shadows nothing; when the agent
    runs from a checkout rather than an installed package, PYTHONPATH points the child at
    the same code.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = None
    if root not in sys.path[1:]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return [sys.executable, "-m", "agent.sources.smart_reader"], env


def which(program: str) -> str | None:
    """shutil.which without importing shutil (which loads the bz2 and lzma libraries)."""
    dirs = [""] if os.sep in program else os.environ.get("PATH", os.defpath).split(os.pathsep)
    for d in dirs:
        path = os.path.join(d, program) if d else program
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


def process_group_alive(pgid: int, proc_root: str = "/proc") -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(os.path.join(proc_root, pid, "stat")) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class ReaderProcess:
    """One run of the reader child: send the request, yield its reads as they come.

    Every reply (a JSON line) must arrive within `line_timeout` of the previous one; other
    output (a warning, a traceback) does not extend that. A child that misses the deadline
    or dies mid-device has its whole process group killed (smartctl included) and ends the
    run with ReaderAborted for the device it was reading; `devices` then tells which were
    left after it.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str] | None, request: dict[str, Any],
                 line_timeout: float) -> None:
        self.command = list(command)
        self.env = env
        self.request = request
        self.line_timeout = line_timeout
        self.devices: list[DeviceSpec] | None = None  # what the child said it would read
        self.reading: DeviceSpec | None = None  # announced and not yet answered
        self.pgid = 0
        self.chatter: list[str] = []  # lines that are not replies: a traceback, a warning
        self.deadline = 0.0

    def reads(self) -> Iterator[DeviceRead]:
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd="/", env=self.env, close_fds=True, start_new_session=True)
        self.pgid = proc.pid
        self.deadline = time.monotonic() + self.line_timeout
        try:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(self.request).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died at once; its output says why
            for line in self._lines(proc.stdout.fileno()):
                yield from self._reply(line)
            try:
                rc = proc.wait(max(0.1, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # output closed, process lingering
                rc = self._kill(proc)
        except SmartctlFailure as exc:  # a stall or a runaway line: the group goes
            self._kill(proc)
            if self.reading is None:
                raise
            raise ReaderAborted(str(exc), self.reading, exc.reason) from exc
        finally:
            if proc.poll() is None:
                self._kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        if self.reading is not None:
            raise ReaderAborted(f"SMART reader exited {rc} while reading {self.reading.name}: {self.said()}",
                                self.reading, "error")
        if rc != 0:
            raise SmartReaderError(f"SMART reader exited {rc}: {self.said()}")

    def _kill(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait()

    def said(self) -> str:
        return " | ".join(self.chatter[-5:]) or "no output"

    def _noise(self, text: str) -> None:
        self.chatter.append(text.strip()[:300])
        del self.chatter[:-20]  # the end of a traceback says what went wrong

    def _reply(self, line: str) -> Iterator[DeviceRead]:
        try:
            doc = json.loads(line) if line.startswith("{") else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            self._noise(line)
            return
        self.deadline = time.monotonic() + self.line_timeout
        try:
            if "devices" in doc:
                self.devices = spec_list(doc["devices"])
            elif "reading" in doc:
                self.reading = spec_list([doc["reading"]])[0]
            elif "read" in doc:
                read = read_from_json(doc["read"])
                self.reading = None
                yield read
            else:
                self._noise(line)
        except (KeyError, TypeError, ValueError) as exc:
            self._noise(f"malformed reply {line[:200]!r}: {exc!r}")
            if "read" in doc and self.reading is not None:
                spec, self.reading = self.reading, None
                yield DeviceRead(spec, [], SmartctlFailure(f"SMART reader: malformed reply for {spec.name}: {exc!r}"))

    def _lines(self, fd: int) -> Iterator[str]:
        """The child's output lines until it closes it; SmartctlTimeout when the deadline
        passes, SmartctlFailure for a line beyond READER_MAX_LINE."""
        buf = bytearray()
        scanned = 0  # buf[:scanned] holds no newline
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            nl = buf.find(b"\n", scanned)
            if nl >= 0:
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                scanned = 0
                yield line.decode("utf-8", errors="replace")
                continue
            scanned = len(buf)
            if len(buf) > READER_MAX_LINE:
                raise SmartctlFailure(f"SMART reader wrote a line beyond {READER_MAX_LINE} bytes; killed")
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                what = f"reading {self.reading.name}" if self.reading else "before any reply"
                raise SmartctlTimeout(
                    f"SMART reader stalled {what} for {self.line_timeout:.0f}s; killed ({self.said()})")
            if not poller.poll(remaining * 1000):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if buf:
                    yield buf.decode("utf-8", errors="replace")
                return
            buf += chunk


class Smart:
    """[sources.smart]: per-device SMART health, read at most every interval (10 m)."""

    name = "smart"

    def __init__(self, config: SmartSourceConfig, env: SourceEnv) -> None:
        self.config = config
        self.env = env
        injected = env.extra.get("smartctl_runner")
        self.in_process = callable(injected)
        self.runner: SmartctlRunner = (
            injected if callable(injected) else functools.partial(run_smartctl, smartctl=config.smartctl)
        )
        self.reader_command, self.reader_env = reader_command()
        self.errors: dict[tuple[str, str], int] = {}  # (device, reason) -> count since start
        self.stuck: dict[DeviceSpec, int] = {}  # device -> process group of a read killed mid-device
        # "json" or "text"; None until `smartctl -V` has decided "auto" (the probe, or the first collect).
        self._output: str | None = None if config.output == "auto" else config.output
        self.smartctl_version: tuple[int, int] | None = None

    @property
    def timeout(self) -> float:
        return float(self.config.timeout)

    def _version_said(self, rc: int, out: bytes) -> str | None:
        """Take in `smartctl -V`'s answer (deciding "auto"); why it is unusable, else None."""
        version = smartctl_version(out)
        if rc != 0 or version is None:
            said = smartctl_said(out.decode(errors="replace").splitlines(), rc)
            return f"smartctl -V exited {rc} without a version: {said}"
        self.smartctl_version = version
        if self._output is None:
            self._output = output_for(version)
            log.info("smart: smartctl %d.%d: reading its %s output", *version, self._output)
        return None

    def output(self) -> str:
        """The mode reads use, "json" or "text" (see the module docstring)."""
        if self._output is None:
            try:
                rc, out = self.runner(["-V"], self.timeout)
            except (OSError, subprocess.SubprocessError) as exc:
                raise SmartctlFailure(f"smartctl -V: {exc}") from exc
            problem = self._version_said(rc, out)
            if problem is not None:
                raise SmartctlFailure(problem)
        assert self._output is not None
        return self._output

    def probe(self) -> str | None:
        if not self.in_process:
            if which(self.config.smartctl) is None:
                return f"unavailable: smartctl not found at {self.config.smartctl!r} (apt-get install smartmontools)"
            problem = capability_problem(self.env.proc_root)
            if problem is not None:
                return f"unavailable: {problem}"
        try:
            rc, out = self.runner(["-V"], self.timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable: smartctl not runnable: {exc}"
        if rc != 0 or b"smartctl" not in out:
            return f"unavailable: smartctl -V exited {rc}"
        if self._output is None and (problem := self._version_said(rc, out)) is not None:
            return f"unavailable: {problem}"
        import importlib.util

        if self._output == "text" and importlib.util.find_spec("pySMART") is None:
            why = "" if self.config.output == "text" else " (smartctl before 7.0 has no --json)"
            return f"unavailable: pySMART not installed (pip install pySMART), needed for smartctl's text output{why}"
        return None

    def configured(self) -> list[DeviceSpec]:
        return [DeviceSpec(d.name, d.type) for d in self.config.devices]

    def reads(self, ts_ms: int) -> Iterator[DeviceRead]:
        output = self.output()
        if self.in_process:
            yield from read_devices(self.runner, self.configured(), self.timeout, ts_ms, output=output)
            return
        for spec, pgid in list(self.stuck.items()):
            if process_group_alive(pgid, self.env.proc_root):
                yield DeviceRead(spec, [], SmartctlStalled(
                    f"smartctl {spec.name}: a read from an earlier interval is still stuck (process group {pgid}); "
                    "not read again until it ends"))
            else:
                del self.stuck[spec]
        smartctl = which(self.config.smartctl) or self.config.smartctl
        devices = self.configured()  # empty: the child scans
        while True:
            request = {"smartctl": smartctl, "timeout": self.timeout, "ts_ms": ts_ms, "output": output,
                       "devices": [[d.name, d.type] for d in devices],
                       "skip": [[d.name, d.type] for d in self.stuck]}
            child = ReaderProcess(self.reader_command, self.reader_env, request, self.timeout + READER_GRACE_S)
            try:
                yield from child.reads()
                return
            except ReaderAborted as exc:
                yield DeviceRead(exc.spec, [], SmartctlTimeout(str(exc)) if exc.reason == "timeout"
                                 else SmartctlFailure(str(exc)))
                if exc.reason == "timeout":
                    self.stuck[exc.spec] = child.pgid
                listed = child.devices or []
                devices = listed[listed.index(exc.spec) + 1:] if exc.spec in listed else []
                if not devices:
                    return
                log.warning("smart: %s; reading the %d devices after it in a new reader", exc, len(devices))

    def collect(self, now: float) -> list[Sample]:
        ts_ms = int(now * 1000)
        reads: list[DeviceRead] = []
        try:
            reads.extend(self.reads(ts_ms))
        except (SmartReaderError, SmartctlFailure) as exc:
            if not reads:
                raise
            log.warning("smart: %s (the %d devices read before are kept)", exc, len(reads))
        out: list[Sample] = []
        for r in reads:
            out += r.samples
            if r.error is not None:
                key = (device_label(r.spec.name, r.spec.type), r.error.reason)
                if key not in self.errors:  # said once per device and reason; counted always
                    log.warning("smart: %s", r.error)
                self.errors[key] = self.errors.get(key, 0) + 1
        for (device, reason), count in sorted(self.errors.items()):
            out.append(Sample(ERRORS_METRIC, (("device", device), ("reason", reason)), C, float(count), ts_ms))
        failed = [r.error for r in reads if r.error is not None]
        if reads and len(failed) == len(reads) and all(isinstance(e, SmartctlPermission) for e in failed):
            # Nothing readable and the reason is permissions: fail loudly, once per interval.
            raise SmartctlPermission(f"no device readable: {CAPS_HINT}")
        return out
