"""Scrape presets for model servers: default URL and the metric families kept, per server.

A preset's `families` is its allow-list: (family name as the server writes it, TYPE, HELP).
Sample names are allowed per family: a histogram's `_bucket`/`_sum`/`_count`, a summary's
quantiles and `_sum`/`_count`, a counter or gauge under its own name, so histograms stay
histograms and counters stay counters. HELP is the server's own text (our words where the
server writes none). The lists are the servers' metrics as their recorded pages in
../shared/fixtures/metrics/ show them, without the Python/process runtime series; a
`[[sources.scrape]]` entry's own `allow` replaces the list (e.g. allow = ["vllm:.*"] for a
newer release's extra metrics), its `deny` applies on top. agent/catalog.py lists these
families as the scraped sources' entries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """One model server's defaults."""

    url: str
    families: tuple[tuple[str, str, str], ...]  # (name, type, help)

    def allow(self) -> tuple[str, ...]:
        """Regexes over sample names (fullmatched) that keep exactly these families."""
        suffixes = {"histogram": "(?:_bucket|_sum|_count)", "summary": "(?:_sum|_count)?"}
        return tuple(re.escape(name) + suffixes.get(kind, "") for name, kind, _ in self.families)


# vLLM OpenAI-compatible server: --port 8000, metrics on the API port.
VLLM = Preset(
    'http://127.0.0.1:8000/metrics',
    (
        ('vllm:cache_config_info', 'gauge', 'information of cache_config'),
        ('vllm:num_requests_running', 'gauge', 'Number of requests currently running on GPU.'),
        ('vllm:num_requests_waiting', 'gauge', 'Number of requests waiting to be processed.'),
        ('vllm:num_requests_swapped', 'gauge', 'Number of requests swapped to CPU.'),
        ('vllm:gpu_cache_usage_perc', 'gauge', 'GPU KV-cache usage. 1 means 100 percent usage.'),
        ('vllm:cpu_cache_usage_perc', 'gauge', 'CPU KV-cache usage. 1 means 100 percent usage.'),
        ('vllm:num_preemptions_total', 'counter', 'Cumulative number of preemption from the engine.'),
        ('vllm:prompt_tokens_total', 'counter', 'Number of prefill tokens processed.'),
        ('vllm:generation_tokens_total', 'counter', 'Number of generation tokens processed.'),
        ('vllm:time_to_first_token_seconds', 'histogram', 'Histogram of time to first token in seconds.'),
        ('vllm:time_per_output_token_seconds', 'histogram', 'Histogram of time per output token in seconds.'),
        ('vllm:e2e_request_latency_seconds', 'histogram', 'Histogram of end to end request latency in seconds.'),
        ('vllm:request_prompt_tokens', 'histogram', 'Number of prefill tokens processed.'),
        ('vllm:request_generation_tokens', 'histogram', 'Number of generation tokens processed.'),
        ('vllm:request_params_best_of', 'histogram', 'Histogram of the best_of request parameter.'),
        ('vllm:request_params_n', 'histogram', 'Histogram of the n request parameter.'),
        ('vllm:request_success_total', 'counter', 'Count of successfully processed requests.'),
        ('vllm:avg_prompt_throughput_toks_per_s', 'gauge', 'Average prefill throughput in tokens/s.'),
        ('vllm:avg_generation_throughput_toks_per_s', 'gauge', 'Average generation throughput in tokens/s.'),
        ('vllm:kv_cache_usage_perc', 'gauge', 'KV-cache usage. 1 means 100 percent usage.'),
        (
            'vllm:engine_sleep_state',
            'gauge',
            'Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is aw'
            'ake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.',
        ),
        ('vllm:prefix_cache_queries_total', 'counter', 'Prefix cache queries, in terms of number of queried tokens.'),
        ('vllm:prefix_cache_hits_total', 'counter', 'Prefix cache hits, in terms of number of cached tokens.'),
        (
            'vllm:external_prefix_cache_queries_total',
            'counter',
            'External prefix cache queries from KV connector cross-ins'
            'tance cache sharing, in terms of number of queried tokens.',
        ),
        (
            'vllm:external_prefix_cache_hits_total',
            'counter',
            'External prefix cache hits from KV connector cross-inst'
            'ance cache sharing, in terms of number of cached tokens.',
        ),
        ('vllm:mm_cache_queries_total', 'counter', 'Multi-modal cache queries, in terms of number of queried items.'),
        ('vllm:mm_cache_hits_total', 'counter', 'Multi-modal cache hits, in terms of number of cached items.'),
        ('vllm:prompt_tokens_by_source_total', 'counter', 'Number of prompt tokens by source.'),
        ('vllm:prompt_tokens_cached_total', 'counter', 'Number of cached prompt tokens (local + external).'),
        ('vllm:prompt_tokens_recomputed_total', 'counter', 'Number of cached tokens recomputed for forward pass.'),
        ('vllm:iteration_tokens_total', 'histogram', 'Histogram of number of tokens per engine_step.'),
        ('vllm:request_max_num_generation_tokens', 'histogram',
         'Histogram of maximum number of requested generation tokens.'),
        ('vllm:request_params_max_tokens', 'histogram', 'Histogram of the max_tokens request parameter.'),
        ('vllm:inter_token_latency_seconds', 'histogram', 'Histogram of inter-token latency in seconds.'),
        ('vllm:request_time_per_output_token_seconds', 'histogram',
         'Histogram of time_per_output_token_seconds per request.'),
        ('vllm:request_queue_time_seconds', 'histogram', 'Histogram of time spent in WAITING phase for request.'),
        ('vllm:request_inference_time_seconds', 'histogram', 'Histogram of time spent in RUNNING phase for request.'),
        ('vllm:request_prefill_time_seconds', 'histogram', 'Histogram of time spent in PREFILL phase for request.'),
        ('vllm:request_decode_time_seconds', 'histogram', 'Histogram of time spent in DECODE phase for request.'),
        ('vllm:request_prefill_kv_computed_tokens', 'histogram',
         'Histogram of new KV tokens computed during prefill (excluding cached tokens).'),
    ),
)

