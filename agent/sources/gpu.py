"""NVIDIA GPUs through NVML, under dcgm-exporter's metric names and labels.

Raw NVML calls live in the `Gpu` source (`_read`), which records NVML's own values and
units in a GpuReading; `parse()` maps a recorded NvmlReading to samples and is what the
tests drive. The NVML module is a parameter (`env.extra["nvml"]`), imported lazily from
pynvml only when the source is enabled, so a fake built from recorded `nvidia-smi -q -x`
output can stand in for it.

Every NVML call may fail per GPU and driver: NotSupported, FunctionNotFound and
NoPermission are remembered per GPU and that field is never asked for again (a query that
fails costs a driver round trip every interval); GpuIsLost marks the GPU lost
(`waystation_gpu_lost 1`) and stops all reads of it, the other GPUs carry on; anything
else skips the field for this interval only.

XID errors are a real counter per XID code (`waystation_gpu_xid_errors_total`), fed
from NVML critical-error events by a dedicated daemon thread whose waits are bounded,
rather than dcgm-exporter's sticky last-XID gauge. A code's counter is born by its first
event, already at 1: the runner's generic rule for born counters (agent/runner.py) has
the summarizer send a 0 just before the first reading that counts it, so increase() and
rate() over the history count that first event (not for an XID that came before the
source's first complete reading: that reading is the baseline). Beside each counter,
`waystation_gpu_xid_last_timestamp_seconds` is the wall time of that code's last event: an
alert on "an XID in the last 15 minutes" reads it on any path (the scrape of the collector
shows only a series' newest point, never the zero), for a GPU's first XID as for its tenth.

For that rule a reading is `partial` when a read that gives counters (COUNTER_READERS,
the counter fields) failed for this interval only before it ever succeeded on that GPU:
the series it would have given may exist, and must not look born when they show up
next time. A read that has succeeded once has put its series in the runner's memory, so
its later failures do not matter; one that is not supported is never asked again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config import GpuSourceConfig
from agent.sources.base import Labels, Sample, SourceEnv
from wire import MetricType

log = logging.getLogger("waystation.agent.gpu")

G = MetricType.GAUGE
C = MetricType.COUNTER
MIB = 1024 * 1024

# NVML return codes (nvml.h); stable across driver versions.
NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
# Asking again will not change these answers while the driver stays loaded.
PERMANENT_ERRORS = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NO_PERMISSION, NVML_ERROR_FUNCTION_NOT_FOUND})

# How long one nvmlEventSetWait may block: bounds how late the event thread notices stop.
EVENT_WAIT_MS = 1000

# Clock-event (throttle) reason bit -> reason label, spelled as nvidia-smi's
# clocks_event_reason_* / clocks_throttle_reason_* elements are.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clocks_setting"),
)

# Raw reading key (NVML's unit) -> (metric, type, factor to the metric's unit).
# Names, types and units are dcgm-exporter's (FB in MiB, power in W, energy in mJ,
# PCIe throughput in KB/s, clocks in MHz).
METRICS: dict[str, tuple[str, MetricType, float]] = {
    "util_gpu": ("DCGM_FI_DEV_GPU_UTIL", G, 1.0),
    "util_mem": ("DCGM_FI_DEV_MEM_COPY_UTIL", G, 1.0),
    "util_enc": ("DCGM_FI_DEV_ENC_UTIL", G, 1.0),
    "util_dec": ("DCGM_FI_DEV_DEC_UTIL", G, 1.0),
    "fb_total_bytes": ("DCGM_FI_DEV_FB_TOTAL", G, 1.0 / MIB),
    "fb_used_bytes": ("DCGM_FI_DEV_FB_USED", G, 1.0 / MIB),
    "fb_free_bytes": ("DCGM_FI_DEV_FB_FREE", G, 1.0 / MIB),
    "fb_reserved_bytes": ("DCGM_FI_DEV_FB_RESERVED", G, 1.0 / MIB),
    "gpu_temp_c": ("DCGM_FI_DEV_GPU_TEMP", G, 1.0),
    "slowdown_temp_c": ("DCGM_FI_DEV_SLOWDOWN_TEMP", G, 1.0),
    "memory_temp_c": ("DCGM_FI_DEV_MEMORY_TEMP", G, 1.0),
    "power_mw": ("DCGM_FI_DEV_POWER_USAGE", G, 1e-3),
    "power_limit_mw": ("DCGM_FI_DEV_POWER_MGMT_LIMIT", G, 1e-3),
    "energy_mj": ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", C, 1.0),
    "sm_clock_mhz": ("DCGM_FI_DEV_SM_CLOCK", G, 1.0),
    "mem_clock_mhz": ("DCGM_FI_DEV_MEM_CLOCK", G, 1.0),
    "pcie_replay": ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", C, 1.0),
    "pcie_tx_kbps": ("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", G, 1.0),
    "pcie_rx_kbps": ("DCGM_FI_DEV_PCIE_RX_THROUGHPUT", G, 1.0),
    "clocks_event_mask": ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", G, 1.0),
    "ecc_sbe_vol": ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", C, 1.0),
    "ecc_dbe_vol": ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", C, 1.0),
    "ecc_sbe_agg": ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", C, 1.0),
    "ecc_dbe_agg": ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", C, 1.0),
    "retired_sbe": ("DCGM_FI_DEV_RETIRED_SBE", C, 1.0),
    "retired_dbe": ("DCGM_FI_DEV_RETIRED_DBE", C, 1.0),
    "retired_pending": ("DCGM_FI_DEV_RETIRED_PENDING", G, 1.0),
    "remapped_correctable": ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", C, 1.0),
    "remapped_uncorrectable": ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", C, 1.0),
    "remap_pending": ("DCGM_FI_DEV_ROW_REMAP_PENDING", G, 1.0),
    "remap_failure": ("DCGM_FI_DEV_ROW_REMAP_FAILURE", G, 1.0),
    "nvlink_crc_flit_errors": ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", C, 1.0),
    "nvlink_crc_data_errors": ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", C, 1.0),
    "nvlink_replay_errors": ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", C, 1.0),
    "nvlink_recovery_errors": ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", C, 1.0),
    "fan_pct": ("DCGM_FI_DEV_FAN_SPEED", G, 1.0),
    "pstate": ("DCGM_FI_DEV_PSTATE", G, 1.0),
}
# Reads that MIG device handles answer (framebuffer of that GPU instance).
MIG_METRICS = ("fb_total_bytes", "fb_used_bytes", "fb_free_bytes", "fb_reserved_bytes")

INFO_METRIC = "waystation_gpu_info"
LOST_METRIC = "waystation_gpu_lost"
CLOCK_EVENT_METRIC = "waystation_gpu_clocks_event_reason_active"
XID_METRIC = "waystation_gpu_xid_errors_total"
XID_LAST_METRIC = "waystation_gpu_xid_last_timestamp_seconds"


@dataclass(frozen=True)
class GpuIdentity:
    """What names a GPU in every series (dcgm-exporter's labels) plus its info-only fields."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    minor: int | None
    vbios_version: str = ""

    def labels(self) -> Labels:
        device = f"nvidia{self.minor}" if self.minor is not None else ""
        return (
            ("gpu", str(self.index)),
            ("UUID", self.uuid),
            ("pci_bus_id", self.pci_bus_id),
            ("device", device),
            ("modelName", self.name),
        )


@dataclass(frozen=True)
class MigReading:
    """One MIG device (a GPU instance / compute instance pair) as NVML reported it."""

    gpu_instance_id: int
    compute_instance_id: int
    profile: str  # "1g.10gb"; from the MIG device's name
    values: Mapping[str, float]


@dataclass(frozen=True)
class GpuReading:
    """One physical GPU in NVML's units (bytes, mW, mJ, KB/s); absent keys were not readable."""

    identity: GpuIdentity
    lost: bool = False
    values: Mapping[str, float] = field(default_factory=dict)
    mig: tuple[MigReading, ...] = ()
    xid_counts: Mapping[int, int] = field(default_factory=dict)
    xid_last: Mapping[int, float] = field(default_factory=dict)  # code -> wall time of its last event


@dataclass(frozen=True)
class NvmlReading:
    """Everything one collect() read from NVML, before any interpretation."""

    driver_version: str
    cuda_version: str
    gpus: tuple[GpuReading, ...]


def parse(raw: NvmlReading, ts_ms: int) -> list[Sample]:
    """Map one reading to samples, all stamped ts_ms."""
    out: list[Sample] = []

    def add(name: str, labels: Labels, mtype: MetricType, value: float) -> None:
        out.append(Sample(name, labels, mtype, float(value), ts_ms))

    for gpu in raw.gpus:
        labels = gpu.identity.labels()
        info = labels + (
            ("driver_version", raw.driver_version),
            ("vbios_version", gpu.identity.vbios_version),
            ("cuda_version", raw.cuda_version),
        )
        add(INFO_METRIC, info, G, 1)
        add(LOST_METRIC, labels, G, 1 if gpu.lost else 0)
        for key, (name, mtype, factor) in METRICS.items():
            if key in gpu.values:
                value = gpu.values[key] * factor
                # dcgm reports whole MiB, truncated, as nvidia-smi does.
                add(name, labels, mtype, float(int(value)) if factor == 1.0 / MIB else value)
        if "clocks_event_mask" in gpu.values:
            mask = int(gpu.values["clocks_event_mask"])
            for bit, reason in CLOCK_EVENT_REASONS:
                add(CLOCK_EVENT_METRIC, labels + (("reason", reason),), G, 1 if mask & bit else 0)
        for mig in gpu.mig:
            mig_labels = labels + (("GPU_I_ID", str(mig.gpu_instance_id)), ("GPU_I_PROFILE", mig.profile))
            for key in MIG_METRICS:
                if key in mig.values:
                    name, mtype, factor = METRICS[key]
                    add(name, mig_labels, mtype, int(mig.values[key] * factor))
        for xid in sorted(gpu.xid_counts):
            xid_labels = labels + (("xid", str(xid)),)
            add(XID_METRIC, xid_labels, C, gpu.xid_counts[xid])
            if xid in gpu.xid_last:
                add(XID_LAST_METRIC, xid_labels, G, round(gpu.xid_last[xid], 3))
    return out


def _text(value: object) -> str:
    """NVML strings arrive as bytes from older pynvml releases and str from newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _error_code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _field_value(fv: Any) -> float:
    """The number in an nvmlFieldValue_t, per its valueType (NVML_VALUE_TYPE_*)."""
    member = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")[int(fv.valueType)]
    return float(getattr(fv.value, member))


Reader = Callable[[Any, Any], dict[str, float]]


def _memory_v2(nvml: Any, h: Any) -> dict[str, float]:
    m = nvml.nvmlDeviceGetMemoryInfo(h, version=nvml.nvmlMemory_v2)
    return {"fb_total_bytes": m.total, "fb_used_bytes": m.used, "fb_free_bytes": m.free,
            "fb_reserved_bytes": m.reserved}


def _memory_v1(nvml: Any, h: Any) -> dict[str, float]:
    # Drivers before r510 have only v1, whose `used` still includes the reserved part.
    m = nvml.nvmlDeviceGetMemoryInfo(h)
    return {"fb_total_bytes": m.total, "fb_used_bytes": m.used, "fb_free_bytes": m.free}


def _memory(nvml: Any, h: Any) -> dict[str, float]:
    try:
        return _memory_v2(nvml, h)
    except nvml.NVMLError as exc:
        if _error_code(exc) not in PERMANENT_ERRORS:
            raise
    return _memory_v1(nvml, h)


def _remapped_rows(nvml: Any, h: Any) -> dict[str, float]:
    corr, unc, pending, failure = nvml.nvmlDeviceGetRemappedRows(h)
    return {"remapped_correctable": corr, "remapped_uncorrectable": unc,
            "remap_pending": 1 if pending else 0, "remap_failure": 1 if failure else 0}


def _ecc(error_type: str, counter: str) -> Reader:
    def read(nvml: Any, h: Any) -> dict[str, float]:
        key = f"ecc_{'sbe' if error_type == 'CORRECTED' else 'dbe'}_{'vol' if counter == 'VOLATILE' else 'agg'}"
        return {key: nvml.nvmlDeviceGetTotalEccErrors(
            h, getattr(nvml, f"NVML_MEMORY_ERROR_TYPE_{error_type}"), getattr(nvml, f"NVML_{counter}_ECC"))}
    return read


# Call name (the unit of "unsupported, do not ask again") -> reader.
READERS: dict[str, Reader] = {
    "utilization": lambda n, h: (lambda u: {"util_gpu": u.gpu, "util_mem": u.memory})(
        n.nvmlDeviceGetUtilizationRates(h)),
    "encoder": lambda n, h: {"util_enc": n.nvmlDeviceGetEncoderUtilization(h)[0]},
    "decoder": lambda n, h: {"util_dec": n.nvmlDeviceGetDecoderUtilization(h)[0]},
    "memory": _memory_v2,
    "memory_v1": _memory_v1,
    "gpu_temp": lambda n, h: {"gpu_temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)},
    "slowdown_temp": lambda n, h: {"slowdown_temp_c": n.nvmlDeviceGetTemperatureThreshold(
        h, n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)},
    "power": lambda n, h: {"power_mw": n.nvmlDeviceGetPowerUsage(h)},
    "power_limit": lambda n, h: {"power_limit_mw": n.nvmlDeviceGetEnforcedPowerLimit(h)},
    "energy": lambda n, h: {"energy_mj": n.nvmlDeviceGetTotalEnergyConsumption(h)},
    "sm_clock": lambda n, h: {"sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)},
    "mem_clock": lambda n, h: {"mem_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)},
    "pcie_replay": lambda n, h: {"pcie_replay": n.nvmlDeviceGetPcieReplayCounter(h)},
    "pcie_tx": lambda n, h: {"pcie_tx_kbps": n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES)},
    "pcie_rx": lambda n, h: {"pcie_rx_kbps": n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES)},
    "clocks_event": lambda n, h: {"clocks_event_mask": n.nvmlDeviceGetCurrentClocksEventReasons(h)},
    # The pre-r535 name of the same query.
    "clocks_throttle": lambda n, h: {"clocks_event_mask": n.nvmlDeviceGetCurrentClocksThrottleReasons(h)},
    "ecc_sbe_vol": _ecc("CORRECTED", "VOLATILE"),
    "ecc_dbe_vol": _ecc("UNCORRECTED", "VOLATILE"),
    "ecc_sbe_agg": _ecc("CORRECTED", "AGGREGATE"),
    "ecc_dbe_agg": _ecc("UNCORRECTED", "AGGREGATE"),
    "retired_sbe": lambda n, h: {"retired_sbe": len(n.nvmlDeviceGetRetiredPages(
        h, n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS))},
    "retired_dbe": lambda n, h: {"retired_dbe": len(n.nvmlDeviceGetRetiredPages(
        h, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))},
    "retired_pending": lambda n, h: {"retired_pending": 1 if n.nvmlDeviceGetRetiredPagesPendingStatus(
        h) == n.NVML_FEATURE_ENABLED else 0},
    "remapped_rows": _remapped_rows,
    "fan": lambda n, h: {"fan_pct": n.nvmlDeviceGetFanSpeed(h)},
    "pstate": lambda n, h: {"pstate": n.nvmlDeviceGetPerformanceState(h)},
}

# A reader that is asked only once its preferred variant turned out unsupported.
FALLBACKS = {"memory_v1": "memory", "clocks_throttle": "clocks_event"}

# Values only nvmlDeviceGetFieldValues offers: NVML field id constant -> reading key.
FIELD_VALUES: dict[str, str] = {
    "NVML_FI_DEV_MEMORY_TEMP": "memory_temp_c",
    "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": "nvlink_crc_flit_errors",
    "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": "nvlink_crc_data_errors",
    "NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": "nvlink_replay_errors",
    "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": "nvlink_recovery_errors",
}

# READERS whose values include a counter (METRICS type C): a transient failure of one that
# never succeeded on a GPU makes the reading partial (module docstring).
COUNTER_READERS = frozenset({
    "energy", "pcie_replay", "ecc_sbe_vol", "ecc_dbe_vol", "ecc_sbe_agg", "ecc_dbe_agg",
    "retired_sbe", "retired_dbe", "remapped_rows",
})
# FIELD_VALUES keys that are counters.
COUNTER_FIELDS = frozenset(key for key in FIELD_VALUES.values() if METRICS[key][1] == C)


@dataclass
class _GpuState:
    """A GPU found at probe time and what we learnt about it since."""

    handle: Any
    identity: GpuIdentity
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False
    read_once: set[str] = field(default_factory=set)  # counter reads (and "field:" keys) that succeeded


class Gpu:
    """The [sources.gpu] source: every NVIDIA GPU (and MIG device) NVML sees."""

    name = "gpu"

    def __init__(self, config: GpuSourceConfig, env: SourceEnv) -> None:
        self.config = config
        self.env = env
        self._nvml: Any = None
        self._gpus: list[_GpuState] = []
        self._driver_version = ""
        self._cuda_version = ""
        self._xid_lock = threading.Lock()
        self._xid: dict[str, dict[int, int]] = {}  # UUID -> xid -> count
        self._xid_last: dict[str, dict[int, float]] = {}  # UUID -> xid -> wall time of the last event
        self._stop = threading.Event()
        self._event_thread: threading.Thread | None = None
        self._event_set: Any = None
        # The last reading lacks counters that may exist (a first read failed this time only).
        self.partial = False

    # -- lifecycle ---------------------------------------------------------------------

    def probe(self) -> str | None:
        """Initialise NVML and find the GPUs; called once from the runner's thread."""
        nvml: Any = self.env.extra.get("nvml")
        if nvml is None:
            # Most nodes have no GPU: say so without paying for importing pynvml (footprint).
            if not os.path.exists(os.path.join(self.env.proc_root, "driver", "nvidia", "version")):
                return "unavailable: no NVIDIA driver loaded (no /proc/driver/nvidia/version)"
            try:
                import pynvml
            except ImportError:
                return "unavailable: nvidia-ml-py (pynvml) is not installed"
            nvml = pynvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return f"unavailable: no NVIDIA driver ({exc})"
        self._nvml = nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            return f"unavailable: NVML cannot count GPUs ({exc})"
        if count == 0:
            return "unavailable: NVML sees no NVIDIA GPU"
        self._driver_version = self._optional_text(nvml.nvmlSystemGetDriverVersion)
        try:
            cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
            self._cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except nvml.NVMLError:
            pass
        self._gpus = [self._discover(i) for i in range(count)]
        self._start_events()
        return None

    def close(self) -> None:
        """Stop the event thread (within one bounded wait) and release NVML."""
        self._stop.set()
        if self._event_thread is not None:
            self._event_thread.join(EVENT_WAIT_MS / 1000 * 2 + 1)
        if self._nvml is not None:
            try:
                if self._event_set is not None:
                    self._nvml.nvmlEventSetFree(self._event_set)
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvml shutdown: %s", exc)

    def collect(self, now: float) -> list[Sample]:
        """Read every GPU once; called from the source's worker thread every interval."""
        self.partial = False
        return parse(self._read(), round(now * 1000))

    # -- raw NVML reads -----------------------------------------------------------------

    def _optional_text(self, fn: Callable[..., object], *args: object) -> str:
        try:
            return _text(fn(*args))
        except self._nvml.NVMLError:
            return ""

    def _discover(self, index: int) -> _GpuState:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            # Still reported (as lost) so that a dead GPU is a series, not a silence.
            log.warning("gpu %d: no handle: %s", index, exc)
            return _GpuState(None, GpuIdentity(index, "", "", "", None), lost=True)
        try:
            minor: int | None = int(nvml.nvmlDeviceGetMinorNumber(handle))
        except nvml.NVMLError:
            minor = None
        try:
            bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
        except nvml.NVMLError:
            bus_id = ""
        identity = GpuIdentity(
            index=index,
            uuid=self._optional_text(nvml.nvmlDeviceGetUUID, handle),
            name=self._optional_text(nvml.nvmlDeviceGetName, handle),
            pci_bus_id=bus_id,
            minor=minor,
            vbios_version=self._optional_text(nvml.nvmlDeviceGetVbiosVersion, handle),
        )
        return _GpuState(handle, identity)

    def _call(self, gpu: _GpuState, key: str, reader: Reader) -> dict[str, float] | None:
        """One NVML read for one GPU, with the failure bookkeeping described above."""
        if gpu.lost or key in gpu.unsupported:
            return None
        nvml = self._nvml
        try:
            got = reader(nvml, gpu.handle)
        except nvml.NVMLError as exc:
            code = _error_code(exc)
            if code == NVML_ERROR_GPU_IS_LOST:
                gpu.lost = True
                log.error("gpu %s (%s) is lost: %s", gpu.identity.index, gpu.identity.uuid, exc)
            elif code in PERMANENT_ERRORS:
                gpu.unsupported.add(key)
                log.info("gpu %s: %s not available, not asking again: %s", gpu.identity.index, key, exc)
            else:
                log.debug("gpu %s: %s failed this time: %s", gpu.identity.index, key, exc)
                self._failed_once(gpu, key)
            return None
        if key in COUNTER_READERS:
            gpu.read_once.add(key)
        return got

    def _failed_once(self, gpu: _GpuState, key: str) -> None:
        """A read failed for this interval only: partial if it gives counters never read yet."""
        if key == "field_values":
            if any(k in COUNTER_FIELDS and hasattr(self._nvml, const)
                   and f"field:{k}" not in gpu.read_once and f"field:{k}" not in gpu.unsupported
                   for const, k in FIELD_VALUES.items()):
                self.partial = True
        elif key in COUNTER_READERS and key not in gpu.read_once:
            self.partial = True

    def _field_values(self, gpu: _GpuState) -> dict[str, float]:
        nvml = self._nvml
        wanted = [(getattr(nvml, const), key) for const, key in FIELD_VALUES.items()
                  if hasattr(nvml, const) and f"field:{key}" not in gpu.unsupported]
        if not wanted:
            return {}
        ids = [fid for fid, _ in wanted]
        got = self._call(gpu, "field_values",
                         lambda n, h: self._decode_fields(n.nvmlDeviceGetFieldValues(h, ids), wanted, gpu))
        return got or {}

    def _decode_fields(self, values: Any, wanted: list[tuple[int, str]], gpu: _GpuState) -> dict[str, float]:
        out: dict[str, float] = {}
        for fv, (_fid, key) in zip(values, wanted, strict=True):
            ret = int(fv.nvmlReturn)
            if ret == NVML_SUCCESS:
                out[key] = _field_value(fv)
                if key in COUNTER_FIELDS:
                    gpu.read_once.add(f"field:{key}")
            elif ret in PERMANENT_ERRORS:
                gpu.unsupported.add(f"field:{key}")
            elif key in COUNTER_FIELDS and f"field:{key}" not in gpu.read_once:
                self.partial = True
        return out

    def _mig_devices(self, gpu: _GpuState) -> tuple[MigReading, ...]:
        nvml = self._nvml
        mode = self._call(gpu, "mig_mode", lambda n, h: {"mig": n.nvmlDeviceGetMigMode(h)[0]})
        if not mode or mode["mig"] != nvml.NVML_DEVICE_MIG_ENABLE:
            return ()
        most = self._call(gpu, "mig_count", lambda n, h: {"n": n.nvmlDeviceGetMaxMigDeviceCount(h)})
        out: dict[int, MigReading] = {}
        for i in range(int(most["n"]) if most else 0):
            try:
                mh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, i)
                gi = int(nvml.nvmlDeviceGetGpuInstanceId(mh))
                ci = int(nvml.nvmlDeviceGetComputeInstanceId(mh))
                name = self._optional_text(nvml.nvmlDeviceGetName, mh)
                values = _memory(nvml, mh)
            except nvml.NVMLError as exc:
                code = _error_code(exc)
                if code == NVML_ERROR_GPU_IS_LOST:
                    gpu.lost = True
                    return ()
                if code != NVML_ERROR_NOT_FOUND:  # NotFound: an empty slot
                    log.debug("gpu %s: MIG device %d: %s", gpu.identity.index, i, exc)
                continue
            # Compute instances of one GPU instance share its memory: one series per GI.
            if gi not in out:
                profile = name.rsplit(" MIG ", 1)[1] if " MIG " in name else ""
                out[gi] = MigReading(gi, ci, profile, values)
        return tuple(out[gi] for gi in sorted(out))

    def _read(self) -> NvmlReading:
        with self._xid_lock:
            xid = {uuid: dict(counts) for uuid, counts in self._xid.items()}
            xid_last = {uuid: dict(times) for uuid, times in self._xid_last.items()}
        gpus: list[GpuReading] = []
        for gpu in self._gpus:
            values: dict[str, float] = {}
            mig: tuple[MigReading, ...] = ()
            for key, reader in READERS.items():
                if key in FALLBACKS and FALLBACKS[key] not in gpu.unsupported:
                    continue
                got = self._call(gpu, key, reader)
                if got:
                    values.update(got)
            if not gpu.lost:
                values.update(self._field_values(gpu))
            if not gpu.lost:
                mig = self._mig_devices(gpu)
            uuid = gpu.identity.uuid
            gpus.append(GpuReading(gpu.identity, gpu.lost, values, mig, xid.get(uuid, {}),
                                   xid_last.get(uuid, {})))
        return NvmlReading(self._driver_version, self._cuda_version, tuple(gpus))

    # -- XID events ---------------------------------------------------------------------

    def _start_events(self) -> None:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.info("XID events unavailable: %s", exc)
            return
        registered = 0
        for gpu in self._gpus:
            if gpu.lost:
                continue
            try:
                # On a MIG-enabled GPU this is the parent: its events cover every instance.
                nvml.nvmlDeviceRegisterEvents(gpu.handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                registered += 1
            except nvml.NVMLError as exc:
                log.info("gpu %s: XID events unavailable: %s", gpu.identity.index, exc)
        self._event_set = event_set
        if registered:
            self._event_thread = threading.Thread(target=self._watch_events, name="gpu-xid-events", daemon=True)
            self._event_thread.start()

    def _watch_events(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(self._event_set, EVENT_WAIT_MS)
            except nvml.NVMLError as exc:
                if _error_code(exc) != NVML_ERROR_TIMEOUT:
                    log.debug("XID event wait: %s", exc)
                    self._stop.wait(EVENT_WAIT_MS / 1000)
                continue
            if int(data.eventType) & int(nvml.nvmlEventTypeXidCriticalError):
                self._record_xid(self._optional_text(nvml.nvmlDeviceGetUUID, data.device), int(data.eventData))

    def _record_xid(self, uuid: str, xid: int) -> None:
        log.warning("gpu %s: XID %d", uuid, xid)
        with self._xid_lock:
            counts = self._xid.setdefault(uuid, {})
            counts[xid] = counts.get(xid, 0) + 1
            self._xid_last.setdefault(uuid, {})[xid] = self.env.wall_clock()
