"""Site / node detail: one node's GPUs, disks, network, system, model servers and its
telemetry pipeline (spool, uplink, acks, retries)."""

from dashboards.common import (
    SMART_SPAN,
    Layout,
    backlog_age,
    build,
    clock_offset,
    datasource_var,
    gauge,
    interface_ratio,
    node_age,
    node_var,
    site_var,
    stat,
    table,
    timeseries,
)

N = 'site="$site", node="$node"'
R = "$__rate_interval"
TTFT = "vllm:time_to_first_token_seconds_bucket"
E2E = "vllm:e2e_request_latency_seconds_bucket"
L = Layout()

panels = [
    stat(L, "Last batch", (node_age(N), ""), unit="s",
         thresholds=(("green", None), ("orange", 300), ("red", 600))),
    stat(L, "Spool backlog", (f"waystation_agent_spool_pending_batches{{{N}}}", ""),
         thresholds=(("green", None), ("orange", 20))),
    stat(L, "Oldest unsent", (backlog_age(N), ""), unit="s",
         description="Age of the oldest data this node has not delivered yet (up to one flush interval "
                     "when nothing waits)."),
    stat(L, "Clock offset (est.)", (clock_offset(N), ""), unit="s",
         description="Agent minus collector clock, minus about one flush interval (see ClockSkew)."),
    gauge(L, "Memory used",
          (f"100 * (1 - node_memory_MemAvailable_bytes{{{N}}} / node_memory_MemTotal_bytes{{{N}}})", ""), h=4),
    stat(L, "Load (1m)", (f"node_load1{{{N}}}", "")),
]
L.newline()
# GPUs
panels += [
    timeseries(L, "GPU utilization", [(f"DCGM_FI_DEV_GPU_UTIL{{{N}}}", "GPU {{gpu}}")], unit="percent", w=8),
    timeseries(L, "GPU temperature", [(f"DCGM_FI_DEV_GPU_TEMP{{{N}}}", "GPU {{gpu}}"),
                                      (f"DCGM_FI_DEV_MEMORY_TEMP{{{N}}}", "GPU {{gpu}} memory")], unit="celsius", w=8),
    timeseries(L, "GPU power", [(f"DCGM_FI_DEV_POWER_USAGE{{{N}}}", "GPU {{gpu}}"),
                                (f"DCGM_FI_DEV_POWER_MGMT_LIMIT{{{N}}}", "GPU {{gpu}} limit")], unit="watt", w=8),
    timeseries(L, "GPU memory used", [
        (f"DCGM_FI_DEV_FB_USED{{{N}}} / (DCGM_FI_DEV_FB_USED{{{N}}} + DCGM_FI_DEV_FB_FREE{{{N}}})", "GPU {{gpu}}"),
    ], unit="percentunit", w=8),
    timeseries(L, "GPU XID and ECC errors", [
        (f"increase(waystation_gpu_xid_errors_total{{{N}}}[{R}])", "GPU {{gpu}} XID {{xid}}"),
        (f"increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{N}}}[{R}])", "GPU {{gpu}} DBE"),
        (f"increase(DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{{{N}}}[{R}])", "GPU {{gpu}} SBE"),
    ], w=8),
    timeseries(L, "GPU clock-event (throttle) reasons", [
        (f'waystation_gpu_clocks_event_reason_active{{{N}, reason!="gpu_idle"}} == 1', "GPU {{gpu}} {{reason}}"),
    ], w=8),
]
L.newline()
# Disks
panels += [
    table(L, "Disks", [
        (f"last_over_time(smartctl_device_smart_status{{{N}}}[{SMART_SPAN}])", ""),
        (f"last_over_time(smartctl_device_percentage_used{{{N}}}[{SMART_SPAN}])", ""),
        (f"last_over_time(smartctl_device_available_spare{{{N}}}[{SMART_SPAN}])", ""),
        (f"last_over_time(smartctl_device_critical_warning{{{N}}}[{SMART_SPAN}])", ""),
        (f"last_over_time(smartctl_device_media_errors{{{N}}}[{SMART_SPAN}])", ""),
    ], w=12, description="Per device: SMART status (1 passed), % used, spare %, critical warning bits, media errors."),
    timeseries(L, "Disk temperature", [
        (f'last_over_time(smartctl_device_temperature{{{N}, temperature_type="current"}}[{SMART_SPAN}])', "{{device}}"),
    ], unit="celsius", w=12),
]
L.newline()
# Network and system
panels += [
    timeseries(L, "Interface throughput", [
        (f'rate(node_network_receive_bytes_total{{{N}, device!="lo"}}[{R}])', "{{device}} rx"),
        (f'rate(node_network_transmit_bytes_total{{{N}, device!="lo"}}[{R}])', "{{device}} tx"),
    ], unit="Bps", w=8),
    timeseries(L, "Interface errors and drops", [
        (interface_ratio(N, "errors", R), "{{device}} errors"),
        (interface_ratio(N, "drops", R), "{{device}} drops"),
    ], unit="percentunit", w=8),
    timeseries(L, "Probe RTT and loss", [
        (f'waystation_probe_rtt_seconds{{{N}, stat="mean"}}', "{{target}} RTT"),
        (f"waystation_probe_loss_ratio{{{N}}}", "{{target}} loss"),
    ], unit="s", w=8),
    timeseries(L, "CPU busy", [
        (f'1 - sum by (node) (rate(node_cpu_seconds_total{{{N}, mode="idle"}}[{R}]))'
         f" / sum by (node) (rate(node_cpu_seconds_total{{{N}}}[{R}]))", "busy"),
    ], unit="percentunit", w=8,
        description="Share of CPU time not idle. A share of the CPU time counted, not a rate against the "
                    "clock: Prometheus' rate() reads low at a graph's newest point (the newest sample is up "
                    "to a flush interval old), and the share cancels that out."),
    timeseries(L, "Filesystem available", [
        (f"node_filesystem_avail_bytes{{{N}}} / node_filesystem_size_bytes{{{N}}}", "{{mountpoint}}"),
    ], unit="percentunit", w=8),
    timeseries(L, "Disk I/O", [
        (f"rate(node_disk_read_bytes_total{{{N}}}[{R}])", "{{device}} read"),
        (f"rate(node_disk_written_bytes_total{{{N}}}[{R}])", "{{device}} write"),
    ], unit="Bps", w=8),
]
L.newline()
# Model serving: quantiles over the scraped histogram buckets
panels += [
    timeseries(L, "vLLM latency", [
        (f"histogram_quantile(0.99, sum by (model_name, le) (rate({TTFT}{{{N}}}[{R}])))",
         "p99 TTFT {{model_name}}"),
        (f"histogram_quantile(0.5, sum by (model_name, le) (rate({TTFT}{{{N}}}[{R}])))",
         "p50 TTFT {{model_name}}"),
        (f"histogram_quantile(0.99, sum by (model_name, le) (rate({E2E}{{{N}}}[{R}])))",
         "p99 end-to-end {{model_name}}"),
    ], unit="s", w=8),
    timeseries(L, "TGI and Triton latency", [
        (f"histogram_quantile(0.99, sum by (le) (rate(tgi_request_duration_bucket{{{N}}}[{R}])))", "TGI p99"),
        (f"histogram_quantile(0.99, sum by (le) (rate(tgi_request_queue_duration_bucket{{{N}}}[{R}])))",
         "TGI queue p99"),
        (f'nv_inference_request_summary_us{{{N}, quantile="0.99"}} / 1e6', "Triton p99 {{model}}"),
    ], unit="s", w=8),
    timeseries(L, "Queue depth and running", [
        (f"vllm:num_requests_waiting{{{N}}}", "vLLM waiting {{model_name}}"),
        (f"vllm:num_requests_running{{{N}}}", "vLLM running {{model_name}}"),
        (f"tgi_queue_size{{{N}}}", "TGI queue"),
        (f"nv_inference_pending_request_count{{{N}}}", "Triton pending {{model}}"),
    ], w=8),
]
L.newline()
# This node's telemetry pipeline
panels += [
    timeseries(L, "Spool depth", [
        (f"waystation_agent_spool_pending_batches{{{N}}}", "pending batches"),
        (f"waystation_agent_spool_rejected_batches{{{N}}}", "rejected batches"),
    ], w=8),
    timeseries(L, "Uplink rate", [
        (f"rate(waystation_agent_uplink_sent_bytes_total{{{N}}}[{R}])", "sent"),
    ], unit="Bps", w=8),
    timeseries(L, "Posts, acks and retries", [
        (f"rate(waystation_agent_uplink_sent_batches_total{{{N}}}[{R}])", "posted"),
        (f"rate(waystation_agent_uplink_acked_batches_total{{{N}}}[{R}])", "acked"),
        (f"rate(waystation_agent_uplink_failures_total{{{N}}}[{R}])", "failed (retried)"),
        (f"rate(waystation_agent_uplink_rejected_batches_total{{{N}}}[{R}])", "refused"),
        (f"sum by (source, stage) (rate(waystation_source_errors_total{{{N}}}[{R}]))",
         "source error {{source}} {{stage}}"),
    ], unit="ops", w=8),
]

dashboard = build(
    "Waystation / Site and node", "waystation-node", panels,
    [datasource_var(), site_var(multi=False), node_var()],
    "One node: GPUs, disks, network, system, model servers and its telemetry pipeline.",
)
