"""Fleet overview: which sites and nodes report, what is backed up or lost, and the worst
GPUs, disks, network paths and model servers across the fleet."""

from dashboards.common import (
    SMART_SPAN,
    Layout,
    backlog_age,
    bargauge,
    build,
    datasource_var,
    interface_ratio,
    node_age,
    site_var,
    stat,
    table,
    timeseries,
)

S = 'site=~"$site"'
R = "$__rate_interval"
TTFT = "vllm:time_to_first_token_seconds_bucket"
L = Layout()
RED_AT_1 = (("green", None), ("red", 1))

panels = [
    stat(L, "Sites", (f"count(count by (site) (waystation_node_last_seen_timestamp_seconds{{{S}}}))", "")),
    stat(L, "Sites down", (f"count(min by (site) ({node_age(S)}) > 900) or vector(0)", ""), thresholds=RED_AT_1,
         description="Sites where no node delivered a batch for 15 minutes (SiteDown)."),
    stat(L, "Nodes", (f"count(waystation_node_last_seen_timestamp_seconds{{{S}}})", "")),
    stat(L, "Nodes stale", (f"count({node_age(S)} > 600) or vector(0)", ""),
         thresholds=(("green", None), ("orange", 1)),
         description="Nodes with no batch for 10 minutes (NodeDown threshold)."),
    stat(L, "Tamper events (24h)", (f"sum(increase(waystation_node_tamper_events_total{{{S}}}[24h])) or vector(0)", ""),
         thresholds=RED_AT_1),
    stat(L, "Samples lost (24h)",
         (f"sum(increase(waystation_node_dropped_samples_total{{{S}}}[24h])) or vector(0)", ""),
         thresholds=(("green", None), ("orange", 1))),
]
L.newline()
panels += [
    table(L, "Sites", [
        (f"count by (site) (waystation_node_last_seen_timestamp_seconds{{{S}}})", ""),
        (f"sum by (site) ({node_age(S)} > bool 600)", ""),
        (f"max by (site) ({node_age(S)})", ""),
        (f"sum by (site) (waystation_node_reported_backlog_batches{{{S}}})", ""),
        (f"sum by (site) (waystation_node_reported_backlog_bytes{{{S}}})", ""),
        (f"max by (site) ({backlog_age(S)})", ""),
    ], w=24, h=8, description="Per site: nodes, stale nodes, oldest last batch (s), backlog (batches, bytes), "
                               "oldest unsent batch age (s)."),
    bargauge(L, "Backlog by site", (f"sort_desc(sum by (site) (waystation_node_reported_backlog_bytes{{{S}}}))",
                                    "{{site}}"), unit="bytes", max_value=512 * 1024 * 1024),
    bargauge(L, "Oldest unsent batch by site",
             (f"sort_desc(max by (site) ({backlog_age(S)}))",
              "{{site}}"), unit="s", max_value=86400),
    timeseries(L, "Drops, tampering and refused batches", [
        (f"sum by (site) (increase(waystation_node_dropped_samples_total{{{S}}}[1h]))", "samples dropped {{site}}"),
        (f"sum by (site) (increase(waystation_node_tamper_events_total{{{S}}}[1h]))", "tamper events {{site}}"),
        (f'sum by (result) (rate(waystation_ingest_batches_total{{result!~"accepted|duplicate"}}[{R}]))',
         "refused/s {{result}}"),
    ], w=8),
]
L.newline()
panels += [
    bargauge(L, "Hottest GPUs", (f"topk(10, max by (site, node, gpu) (DCGM_FI_DEV_GPU_TEMP{{{S}}}))",
                                 "{{site}}/{{node}} GPU {{gpu}}"), unit="celsius", max_value=100),
    bargauge(L, "GPU XID errors (24h)",
             (f"topk(10, sum by (site, node, gpu) (increase(waystation_gpu_xid_errors_total{{{S}}}[24h])) > 0)",
              "{{site}}/{{node}} GPU {{gpu}}"), max_value=10),
    bargauge(L, "GPU uncorrectable ECC (24h)",
             (f"topk(10, sum by (site, node, gpu) (increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{S}}}[24h])) > 0)",
              "{{site}}/{{node}} GPU {{gpu}}"), max_value=10),
    bargauge(L, "Most worn disks", (f"topk(10, max by (site, node, device) "
                                    f"(last_over_time(smartctl_device_percentage_used{{{S}}}[{SMART_SPAN}])))",
                                    "{{site}}/{{node}} {{device}}"), unit="percent"),
    table(L, "Disks failing SMART or with a critical warning", [
        (f"last_over_time(smartctl_device_smart_status{{{S}}}[{SMART_SPAN}]) == 0", ""),
        (f"last_over_time(smartctl_device_critical_warning{{{S}}}[{SMART_SPAN}]) > 0", ""),
    ], w=16),
]
L.newline()
panels += [
    bargauge(L, "Worst probe RTT",
             (f'topk(10, max by (site, node, target) (waystation_probe_rtt_seconds{{{S}, stat="mean"}}))',
              "{{site}}/{{node}} → {{target}}"), unit="s", max_value=1),
    bargauge(L, "Worst probe loss", (f"topk(10, max by (site, node, target) (waystation_probe_loss_ratio{{{S}}}))",
                                     "{{site}}/{{node}} → {{target}}"), unit="percentunit", max_value=1),
    bargauge(L, "Worst interface error ratio",
             (f"topk(10, {interface_ratio(S, 'errors', R)})", "{{site}}/{{node}} {{device}}"),
             unit="percentunit", max_value=0.05),
]
L.newline()
panels += [
    timeseries(L, "Model-server p99 latency (worst 10)", [
        (f"topk(10, histogram_quantile(0.99, sum by (site, node, model_name, le) (rate({TTFT}{{{S}}}[{R}]))))",
         "vLLM TTFT {{site}}/{{node}} {{model_name}}"),
        (f"topk(10, histogram_quantile(0.99, sum by (site, node, le) (rate(tgi_request_duration_bucket{{{S}}}[{R}]))))",
         "TGI {{site}}/{{node}}"),
        (f"topk(10, max by (site, node, model, version) "
         f'(nv_inference_request_summary_us{{{S}, quantile="0.99"}}) / 1e6)', "Triton {{site}}/{{node}} {{model}}"),
    ], unit="s"),
    timeseries(L, "Model-server queue depth (worst 10)", [
        (f"topk(10, sum by (site, node) (vllm:num_requests_waiting{{{S}}}))", "vLLM {{site}}/{{node}}"),
        (f"topk(10, sum by (site, node) (tgi_queue_size{{{S}}}))", "TGI {{site}}/{{node}}"),
        (f"topk(10, sum by (site, node) (nv_inference_pending_request_count{{{S}}}))", "Triton {{site}}/{{node}}"),
    ]),
]

dashboard = build(
    "Waystation / Fleet overview", "waystation-fleet", panels, [datasource_var(), site_var()],
    "Every site and node: reporting, backlog, loss, tampering, and the worst hardware and model servers.",
)
