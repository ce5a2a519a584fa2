"""Telemetry pipeline: what the collector ingests, how far behind each node is, what was
lost (drop receipts), clock offsets, and remote-write forwarding per target."""

from dashboards.common import (
    Layout,
    build,
    clock_offset,
    datasource_var,
    node_age,
    site_var,
    table,
    timeseries,
    watermark_lag,
)

S = 'site=~"$site"'
R = "$__rate_interval"
L = Layout()

panels = [
    timeseries(L, "Collector ingest by result", [
        (f"sum by (result) (rate(waystation_ingest_batches_total[{R}]))", "{{result}}"),
    ], unit="ops"),
    timeseries(L, "Collector ingest volume", [
        (f"rate(waystation_ingest_samples_total[{R}])", "samples/s"),
        (f"rate(waystation_ingest_bytes_total[{R}])", "bytes/s"),
    ]),
    timeseries(L, "Watermark lag per node (seqs)", [
        (f"{watermark_lag(S)} > 0", "{{site}}/{{node}}"),
    ], description="Highest recorded seq minus complete-through seq: batches still to arrive (backfill)."),
    timeseries(L, "Gaps per node (seqs)", [
        (f"waystation_node_gap_seqs{{{S}}} > 0", "{{site}}/{{node}}"),
    ], description="Seqs below the highest neither recorded nor covered by a drop receipt."),
    timeseries(L, "Drop receipts", [
        (f"increase(waystation_node_dropped_batches_total{{{S}}}[1h]) > 0", "{{site}}/{{node}} batches"),
        (f"increase(waystation_node_dropped_samples_total{{{S}}}[1h]) > 0", "{{site}}/{{node}} samples"),
    ], description="Data evicted from full spools, per the nodes' signed drop receipts (per hour)."),
    timeseries(L, "Clock offset estimate", [
        (clock_offset(S), "{{site}}/{{node}}"),
    ], unit="s", description="Agent minus collector clock, minus about one flush interval."),
    timeseries(L, "Reported backlog", [
        (f"waystation_node_reported_backlog_bytes{{{S}}} > 0", "{{site}}/{{node}}"),
    ], unit="bytes"),
    timeseries(L, "Uplink failures and refusals", [
        (f"sum by (site) (rate(waystation_agent_uplink_failures_total{{{S}}}[{R}]))", "failures {{site}}"),
        (f"sum by (site) (rate(waystation_agent_uplink_rejected_batches_total{{{S}}}[{R}]))", "refused {{site}}"),
    ], unit="ops"),
    table(L, "Nodes", [
        (node_age(S), ""),
        (f"max by (site, node) (waystation_node_highest_seq{{{S}}})", ""),
        (watermark_lag(S), ""),
        (f"max by (site, node) (waystation_node_gap_seqs{{{S}}})", ""),
        (f"max by (site, node) (waystation_exposition_series{{{S}}})", ""),
        (f"max by (site, node) (waystation_exposition_series_dropped_total{{{S}}})", ""),
        (f"sum by (site, node) (increase(waystation_exposition_series_expired_total{{{S}}}[1h]))", ""),
    ], h=10, description="Per node: seconds since last batch, highest seq, watermark lag, gaps, exposed series, "
                         "series not exposed (over the cap or reserved), series expired in the last hour "
                         "(no longer sent)."),
]

L.newline()
# Remote write (the collector's own series: per target, no site/node)
panels += [
    timeseries(L, "Remote write lag per target", [
        ("max by (target) (waystation_remote_write_lag_seconds)", "{{target}}"),
    ], unit="s", w=8, description="Age of the oldest sample each target does not have yet (0: nothing pending). "
                                  "RemoteWriteFallingBehind / RemoteWriteTargetDown."),
    timeseries(L, "Remote write pending batches per target", [
        ("max by (target) (waystation_remote_write_pending_batches)", "{{target}}"),
    ], w=8, description="Batches in the ledger each target does not have yet."),
    timeseries(L, "Remote write samples/s sent per target", [
        (f"sum by (target) (rate(waystation_remote_write_samples_total[{R}]))", "{{target}}"),
    ], w=8, description="Samples per second the receivers accepted."),
    timeseries(L, "Remote write refused samples/s", [
        (f"sum by (target, reason) (rate(waystation_remote_write_samples_refused_total[{R}])) > 0",
         "{{target}} {{reason}}"),
    ], w=8, description="Samples per second refused for good (not retried), by target and reason "
                        "(RemoteWriteSamplesRefused)."),
    timeseries(L, "Remote write retries/s by reason", [
        (f"sum by (target, reason) (rate(waystation_remote_write_retries_total[{R}])) > 0", "{{target}} {{reason}}"),
    ], unit="reqps", w=8, description="Requests retried per second: http_5xx, http_429, http_401/403 "
                                      "(credentials), connection, timeout."),
    timeseries(L, "Expired unforwarded", [
        ("sum by (target) (increase(waystation_ledger_expired_unforwarded_samples_total[1h])) > 0",
         "{{target}} samples"),
        ("sum by (target) (increase(waystation_ledger_expired_unforwarded_batches_total[1h])) > 0",
         "{{target}} batches"),
    ], w=8, description="Data that left the ledger (retention or size cap) before the target had it: lost for "
                        "that target (per hour; RemoteWriteDataLost)."),
]

dashboard = build(
    "Waystation / Telemetry pipeline", "waystation-pipeline", panels, [datasource_var(), site_var()],
    "Collector ingest, per-node watermark lag and gaps, drop receipts, clock offsets, remote write.",
)
