"""A stand-in for pynvml built from recorded `nvidia-smi -q -x` output (no GPU on these machines).

It answers with pynvml's own names, constants, structures and exceptions, with what the XML
says; "N/A" or a missing element is NVMLError_NotSupported, as NVML answers. Used by the GPU
tests, the catalog test and bench/agent_fixture_run.py.
"""

from __future__ import annotations

import math
import os
import queue
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

REPO = Path(__file__).resolve().parents[2]
NVSMI = Path(os.environ.get("WAYSTATION_SHARED", REPO.parent / "shared")) / "fixtures" / "nvidia-smi"
XMLS = ("a100-sxm4-v12.xml", "tesla-t4.xml", "a10g.xml")
MIB = 1024 * 1024


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml turns the code into its NVMLError_* subclass


def text(elem: ET.Element, path: str) -> str:
    """An element's text, or NotSupported where nvidia-smi printed N/A or nothing."""
    node = elem.find(path)
    value = (node.text or "").strip() if node is not None else ""
    if not value or value == "N/A" or value == "None":
        raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    return value


def number(value: str) -> float:
    """'27 C', '67.03 W', '4000 KB/s', '0 %', '81920 MiB' -> the number."""
    return float(value.split()[0])


class FakeHandle:
    def __init__(self, index: int, elem: ET.Element, parent: FakeHandle | None = None) -> None:
        self.index, self.elem, self.parent = index, elem, parent
        self.lost = False


