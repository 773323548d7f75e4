"""Prometheus metrics with vLLM's names under a `helix:` prefix, from a registry the app owns.

Gauges and counters are read from `engine.stats()` at scrape time (a custom collector); the latency
histograms are observed by the API from each request's `RequestOutput.metrics` timestamps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from helix_server.engine.outputs import RequestOutput
from helix_server.engine.stats import EngineStats

PREFIX = "helix:"
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("queue_full", "queue_timeout")

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)


class EngineStatsCollector(Collector):
    """Reads `EngineStats` at scrape time and exposes it as gauges and counters."""

    def __init__(self, read_stats: Callable[[], EngineStats]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        """One metric family per engine stat, read now."""
        stats = self._read_stats()
        gauges = {
            "num_requests_running": ("Sequences in the running batch.", stats.num_requests_running),
            "num_requests_waiting": ("Sequences waiting to be scheduled.", stats.num_requests_waiting),
            "kv_cache_usage_perc": ("Fraction of KV cache blocks in use (0-1).", stats.kv_cache_usage),
            "num_kv_blocks_total": ("KV cache blocks in the pool.", stats.num_kv_blocks_total),
            "num_kv_blocks_free": ("KV cache blocks free.", stats.num_kv_blocks_free),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, documentation, value=value)
        counters = {
            "prompt_tokens": ("Prompt tokens received.", stats.prompt_tokens_total),
            "generation_tokens": ("Tokens generated.", stats.generation_tokens_total),
            "num_preemptions": ("Sequences preempted (recomputed later).", stats.num_preemptions_total),
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache (first admission of each sequence).",
                stats.prefix_cache_queries_total,
            ),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", stats.prefix_cache_hits_total),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, documentation, value=value)
        success = CounterMetricFamily(
            PREFIX + "request_success", "Finished sequences by finish reason.", labels=["finished_reason"]
        )
        finished = stats.finished_sequences_total
        for reason in sorted(set(FINISH_REASONS) | set(finished)):
            success.add_metric([reason], finished.get(reason, 0))
        yield success
        rejected = CounterMetricFamily(
            PREFIX + "num_requests_rejected",
            "Requests refused because the waiting queue was full, or dropped after waiting too long.",
            labels=["reason"],
        )
        for reason in sorted(set(REJECT_REASONS) | set(stats.num_requests_rejected_total)):
            rejected.add_metric([reason], stats.num_requests_rejected_total.get(reason, 0))
        yield rejected
        yield from _spec_decode_metrics(stats)


def _spec_decode_metrics(stats: EngineStats) -> Iterator[Metric]:
    """vLLM's speculative decoding counters."""
    counters = {
        "spec_decode_num_drafts": ("Verifications of drafted tokens.", stats.spec_num_drafts_total),
        "spec_decode_num_draft_tokens": ("Drafted tokens verified.", stats.spec_num_draft_tokens_total),
        "spec_decode_num_accepted_tokens": ("Drafted tokens accepted.", stats.spec_num_accepted_tokens_total),
    }
    for name, (documentation, value) in counters.items():
        yield CounterMetricFamily(PREFIX + name, documentation, value=value)
    per_position = CounterMetricFamily(
        PREFIX + "spec_decode_num_accepted_tokens_per_pos",
        "Accepted drafted tokens by their position in the draft (0-based).",
        labels=["position"],
    )
    for position, value in sorted(stats.spec_accepted_tokens_per_position_total.items()):
        per_position.add_metric([str(position)], value)
    yield per_position


class ServerMetrics:
    """The app's registry: the engine collector plus the request latency histograms."""

    def __init__(self, read_stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineStatsCollector(read_stats))
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between successive outputs of a request.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival to finish of a request.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.request_queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Arrival to first scheduling of a request.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def observer(self) -> RequestObserver:
        """A fresh observer for one engine request."""
        return RequestObserver(self)


class RequestObserver:
    """Feeds one engine request's outputs into the histograms as they pass through the API."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._last_token_time: float | None = None

    def observe(self, output: RequestOutput) -> None:
        """Record inter-token latency, and TTFT / queue / e2e latency once the request finishes."""
        timing = output.metrics
        if timing is None:
            return
        if any(seq.token_ids for seq in output.outputs) and timing.last_token_time is not None:
            if self._last_token_time is not None and timing.last_token_time > self._last_token_time:
                self._metrics.inter_token_latency.observe(timing.last_token_time - self._last_token_time)
            self._last_token_time = timing.last_token_time
        if not output.finished:
            return
        if timing.first_token_time is not None:
            self._metrics.time_to_first_token.observe(timing.first_token_time - timing.arrival_time)
        if timing.first_scheduled_time is not None:
            self._metrics.request_queue_time.observe(timing.first_scheduled_time - timing.arrival_time)
        if timing.finished_time is not None:
            self._metrics.e2e_request_latency.observe(timing.finished_time - timing.arrival_time)
