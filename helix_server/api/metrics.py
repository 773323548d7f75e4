"""Prometheus metrics with vLLM's names, from a registry the app owns.

`--metrics-name-prefix` picks the prefix: `helix` (the default: `helix:num_requests_running`, ...),
`vllm` (`vllm:num_requests_running{model_name="..."}`, ..., what vLLM's routers, gateways' endpoint
pickers and autoscalers read), or `both` (every metric twice, once per prefix, so dashboards on either
name work during a migration). The `vllm:` series carry vLLM's `model_name` label; the `helix:`
series keep no labels, as before.

Gauges and counters are read from `engine.stats()` at scrape time (a custom collector); the latency
histograms are observed by the API from each request's `RequestOutput.metrics` timestamps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from helix_server.engine.outputs import RequestOutput
from helix_server.engine.stats import EngineStats

PREFIX = "helix:"
_PREFIXES = {"helix": ("helix:",), "vllm": ("vllm:",), "both": ("helix:", "vllm:")}
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("queue_full", "queue_timeout")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0)


@dataclass(frozen=True)
class MetricsLabels:
    """What the metrics say about the deployment: the served model and the KV cache's layout."""

    model_name: str = ""
    block_size: int = 16
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class _Naming:
    """One prefix's names and labels: `helix:` unlabelled, `vllm:` with vLLM's `model_name`."""

    prefix: str
    label_names: tuple[str, ...]
    label_values: tuple[str, ...]

    @classmethod
    def of(cls, prefix: str, model_name: str) -> _Naming:
        if prefix == "vllm:":
            return cls(prefix, ("model_name",), (model_name,))
        return cls(prefix, (), ())


class EngineStatsCollector(Collector):
    """Reads `EngineStats` at scrape time and exposes it as gauges and counters under each prefix."""

    def __init__(
        self,
        read_stats: Callable[[], EngineStats],
        prefixes: tuple[str, ...] = (PREFIX,),
        labels: MetricsLabels | None = None,
    ) -> None:
        self._read_stats = read_stats
        self._labels = labels or MetricsLabels()
        self._namings = tuple(_Naming.of(prefix, self._labels.model_name) for prefix in prefixes)

    def collect(self) -> Iterator[Metric]:
        """One metric family per engine stat and prefix, read now."""
        stats = self._read_stats()
        for naming in self._namings:
            yield from self._collect(stats, naming)

    def _collect(self, stats: EngineStats, naming: _Naming) -> Iterator[Metric]:
        prefix, names, values = naming.prefix, list(naming.label_names), list(naming.label_values)

        def family(kind, name: str, documentation: str, value: float) -> Metric:
            metric = kind(prefix + name, documentation, labels=names)
            metric.add_metric(values, value)
            return metric

        def by_label(kind, name: str, documentation: str, label: str, counts: dict) -> Metric:
            metric = kind(prefix + name, documentation, labels=[*names, label])
            for key, count in counts.items():
                metric.add_metric([*values, str(key)], count)
            return metric

        gauges = {
            "num_requests_running": ("Sequences in the running batch.", stats.num_requests_running),
            "num_requests_waiting": ("Sequences waiting to be scheduled.", stats.num_requests_waiting),
            "kv_cache_usage_perc": ("Fraction of KV cache blocks in use (0-1).", stats.kv_cache_usage),
            "num_kv_blocks_total": ("KV cache blocks in the pool.", stats.num_kv_blocks_total),
            "num_kv_blocks_free": ("KV cache blocks free.", stats.num_kv_blocks_free),
        }
        for name, (documentation, value) in gauges.items():
            yield family(GaugeMetricFamily, name, documentation, value)
        info = GaugeMetricFamily(
            prefix + "cache_config_info",
            "Information of the KV cache config (value 1; the config is in the labels).",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )
        info.add_metric(
            [str(self._labels.block_size), str(stats.num_kv_blocks_total), str(self._labels.enable_prefix_caching)],
            1,
        )
        yield info
        counters = {
            "prompt_tokens": ("Prompt tokens received.", stats.prompt_tokens_total),
            "generation_tokens": ("Tokens generated.", stats.generation_tokens_total),
            "num_preemptions": ("Sequences preempted (recomputed later).", stats.num_preemptions_total),
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache (first admission of each sequence).",
                stats.prefix_cache_queries_total,
            ),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", stats.prefix_cache_hits_total),
            "spec_decode_num_drafts": ("Verifications of drafted tokens.", stats.spec_num_drafts_total),
            "spec_decode_num_draft_tokens": ("Drafted tokens verified.", stats.spec_num_draft_tokens_total),
            "spec_decode_num_accepted_tokens": ("Drafted tokens accepted.", stats.spec_num_accepted_tokens_total),
        }
        for name, (documentation, value) in counters.items():
            yield family(CounterMetricFamily, name, documentation, value)
        finished = stats.finished_sequences_total
        yield by_label(
            CounterMetricFamily, "request_success", "Finished sequences by finish reason.", "finished_reason",
            {reason: finished.get(reason, 0) for reason in sorted(set(FINISH_REASONS) | set(finished))},
        )
        rejected = stats.num_requests_rejected_total
        yield by_label(
            CounterMetricFamily, "num_requests_rejected",
            "Requests refused because the waiting queue was full, or dropped after waiting too long.", "reason",
            {reason: rejected.get(reason, 0) for reason in sorted(set(REJECT_REASONS) | set(rejected))},
        )
        yield by_label(
            CounterMetricFamily, "spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by their position in the draft (0-based).", "position",
            dict(sorted(stats.spec_accepted_tokens_per_position_total.items())),
        )