class FakeNvml:
    """The subset of pynvml the source uses, answering from nvidia-smi XML documents."""

    NVMLError = pynvml.NVMLError

    def __init__(self, *docs: ET.Element) -> None:
        self.docs = docs
        self.handles = [FakeHandle(i, gpu) for i, gpu in enumerate(g for d in docs for g in d.findall("gpu"))]
        self.calls: Counter[tuple[str, int]] = Counter()
        self.events: queue.Queue[Any] = queue.Queue()
        self.registered: list[int] = []
        self.init_error: int | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "nvmlMemory", "nvmlEventType", "nvmlClocks")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _enter(self, fn: str, h: FakeHandle) -> ET.Element:
        self.calls[(fn, h.index if h.parent is None else h.parent.index)] += 1
        if h.lost or (h.parent is not None and h.parent.lost):
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return h.elem

    # -- system
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return text(self.docs[0], "driver_version")

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        major, minor = text(self.docs[0], "cuda_version").split(".")
        return int(major) * 1000 + int(minor) * 10

    def nvmlDeviceGetCount(self) -> int:
        return len(self.handles)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        return self.handles[index]

    # -- identity
    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        return text(self._enter("nvmlDeviceGetUUID", h), "uuid")

    def nvmlDeviceGetName(self, h: FakeHandle) -> str:
        e = self._enter("nvmlDeviceGetName", h)
        if h.parent is None:
            return text(e, "product_name")
        # nvidia-smi's XML does not name the MIG profile; an A100 slice is 14 SMs.
        sms = int(text(e, "device_attributes/shared/multiprocessor_count"))
        gb = math.ceil(number(text(e, "fb_memory_usage/total")) / 1024)
        return f"{text(h.parent.elem, 'product_name')} MIG {sms // 14}g.{gb}gb"

    def nvmlDeviceGetMinorNumber(self, h: FakeHandle) -> int:
        return int(text(self._enter("nvmlDeviceGetMinorNumber", h), "minor_number"))

    def nvmlDeviceGetPciInfo(self, h: FakeHandle) -> Any:
        info = pynvml.nvmlPciInfo_t()
        info.busId = text(self._enter("nvmlDeviceGetPciInfo", h), "pci/pci_bus_id").encode()
        return info

    def nvmlDeviceGetVbiosVersion(self, h: FakeHandle) -> str:
        return text(self._enter("nvmlDeviceGetVbiosVersion", h), "vbios_version")

    # -- readings
    def nvmlDeviceGetUtilizationRates(self, h: FakeHandle) -> Any:
        e = self._enter("nvmlDeviceGetUtilizationRates", h)
        return pynvml.c_nvmlUtilization_t(gpu=int(number(text(e, "utilization/gpu_util"))),
                                          memory=int(number(text(e, "utilization/memory_util"))))

    def nvmlDeviceGetEncoderUtilization(self, h: FakeHandle) -> list[int]:
        return [int(number(text(self._enter("nvmlDeviceGetEncoderUtilization", h), "utilization/encoder_util"))),
                1_000_000]

    def nvmlDeviceGetDecoderUtilization(self, h: FakeHandle) -> list[int]:
        return [int(number(text(self._enter("nvmlDeviceGetDecoderUtilization", h), "utilization/decoder_util"))),
                1_000_000]

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle, version: int | None = None) -> Any:
        e = self._enter("nvmlDeviceGetMemoryInfo", h)

        def mib(field: str) -> int:
            return int(number(text(e, f"fb_memory_usage/{field}"))) * MIB

        if version:
            return pynvml.c_nvmlMemory_v2_t(version=version, total=mib("total"), reserved=mib("reserved"),
                                            free=mib("free"), used=mib("used"))
        return pynvml.c_nvmlMemory_t(total=mib("total"), free=mib("free"), used=mib("total") - mib("free"))

    def nvmlDeviceGetTemperature(self, h: FakeHandle, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return int(number(text(self._enter("nvmlDeviceGetTemperature", h), "temperature/gpu_temp")))

    def nvmlDeviceGetTemperatureThreshold(self, h: FakeHandle, kind: int) -> int:
        assert kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        e = self._enter("nvmlDeviceGetTemperatureThreshold", h)
        return int(number(text(e, "temperature/gpu_temp_slow_threshold")))

    def _power(self, e: ET.Element, field: str) -> str:
        node = e.find("gpu_power_readings") or e.find("power_readings")
        assert node is not None
        return text(node, field)

    def nvmlDeviceGetPowerUsage(self, h: FakeHandle) -> int:
        return round(number(self._power(self._enter("nvmlDeviceGetPowerUsage", h), "power_draw")) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeHandle) -> int:
        e = self._enter("nvmlDeviceGetEnforcedPowerLimit", h)
        try:
            return round(number(self._power(e, "enforced_power_limit")) * 1000)
        except pynvml.NVMLError_NotSupported:
            return round(number(self._power(e, "current_power_limit")) * 1000)  # DTD v12's name

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeHandle) -> int:
        return int(text(self._enter("nvmlDeviceGetTotalEnergyConsumption", h), "total_energy_consumption"))

    def nvmlDeviceGetClockInfo(self, h: FakeHandle, kind: int) -> int:
        field = {pynvml.NVML_CLOCK_SM: "sm_clock", pynvml.NVML_CLOCK_MEM: "mem_clock"}[kind]
        return int(number(text(self._enter("nvmlDeviceGetClockInfo", h), f"clocks/{field}")))

    def nvmlDeviceGetPcieReplayCounter(self, h: FakeHandle) -> int:
        return int(text(self._enter("nvmlDeviceGetPcieReplayCounter", h), "pci/replay_counter"))

    def nvmlDeviceGetPcieThroughput(self, h: FakeHandle, counter: int) -> int:
        field = {pynvml.NVML_PCIE_UTIL_TX_BYTES: "tx_util", pynvml.NVML_PCIE_UTIL_RX_BYTES: "rx_util"}[counter]
        return int(number(text(self._enter("nvmlDeviceGetPcieThroughput", h), f"pci/{field}")))

    def _reason_mask(self, e: ET.Element) -> int:
        node = e.find("clocks_event_reasons")
        node = node if node is not None else e.find("clocks_throttle_reasons")
        assert node is not None
        mask = 0
        for child in node:
            if (child.text or "").strip() == "Active":
                mask |= XML_REASON_BITS[child.tag.split("_reason_", 1)[1]]
        return mask

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeHandle) -> int:
        e = self._enter("nvmlDeviceGetCurrentClocksEventReasons", h)
        if e.find("clocks_event_reasons") is None:  # drivers before r535 lack the entry point
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._reason_mask(e)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: FakeHandle) -> int:
        return self._reason_mask(self._enter("nvmlDeviceGetCurrentClocksThrottleReasons", h))

    def nvmlDeviceGetTotalEccErrors(self, h: FakeHandle, error_type: int, counter: int) -> int:
        e = self._enter("nvmlDeviceGetTotalEccErrors", h)
        if text(e, "ecc_mode/current_ecc") != "Enabled":
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        scope = "volatile" if counter == pynvml.NVML_VOLATILE_ECC else "aggregate"
        corrected = error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
        node = e.find(f"ecc_errors/{scope}")
        assert node is not None
        return sum(int(text(node, c.tag)) for c in node if ecc_kind(c.tag) == ("sbe" if corrected else "dbe"))

    def nvmlDeviceGetRetiredPages(self, h: FakeHandle, cause: int) -> list[int]:
        e = self._enter("nvmlDeviceGetRetiredPages", h)
        group = {pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: "multiple_single_bit_retirement",
                 pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: "double_bit_retirement"}[cause]
        return [0x1000 * i for i in range(int(text(e, f"retired_pages/{group}/retired_count")))]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: FakeHandle) -> int:
        e = self._enter("nvmlDeviceGetRetiredPagesPendingStatus", h)
        yes = text(e, "retired_pages/pending_retirement") == "Yes"
        return pynvml.NVML_FEATURE_ENABLED if yes else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetRemappedRows(self, h: FakeHandle) -> tuple[int, int, int, int]:
        e = self._enter("nvmlDeviceGetRemappedRows", h)
        return (int(text(e, "remapped_rows/remapped_row_corr")), int(text(e, "remapped_rows/remapped_row_unc")),
                int(text(e, "remapped_rows/remapped_row_pending") == "Yes"),
                int(text(e, "remapped_rows/remapped_row_failure") == "Yes"))

    def nvmlDeviceGetFanSpeed(self, h: FakeHandle) -> int:
        return int(number(text(self._enter("nvmlDeviceGetFanSpeed", h), "fan_speed")))

    def nvmlDeviceGetPerformanceState(self, h: FakeHandle) -> int:
        return int(text(self._enter("nvmlDeviceGetPerformanceState", h), "performance_state").lstrip("P"))

    def nvmlDeviceGetFieldValues(self, h: FakeHandle, field_ids: list[int]) -> Any:
        e = self._enter("nvmlDeviceGetFieldValues", h)
        out = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for fv, fid in zip(out, field_ids, strict=True):
            fv.fieldId = fid
            fv.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED  # no NVLink counters in these XMLs
            if fid == pynvml.NVML_FI_DEV_MEMORY_TEMP:
                try:
                    fv.value.uiVal = int(number(text(e, "temperature/memory_temp")))
                    fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                    fv.nvmlReturn = pynvml.NVML_SUCCESS
                except pynvml.NVMLError_NotSupported:
                    pass
        return out

    # -- MIG
    def nvmlDeviceGetMigMode(self, h: FakeHandle) -> list[int]:
        e = self._enter("nvmlDeviceGetMigMode", h)
        modes = (text(e, "mig_mode/current_mig"), text(e, "mig_mode/pending_mig"))
        return [pynvml.NVML_DEVICE_MIG_ENABLE if m == "Enabled" else pynvml.NVML_DEVICE_MIG_DISABLE for m in modes]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeHandle) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount", h)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeHandle, index: int) -> FakeHandle:
        e = self._enter("nvmlDeviceGetMigDeviceHandleByIndex", h)
        for mig in e.findall("mig_devices/mig_device"):
            if int(text(mig, "index")) == index:
                return FakeHandle(index, mig, parent=h)
        raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetGpuInstanceId(self, h: FakeHandle) -> int:
        return int(text(self._enter("nvmlDeviceGetGpuInstanceId", h), "gpu_instance_id"))

    def nvmlDeviceGetComputeInstanceId(self, h: FakeHandle) -> int:
        return int(text(self._enter("nvmlDeviceGetComputeInstanceId", h), "compute_instance_id"))

    # -- events
    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h: FakeHandle, types: int, event_set: str) -> None:
        self._enter("nvmlDeviceRegisterEvents", h)
        assert types & pynvml.nvmlEventTypeXidCriticalError
        self.registered.append(h.index)

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> Any:
        try:
            return self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise nvml_error(pynvml.NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetFree(self, event_set: str) -> None:
        pass

    # -- test controls
    def inject_xid(self, index: int, xid: int) -> None:
        self.events.put(SimpleNamespace(device=self.handles[index], eventType=pynvml.nvmlEventTypeXidCriticalError,
                                        eventData=xid, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF))


# nvidia-smi's reason element suffix -> pynvml's bit (the test's own table, from pynvml's constants).
XML_REASON_BITS = {
    "gpu_idle": pynvml.nvmlClocksThrottleReasonGpuIdle,
    "applications_clocks_setting": pynvml.nvmlClocksThrottleReasonApplicationsClocksSetting,
    "sw_power_cap": pynvml.nvmlClocksThrottleReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksThrottleReasonHwSlowdown,
    "hw_thermal_slowdown": pynvml.nvmlClocksThrottleReasonHwThermalSlowdown,
    "hw_power_brake_slowdown": pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown,
    "sync_boost": pynvml.nvmlClocksThrottleReasonSyncBoost,
    "sw_thermal_slowdown": pynvml.nvmlClocksThrottleReasonSwThermalSlowdown,
    "display_clocks_setting": pynvml.nvmlClocksThrottleReasonDisplayClockSetting,
}

def ecc_kind(tag: str) -> str | None:
    """sram_correctable/dram_correctable -> sbe; *_uncorrectable(_parity|_secded) -> dbe."""
    if "_uncorrectable" in tag:
        return "dbe"
    return "sbe" if tag.endswith("_correctable") else None


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def load(*names: str) -> list[ET.Element]:
    return [ET.parse(NVSMI / n).getroot() for n in names]
