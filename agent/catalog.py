"""The catalog: every metric the agent can emit, with its type, unit, help, labels and source.

Sources, exposition, dashboards and rules are tested against this one list
(tests/unit/test_catalog.py runs every source over its recorded data and checks both
directions). Conventions:

- `labels` are the label names the agent itself puts on the series; `site` and `node` are
  added to every fleet series by the collector from the signed batch header.
- Scraped model-server metrics keep the server's own names and labels; the catalog lists
  the families our presets allow (agent/sources/scrape_presets.py), with source
  "scrape:<preset>", the server's HELP text, labels ("job",) for the one label we add,
  and `server_labels=True`. A histogram family stands for its `_bucket`/`_sum`/`_count`
  samples, a summary for its quantiles and `_sum`/`_count`. Pages scraped without a
  preset (or with an own `allow`) emit whatever the server has and are not catalogued.
- Derived series: for every gauge (and untyped) series the summarizer adds
  `<name>:window_min`, `<name>:window_max` and `<name>:window_mean` (gauges, same labels)
  when a window holds more than one sample; `lookup()` resolves those to the base entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.summarize import WINDOW_SUFFIXES


@dataclass(frozen=True)
class Metric:
    """One catalogued metric family."""

    name: str
    type: str  # counter | gauge | histogram | summary
    unit: str  # base unit as the name says it ("bytes", "seconds", "ratio", "MiB", ""...)
    help: str
    labels: tuple[str, ...]
    source: str  # system | network | gpu | smart | scrape | agent | scrape:<preset>
    server_labels: bool = False  # scraped: the server's own labels come along too


def _m(source: str, labels: tuple[str, ...], *rows: tuple[str, str, str, str]) -> list[Metric]:
    return [Metric(name, kind, unit, help_, labels, source) for name, kind, unit, help_ in rows]


C, G = "counter", "gauge"
DEV = ("device",)
FS = ("device", "fstype", "mountpoint")
PROBE = ("protocol", "target")
GPU = ("gpu", "UUID", "pci_bus_id", "device", "modelName")

SYSTEM = (
    _m("system", ("cpu", "mode"),
       ("node_cpu_seconds_total", C, "seconds", "Seconds the CPUs spent in each mode."))
    + _m("system", (),
         ("node_load1", G, "", "1m load average."),
         ("node_load5", G, "", "5m load average."),
         ("node_load15", G, "", "15m load average."),
         ("node_memory_MemTotal_bytes", G, "bytes", "Memory information field MemTotal_bytes."),
         ("node_memory_MemAvailable_bytes", G, "bytes", "Memory information field MemAvailable_bytes."),
         ("node_memory_MemFree_bytes", G, "bytes", "Memory information field MemFree_bytes."),
         ("node_memory_Buffers_bytes", G, "bytes", "Memory information field Buffers_bytes."),
         ("node_memory_Cached_bytes", G, "bytes", "Memory information field Cached_bytes."),
         ("node_memory_SwapTotal_bytes", G, "bytes", "Memory information field SwapTotal_bytes."),
         ("node_memory_SwapFree_bytes", G, "bytes", "Memory information field SwapFree_bytes."),
         ("node_boot_time_seconds", G, "seconds", "Node boot time, in unixtime."))
    + _m("system", FS,
         ("node_filesystem_size_bytes", G, "bytes", "Filesystem size in bytes."),
         ("node_filesystem_free_bytes", G, "bytes", "Filesystem free space in bytes."),
         ("node_filesystem_avail_bytes", G, "bytes", "Filesystem space available to non-root users in bytes."),
         ("node_filesystem_files", G, "", "Filesystem total file nodes."),
         ("node_filesystem_files_free", G, "", "Filesystem total free file nodes."),
         ("node_filesystem_readonly", G, "", "Filesystem read-only status (1 = read-only)."))
    + _m("system", DEV,
         ("node_disk_reads_completed_total", C, "", "The total number of reads completed successfully."),
         ("node_disk_writes_completed_total", C, "", "The total number of writes completed successfully."),
         ("node_disk_read_bytes_total", C, "bytes", "The total number of bytes read successfully."),
         ("node_disk_written_bytes_total", C, "bytes", "The total number of bytes written successfully."),
         ("node_disk_read_time_seconds_total", C, "seconds", "The total number of seconds spent by all reads."),
         ("node_disk_write_time_seconds_total", C, "seconds", "The total number of seconds spent by all writes."),
         ("node_disk_io_time_seconds_total", C, "seconds", "Total seconds spent doing I/Os."))
)

NETWORK = (
    _m("network", DEV,
       ("node_network_receive_bytes_total", C, "bytes", "Network device statistic receive_bytes."),
       ("node_network_transmit_bytes_total", C, "bytes", "Network device statistic transmit_bytes."),
       ("node_network_receive_packets_total", C, "", "Network device statistic receive_packets."),
       ("node_network_transmit_packets_total", C, "", "Network device statistic transmit_packets."),
       ("node_network_receive_errs_total", C, "", "Network device statistic receive_errs."),
       ("node_network_transmit_errs_total", C, "", "Network device statistic transmit_errs."),
       ("node_network_receive_drop_total", C, "", "Network device statistic receive_drop."),
       ("node_network_transmit_drop_total", C, "", "Network device statistic transmit_drop."),
       ("node_network_up", G, "", "Value is 1 if operstate is 'up', 0 otherwise."),
       ("node_network_speed_bytes", G, "bytes", "Link speed in bytes per second (absent when unknown)."),
       ("node_network_mtu_bytes", G, "bytes", "Network device property: mtu_bytes."))
    + _m("network", PROBE,
         ("probe_success", G, "", "1 if any probe attempt to the target answered in the interval, else 0."),
         ("waystation_probe_loss_ratio", G, "ratio", "Share of the interval's probe attempts that got no answer."),
         ("waystation_probe_jitter_seconds", G, "seconds",
          "Mean absolute difference of consecutive answered RTTs in the interval."))
    + _m("network", ("protocol", "stat", "target"),
         ("waystation_probe_rtt_seconds", G, "seconds",
          "Round-trip time of the interval's answered attempts; stat = min, mean or max."))
)

GPU_METRICS = (
    _m("gpu", GPU,
       ("DCGM_FI_DEV_GPU_UTIL", G, "percent", "GPU utilization (in %)."),
       ("DCGM_FI_DEV_MEM_COPY_UTIL", G, "percent", "Memory utilization (in %)."),
       ("DCGM_FI_DEV_ENC_UTIL", G, "percent", "Encoder utilization (in %)."),
       ("DCGM_FI_DEV_DEC_UTIL", G, "percent", "Decoder utilization (in %)."),
       ("DCGM_FI_DEV_GPU_TEMP", G, "celsius", "GPU temperature (in C)."),
       ("DCGM_FI_DEV_SLOWDOWN_TEMP", G, "celsius", "Temperature at which the GPU slows down (in C)."),
       ("DCGM_FI_DEV_MEMORY_TEMP", G, "celsius", "Memory temperature (in C)."),
       ("DCGM_FI_DEV_POWER_USAGE", G, "watts", "Power draw (in W)."),
       ("DCGM_FI_DEV_POWER_MGMT_LIMIT", G, "watts", "Power management limit (in W)."),
       ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", C, "millijoules", "Total energy consumption since boot (in mJ)."),
       ("DCGM_FI_DEV_SM_CLOCK", G, "MHz", "SM clock frequency (in MHz)."),
       ("DCGM_FI_DEV_MEM_CLOCK", G, "MHz", "Memory clock frequency (in MHz)."),
       ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", C, "", "Total number of PCIe retries."),
       ("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", G, "KB/s", "PCIe transmit throughput (in KB/s)."),
       ("DCGM_FI_DEV_PCIE_RX_THROUGHPUT", G, "KB/s", "PCIe receive throughput (in KB/s)."),
       ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", G, "", "Bit mask of active clock-event (throttle) reasons."),
       ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", C, "", "Single-bit volatile ECC errors."),
       ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", C, "", "Double-bit volatile ECC errors."),
       ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", C, "", "Single-bit persistent (aggregate) ECC errors."),
       ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", C, "", "Double-bit persistent (aggregate) ECC errors."),
       ("DCGM_FI_DEV_RETIRED_SBE", C, "", "Pages retired for single-bit errors."),
       ("DCGM_FI_DEV_RETIRED_DBE", C, "", "Pages retired for double-bit errors."),
       ("DCGM_FI_DEV_RETIRED_PENDING", G, "", "1 if a page retirement is pending (needs a reset)."),
       ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", C, "", "Rows remapped for correctable errors."),
       ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", C, "", "Rows remapped for uncorrectable errors."),
       ("DCGM_FI_DEV_ROW_REMAP_PENDING", G, "", "1 if a row remapping is pending (needs a reset)."),
       ("DCGM_FI_DEV_ROW_REMAP_FAILURE", G, "", "1 if a row remapping failed."),
       ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", C, "", "NVLink flow-control CRC errors, all links."),
       ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", C, "", "NVLink data CRC errors, all links."),
       ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", C, "", "NVLink replay errors, all links."),
       ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", C, "", "NVLink recovery errors, all links."),
       ("DCGM_FI_DEV_FAN_SPEED", G, "percent", "Fan speed (in % of maximum)."),
       ("DCGM_FI_DEV_PSTATE", G, "", "Performance state (0 = P0, fastest)."),
       ("waystation_gpu_lost", G, "", "1 once NVML reported the GPU lost (GpuIsLost); its reads stop."))
    # Framebuffer series carry GPU_I_ID and GPU_I_PROFILE too on MIG devices.
    + _m("gpu", GPU + ("GPU_I_ID", "GPU_I_PROFILE"),
         ("DCGM_FI_DEV_FB_TOTAL", G, "MiB", "Framebuffer memory total (in MiB)."),
         ("DCGM_FI_DEV_FB_USED", G, "MiB", "Framebuffer memory used (in MiB)."),
         ("DCGM_FI_DEV_FB_FREE", G, "MiB", "Framebuffer memory free (in MiB)."),
         ("DCGM_FI_DEV_FB_RESERVED", G, "MiB", "Framebuffer memory reserved (in MiB)."))
    + _m("gpu", GPU + ("driver_version", "vbios_version", "cuda_version"),
         ("waystation_gpu_info", G, "", "Always 1; driver, VBIOS and CUDA versions as labels."))
    + _m("gpu", GPU + ("reason",),
         ("waystation_gpu_clocks_event_reason_active", G, "", "1 while the clock-event (throttle) reason is active."))
    + _m("gpu", GPU + ("xid",),
         ("waystation_gpu_xid_errors_total", C, "", "XID errors seen through NVML events since the agent started."),
         ("waystation_gpu_xid_last_timestamp_seconds", G, "seconds",
          "Wall time of the last XID event of this code on this GPU (since the agent started)."))
)
# Labels a metric may carry only on some series (MIG framebuffer series).
OPTIONAL_LABELS = {name: ("GPU_I_ID", "GPU_I_PROFILE") for name in (
    "DCGM_FI_DEV_FB_TOTAL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_RESERVED")}

# ---- SMART (agent/sources/smart.py): smartctl_exporter's names and labels. ----
SMART_INFO = ("device", "interface", "protocol", "model_family", "model_name", "serial_number", "firmware_version")
SMART_IDENT = ("device", "model_family", "model_name", "serial_number")
# smartctl_exporter exposes every SMART value as a gauge (counts included); kept so for its dashboards.
SMART: list[Metric] = (
    _m("smart", SMART_INFO, ("smartctl_device", G, "", "Device info."))
    + _m("smart", DEV,
         ("smartctl_device_smart_status", G, "", "General SMART status: 1 passed, 0 failed."),
         ("smartctl_device_smartctl_exit_status", G, "", "Exit status of smartctl on the device."),
         ("smartctl_device_capacity_bytes", G, "bytes", "Device capacity in bytes."),
         ("smartctl_device_rotation_rate", G, "rpm", "Device rotation rate (0 for solid state)."),
         ("smartctl_device_power_on_seconds", G, "seconds", "Device power on seconds."),
         ("smartctl_device_power_cycle_count", G, "", "Device power cycle count (start-stop cycles for SCSI)."),
         ("smartctl_device_percentage_used", G, "percent", "NVMe: device write percentage used."),
         ("smartctl_device_available_spare", G, "percent", "NVMe: remaining spare capacity, normalized percentage."),
         ("smartctl_device_available_spare_threshold", G, "percent", "NVMe: available spare threshold."),
         ("smartctl_device_critical_warning", G, "", "NVMe: critical warning bits of the controller."),
         ("smartctl_device_media_errors", G, "", "NVMe: unrecovered data integrity errors."),
         ("smartctl_device_num_err_log_entries", G, "", "NVMe: error information log entries over the life."),
         ("smartctl_device_bytes_read", G, "bytes", "NVMe: bytes read (data units x 512000)."),
         ("smartctl_device_bytes_written", G, "bytes", "NVMe: bytes written (data units x 512000)."))
    + _m("smart", DEV + ("temperature_type",),
         ("smartctl_device_temperature", G, "celsius", "Device temperature celsius."))
    + _m("smart", DEV + ("power_mode",),
         ("smartctl_device_power_mode", G, "", "1 for the device's current power mode (STANDBY: not read)."))
    + _m("smart", DEV + ("error_log_type",),
         ("smartctl_device_error_log_count", G, "", "ATA: SMART error log count."))
    + _m("smart", DEV + ("attribute_name", "attribute_flags_short", "attribute_flags_long", "attribute_id",
                         "attribute_value_type"),
         ("smartctl_device_attribute", G, "", "ATA SMART attribute: value, worst, thresh or raw."))
    + _m("smart", SMART_IDENT,
         ("smartctl_scsi_grown_defect_list", G, "", "SCSI: grown defect list count."),
         ("smartctl_read_total_uncorrected_errors", G, "", "SCSI: read total uncorrected errors."),
         ("smartctl_write_total_uncorrected_errors", G, "", "SCSI: write total uncorrected errors."))
    + _m("smart", ("device", "reason"),
         ("waystation_smart_device_errors_total", C, "",
          "Devices smartctl could not read (timeout, stalled, permission, open, error) since the agent started."))
)

SCRAPE = _m("scrape", ("job",),
            ("waystation_scrape_series_dropped_total", C, "",
             "Scraped series dropped by the source's max_series limit since the agent started."))

AGENT = (
    _m("agent", ("source", "stage"),
       ("waystation_source_errors_total", C, "",
        "Source failures by stage (probe, collect, summarize, overrun); a running source's "
        "collect, summarize and overrun are sent from 0."))
    + _m("agent", ("source",),
         ("waystation_agent_source_enabled", G, "", "1 if the source runs, 0 if its probe disabled it."))
    + _m("agent", (),
         ("waystation_agent_spool_pending_batches", G, "", "Batches in the spool not yet acknowledged."),
         ("waystation_agent_spool_pending_bytes", G, "bytes", "Bytes of batches not yet acknowledged."),
         ("waystation_agent_spool_rejected_batches", G, "", "Batches the collector refused, kept for inspection."),
         ("waystation_agent_spool_dropped_batches_total", C, "", "Batches evicted because the spool was full."),
         ("waystation_agent_spool_dropped_samples_total", C, "", "Samples in the evicted batches."),
         ("waystation_agent_batches_signed_total", C, "", "Batches signed into the spool."),
         ("waystation_agent_spool_oldest_unsent_timestamp_seconds", G, "seconds",
          "Start of the oldest data the collector lacks as this batch is signed: the oldest "
          "unacknowledged batch's window start, or this batch's own time when nothing else waits. "
          "time() minus it is the node's backlog age."),
         ("waystation_agent_uplink_sent_bytes_total", C, "bytes", "Bytes posted to the collector."),
         ("waystation_agent_uplink_sent_batches_total", C, "", "Batches posted to the collector."),
         ("waystation_agent_uplink_acked_batches_total", C, "", "Batches the collector acknowledged."),
         ("waystation_agent_uplink_rejected_batches_total", C, "", "Batches the collector refused."),
         ("waystation_agent_uplink_failures_total", C, "", "Failed posts (network errors, 5xx, timeouts)."),
         ("waystation_agent_uplink_probes_total", C, "",
          "Reachability probes (GET /healthz) sent while the collector could not be reached."),
         ("waystation_agent_uplink_backoff_seconds", G, "seconds", "Current retry backoff of the uplink."),
         ("waystation_agent_uplink_last_ack_timestamp_seconds", G, "seconds",
          "Wall time of the last acknowledgement (absent before the first)."),
         ("waystation_agent_spool_write_errors_total", C, "", "Failed attempts to write the spool."),
         ("waystation_agent_held_dropped_samples_total", C, "",
          "Samples dropped from memory while the spool could not be written."),
         ("waystation_agent_late_samples_total", C, "",
          "Samples dropped by the summarizer: window already flushed, or not newer than the last."),
         ("waystation_agent_unencodable_samples_total", C, "", "Samples the wire format cannot carry."),
         ("waystation_agent_cpu_seconds_total", C, "seconds", "User and system CPU time of the agent."),
         ("waystation_agent_resident_memory_bytes", G, "bytes", "Resident memory of the agent."))
)


def _preset_entries() -> list[Metric]:
    from agent.sources.scrape_presets import PRESETS

    return [
        Metric(name, kind, "", help_, ("job",), f"scrape:{preset}", server_labels=True)
        for preset, p in sorted(PRESETS.items())
        for name, kind, help_ in p.families
    ]


CATALOG: tuple[Metric, ...] = tuple(SYSTEM + NETWORK + GPU_METRICS + SMART + SCRAPE + AGENT + _preset_entries())


def by_name(source_prefix: str = "") -> dict[str, Metric]:
    """Catalog entries by name, for entries whose source starts with source_prefix."""
    return {m.name: m for m in CATALOG if m.source.startswith(source_prefix)}


def lookup(name: str) -> Metric | None:
    """The entry for an emitted name, resolving the summarizer's `:window_*` series to their base."""
    for suffix in WINDOW_SUFFIXES:
        if name.endswith(suffix):
            base = lookup(name[: -len(suffix)])
            return base if base is not None and base.type == "gauge" else None
    return _BY_NAME.get(name)