# Triton: --metrics-port 8002.
TRITON = Preset(
    'http://127.0.0.1:8002/metrics',
    (
        ('nv_inference_request_success', 'counter', 'Number of successful inference requests, all batch sizes'),
        ('nv_inference_request_failure', 'counter', 'Number of failed inference requests, all batch sizes'),
        ('nv_inference_count', 'counter', 'Number of inferences performed (does not include cached requests)'),
        ('nv_inference_exec_count', 'counter',
         'Number of model executions performed (does not include cached requests)'),
        ('nv_inference_request_duration_us', 'counter',
         'Cumulative inference request duration in microseconds (includes cached requests)'),
        ('nv_inference_queue_duration_us', 'counter',
         'Cumulative inference queuing duration in microseconds (includes cached requests)'),
        ('nv_inference_compute_input_duration_us', 'counter',
         'Cumulative compute input duration in microseconds (does not include cached requests)'),
        ('nv_inference_compute_infer_duration_us', 'counter',
         'Cumulative compute inference duration in microseconds (does not include cached requests)'),
        ('nv_inference_compute_output_duration_us', 'counter',
         'Cumulative inference compute output duration in microseconds (does not include cached requests)'),
        ('nv_energy_consumption', 'counter', 'GPU energy consumption in joules since the Triton Server started'),
        ('nv_inference_pending_request_count', 'gauge',
         'Instantaneous number of pending requests awaiting execution per-model.'),
        ('nv_gpu_utilization', 'gauge', 'GPU utilization rate [0.0 - 1.0)'),
        ('nv_gpu_memory_total_bytes', 'gauge', 'GPU total memory, in bytes'),
        ('nv_gpu_memory_used_bytes', 'gauge', 'GPU used memory, in bytes'),
        ('nv_gpu_power_usage', 'gauge', 'GPU power usage in watts'),
        ('nv_gpu_power_limit', 'gauge', 'GPU power management limit in watts'),
        ('nv_cpu_utilization', 'gauge', 'CPU utilization rate [0.0 - 1.0]'),
        ('nv_cpu_memory_total_bytes', 'gauge', 'CPU total memory (RAM), in bytes'),
        ('nv_cpu_memory_used_bytes', 'gauge', 'CPU used memory (RAM), in bytes'),
        ('nv_cache_util', 'gauge', 'Cache utilization [0.0 - 1.0]'),
        ('nv_cache_num_entries', 'gauge', 'Number of responses stored in response cache'),
        ('nv_cache_num_hits', 'gauge', 'Number of cache hits in response cache'),
        ('nv_cache_num_misses', 'gauge', 'Number of cache misses in response cache'),
        ('nv_cache_num_lookups', 'gauge', 'Number of cache lookups in response cache'),
        ('nv_cache_num_evictions', 'gauge', 'Number of cache evictions in response cache'),
        ('nv_cache_lookup_duration', 'gauge', 'Total cache lookup duration (hit and miss), in microseconds'),
        ('nv_cache_insertion_duration', 'gauge', 'Total cache insertion duration, in microseconds'),
        ('nv_inference_request_summary_us', 'summary',
         'Summary of inference request duration in microseconds (includes cached requests)'),
        ('nv_inference_queue_summary_us', 'summary',
         'Summary of inference queuing duration in microseconds (includes cached requests)'),
        ('nv_inference_compute_input_summary_us', 'summary',
         'Cumulative compute input duration in microseconds (does not include cached requests)'),
        ('nv_inference_compute_infer_summary_us', 'summary',
         'Cumulative compute inference duration in microseconds (does not include cached requests)'),
        ('nv_inference_compute_output_summary_us', 'summary',
         'Cumulative inference compute output duration in microseconds (does not include cached requests)'),
    ),
)

