"""The gpu source against real NVML, compared with `nvidia-smi -q -x` taken in the same run.

Runs wherever an NVIDIA GPU is present (nvidia-smi exists and answers); elsewhere it
skips, saying why. nvidia-smi is read just before and just after the source's collect,
and a fast-moving value passes when it lies within what the two snapshots saw, widened
by that metric's tolerance. Slow values (identity, totals, limits, error counters) must
be equal. Run with -s to see the comparison table.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from agent.config import GpuSourceConfig
from agent.sources.base import SourceEnv
from agent.sources.gpu import Gpu
from tests.unit.test_gpu_source import SeriesKey, by_series, expected_from_xml

# Metric -> (absolute tolerance, relative tolerance) beyond the before/after range.
# None means "any value in range": these move faster than two nvidia-smi runs can pin down.
TOLERANCE: dict[str, tuple[float, float] | None] = {
    "DCGM_FI_DEV_GPU_UTIL": None,
    "DCGM_FI_DEV_MEM_COPY_UTIL": None,
    "DCGM_FI_DEV_ENC_UTIL": None,
    "DCGM_FI_DEV_DEC_UTIL": None,
    "DCGM_FI_DEV_PCIE_TX_THROUGHPUT": None,
    "DCGM_FI_DEV_PCIE_RX_THROUGHPUT": None,
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": None,
    "waystation_gpu_clocks_event_reason_active": None,
    "DCGM_FI_DEV_FB_USED": (64.0, 0.0),
    "DCGM_FI_DEV_FB_FREE": (64.0, 0.0),
    "DCGM_FI_DEV_GPU_TEMP": (3.0, 0.0),
    "DCGM_FI_DEV_MEMORY_TEMP": (3.0, 0.0),
    "DCGM_FI_DEV_POWER_USAGE": (20.0, 0.25),
    "DCGM_FI_DEV_SM_CLOCK": (0.0, 0.5),
    "DCGM_FI_DEV_MEM_CLOCK": (0.0, 0.5),
    "DCGM_FI_DEV_FAN_SPEED": (10.0, 0.0),
    "DCGM_FI_DEV_PSTATE": (8.0, 0.0),
}
RANGES = {
    "DCGM_FI_DEV_GPU_UTIL": (0, 100), "DCGM_FI_DEV_MEM_COPY_UTIL": (0, 100), "DCGM_FI_DEV_ENC_UTIL": (0, 100),
    "DCGM_FI_DEV_DEC_UTIL": (0, 100), "waystation_gpu_clocks_event_reason_active": (0, 1),
}
# Series NVML gives that nvidia-smi's XML has no element for.
ONLY_FROM_NVML = {
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
    "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
    "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "waystation_gpu_xid_errors_total",
}


def nvidia_smi_xml() -> ET.Element:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("no NVIDIA GPU here: nvidia-smi is not installed")
    try:
        out = subprocess.run([smi, "-q", "-x"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no working NVIDIA GPU here: nvidia-smi -q -x failed: {exc}")
    if out.returncode != 0:
        pytest.skip(f"no working NVIDIA GPU here: nvidia-smi -q -x exited {out.returncode}: "
                    f"{out.stdout.decode(errors='replace').strip()[:200]}")
    return ET.fromstring(out.stdout)


def without_mig(series: dict[SeriesKey, float]) -> dict[SeriesKey, float]:
    return {k: v for k, v in series.items() if not any(name == "GPU_I_ID" for name, _ in k[1])}


def mig_instances(series: dict[SeriesKey, float]) -> set[tuple[str, str]]:
    return {(dict(k[1])["UUID"], dict(k[1])["GPU_I_ID"]) for k in series
            if k[0] == "DCGM_FI_DEV_FB_USED" and "GPU_I_ID" in dict(k[1])}


def test_source_agrees_with_nvidia_smi() -> None:
    before_doc = nvidia_smi_xml()
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    source = Gpu(GpuSourceConfig(enabled=True), SourceEnv())
    reason = source.probe()
    assert reason is None, f"nvidia-smi works but the source says: {reason}"
    try:
        got = by_series(source.collect(time.time()))
    finally:
        source.close()
    after_doc = nvidia_smi_xml()
    before, after = expected_from_xml(before_doc), expected_from_xml(after_doc)

    assert mig_instances(got) == mig_instances(before)
    got, before, after = without_mig(got), without_mig(before), without_mig(after)
    rows: list[str] = []
    problems: list[str] = []
    for key in sorted(before):
        name = key[0]
        want = [before[key], after.get(key, before[key])]
        lo, hi = min(want), max(want)
        value = got.get(key)
        if value is None:
            problems.append(f"missing: {key}")
            continue
        tol = TOLERANCE.get(name, (0.0, 0.0))
        if tol is None:
            rng = RANGES.get(name)
            ok = rng is None or rng[0] <= value <= rng[1]
        else:
            slack = tol[0] + tol[1] * max(abs(lo), abs(hi))
            ok = lo - slack <= value <= hi + slack
        labels = dict(key[1])
        rows.append(f"{'ok ' if ok else 'BAD'} gpu{labels['gpu']} {name}"
                    f"{'{' + labels['reason'] + '}' if 'reason' in labels else ''}: nvml={value:g} "
                    f"nvidia-smi={lo:g}..{hi:g}")
        if not ok:
            problems.append(rows[-1])
    extra = sorted(k for k in got if k not in before and k[0] not in ONLY_FROM_NVML)
    print("\n".join(rows))
    print(f"compared {len(rows)} series; NVML-only series: "
          f"{sorted({k[0] for k in got if k[0] in ONLY_FROM_NVML})}")
    assert not problems, "\n".join(problems)
    # A field nvidia-smi shows as N/A should not appear from NVML either (or the test lacks it).
    assert not extra, extra