class _Histograms:
    """One prefix's request histograms (vLLM's names), bound to its label values."""

    def __init__(self, registry: CollectorRegistry, naming: _Naming) -> None:
        def histogram(name: str, documentation: str, buckets: tuple[float, ...]):
            metric = Histogram(
                naming.prefix + name, documentation, labelnames=naming.label_names, buckets=buckets,
                registry=registry,
            )
            return metric.labels(*naming.label_values) if naming.label_names else metric

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between successive outputs of a request.", _ITL_BUCKETS
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Per request: (finish - first token) / (generated tokens - 1).",
            _ITL_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to finish of a request.", _E2E_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduling of a request.", _E2E_BUCKETS
        )


class ServerMetrics:
    """The app's registry: the engine collector plus the request latency histograms, per prefix."""

    def __init__(
        self,
        read_stats: Callable[[], EngineStats],
        *,
        name_prefix: str = "helix",
        labels: MetricsLabels | None = None,
    ) -> None:
        labels = labels or MetricsLabels()
        prefixes = _PREFIXES[name_prefix]
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineStatsCollector(read_stats, prefixes, labels))
        self.histograms = [_Histograms(self.registry, _Naming.of(p, labels.model_name)) for p in prefixes]

    @property
    def e2e_request_latency(self):
        """The first prefix's end-to-end latency histogram."""
        return self.histograms[0].e2e_request_latency

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def observer(self) -> RequestObserver:
        """A fresh observer for one engine request."""
        return RequestObserver(self.histograms)


class RequestObserver:
    """Feeds one engine request's outputs into the histograms as they pass through the API."""

    def __init__(self, histograms: list[_Histograms]) -> None:
        self._histograms = histograms
        self._last_token_time: float | None = None
        self._num_tokens: dict[int, int] = {}

    def observe(self, output: RequestOutput) -> None:
        """Record inter-token latency, and TTFT / TPOT / queue / e2e latency once the request finishes."""
        timing = output.metrics
        if timing is None:
            return
        for seq in output.outputs:  # token_ids are new since the previous output
            self._num_tokens[seq.index] = self._num_tokens.get(seq.index, 0) + len(seq.token_ids)
        if any(seq.token_ids for seq in output.outputs) and timing.last_token_time is not None:
            if self._last_token_time is not None and timing.last_token_time > self._last_token_time:
                self._each("inter_token_latency", timing.last_token_time - self._last_token_time)
            self._last_token_time = timing.last_token_time
        if not output.finished:
            return
        if timing.first_token_time is not None:
            self._each("time_to_first_token", timing.first_token_time - timing.arrival_time)
            num_tokens = max(self._num_tokens.values(), default=0)
            if timing.finished_time is not None and num_tokens > 1:
                tpot = (timing.finished_time - timing.first_token_time) / (num_tokens - 1)
                self._each("time_per_output_token", tpot)
        if timing.first_scheduled_time is not None:
            self._each("request_queue_time", timing.first_scheduled_time - timing.arrival_time)
        if timing.finished_time is not None:
            self._each("e2e_request_latency", timing.finished_time - timing.arrival_time)

    def _each(self, name: str, value: float) -> None:
        for histograms in self._histograms:
            getattr(histograms, name).observe(value)