# TGI launcher: --port 3000 (its Docker image sets PORT=80: give url then).
TGI = Preset(
    'http://127.0.0.1:3000/metrics',
    (
        ('tgi_request_success', 'counter', 'Number of successful requests'),
        ('tgi_batch_concat', 'counter', 'Number of batch concatenations'),
        ('tgi_request_count', 'counter', 'Total number of requests'),
        ('tgi_request_failure', 'counter', 'Number of failed requests'),
        ('tgi_batch_inference_success', 'counter',
         'Number of successful inference calls per method (prefill or decode)'),
        ('tgi_batch_inference_count', 'counter', 'Inference calls per method (prefill or decode)'),
        ('tgi_queue_size', 'gauge', 'Current queue size'),
        ('tgi_batch_current_max_tokens', 'gauge', 'Maximum tokens for the current batch'),
        ('tgi_batch_current_size', 'gauge', 'Current batch size'),
        ('tgi_request_input_length', 'histogram', 'Input token length per request'),
        ('tgi_request_max_new_tokens', 'histogram', 'Maximum new tokens per request'),
        ('tgi_request_inference_duration', 'histogram', 'Request inference duration'),
        ('tgi_request_skipped_tokens', 'summary', 'Speculated tokens per request'),
        ('tgi_batch_forward_duration', 'histogram', 'Batch forward duration per method (prefill or decode)'),
        ('tgi_request_duration', 'histogram', 'Request duration'),
        ('tgi_request_validation_duration', 'histogram', 'Request validation duration'),
        ('tgi_request_queue_duration', 'histogram', 'Request queue duration'),
        ('tgi_batch_filter_duration', 'histogram',
         'Time spent filtering batches and sending generated tokens per method (prefill or decode)'),
        ('tgi_batch_inference_duration', 'histogram', 'Batch inference duration'),
        ('tgi_request_mean_time_per_token_duration', 'histogram', 'Mean time per token per request'),
        ('tgi_batch_concat_duration', 'histogram', 'Batch concatenation duration'),
        ('tgi_request_generated_tokens', 'histogram', 'Generated tokens per request'),
        ('tgi_batch_decode_duration', 'histogram', 'Time spent decoding a batch per method (prefill or decode)'),
        ('tgi_batch_next_size', 'histogram', 'Batch size of the next batch'),
    ),
)

# TorchServe: metrics_address http://127.0.0.1:8082.
TORCHSERVE = Preset(
    'http://127.0.0.1:8082/metrics',
    (
        ('Requests5XX', 'counter', 'Torchserve prometheus counter metric with unit: Count'),
        ('HandlerTime', 'gauge', 'Torchserve prometheus gauge metric with unit: ms'),
        ('ts_inference_requests_total', 'counter', 'Torchserve prometheus counter metric with unit: Count'),
        ('PredictionTime', 'gauge', 'Torchserve prometheus gauge metric with unit: ms'),
        ('MemoryUtilization', 'gauge', 'Torchserve prometheus gauge metric with unit: Percent'),
        ('CPUUtilization', 'gauge', 'Torchserve prometheus gauge metric with unit: Percent'),
        ('Requests2XX', 'counter', 'Torchserve prometheus counter metric with unit: Count'),
        ('Requests4XX', 'counter', 'Torchserve prometheus counter metric with unit: Count'),
        ('WorkerLoadTime', 'gauge', 'Torchserve prometheus gauge metric with unit: Milliseconds'),
        ('GPUMemoryUtilization', 'gauge', 'Torchserve prometheus gauge metric with unit: Percent'),
        ('MemoryUsed', 'gauge', 'Torchserve prometheus gauge metric with unit: Megabytes'),
        ('MemoryAvailable', 'gauge', 'Torchserve prometheus gauge metric with unit: Megabytes'),
        ('DiskAvailable', 'gauge', 'Torchserve prometheus gauge metric with unit: Gigabytes'),
        ('QueueTime', 'gauge', 'Torchserve prometheus gauge metric with unit: Milliseconds'),
        ('ts_queue_latency_microseconds', 'counter', 'Torchserve prometheus counter metric with unit: Microseconds'),
        ('GPUUtilization', 'gauge', 'Torchserve prometheus gauge metric with unit: Percent'),
        ('WorkerThreadTime', 'gauge', 'Torchserve prometheus gauge metric with unit: Milliseconds'),
        ('GPUMemoryUsed', 'gauge', 'Torchserve prometheus gauge metric with unit: Megabytes'),
        ('ts_inference_latency_microseconds', 'counter',
         'Torchserve prometheus counter metric with unit: Microseconds'),
        ('DiskUtilization', 'gauge', 'Torchserve prometheus gauge metric with unit: Percent'),
        ('DiskUsage', 'gauge', 'Torchserve prometheus gauge metric with unit: Gigabytes'),
    ),
)

PRESETS: dict[str, Preset] = {"vllm": VLLM, "triton": TRITON, "tgi": TGI, "torchserve": TORCHSERVE}