_BY_NAME = {m.name: m for m in CATALOG if not m.server_labels}


def render_help_module() -> str:
    """wire/metric_help.py: each catalogued name's HELP, for the collector's /metrics (the
    collector imports nothing of the agent's, so it reads this generated copy).
    Regenerate with: .venv/bin/python -m agent.catalog > wire/metric_help.py"""
    helps: dict[str, str] = {}
    for m in CATALOG:
        helps.setdefault(m.name, m.help)
    body = "".join(f"    {name!r}: {text!r},\n" for name, text in sorted(helps.items()))
    return (
        "# ruff: noqa: E501 (generated data: one entry per line)\n"
        '"""HELP text of every metric the agent can emit, generated from agent/catalog.py.\n\n'
        "Do not edit: regenerate with `.venv/bin/python -m agent.catalog > wire/metric_help.py`\n"
        '(tests/unit/test_catalog.py fails while this copy differs from the catalog)."""\n\n'
        "from __future__ import annotations\n\n"
        f"WINDOW_SUFFIXES = {WINDOW_SUFFIXES!r}\n"
        "_WINDOW_WORDS = {':window_min': 'minimum', ':window_max': 'maximum', ':window_mean': 'mean'}\n\n"
        f"HELP: dict[str, str] = {{\n{body}}}\n\n\n"
        "def help_of(name: str) -> str | None:\n"
        '    """The HELP of an emitted series name; a summarizer `:window_*` series says what it is of."""\n'
        "    for suffix in WINDOW_SUFFIXES:\n"
        "        if name.endswith(suffix) and name[: -len(suffix)] in HELP:\n"
        "            base = HELP[name[: -len(suffix)]].rstrip('.')\n"
        "            return f'{base} ({_WINDOW_WORDS[suffix]} over the summary window).'\n"
        "    return HELP.get(name)\n"
    )


if __name__ == "__main__":
    print(render_help_module(), end="")
