"""Engine counters and gauges, read by the metrics endpoint and /health (plain ints and floats)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EngineCounters:
    """Running totals the engine thread increments; readers only ever read them."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    # finish reason ("stop", "length", "abort", "error") -> finished sequences
    finished_sequences: Counter = field(default_factory=Counter)
    # Requests refused or dropped, by reason ("queue_full", "queue_timeout").
    rejected: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine: queue sizes, KV pool use, and the running totals."""

    num_requests_running: int
    num_requests_waiting: int
    num_kv_blocks_total: int
    num_kv_blocks_free: int
    kv_cache_usage: float
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_sequences_total: dict[str, int]
    # Prefix caching, in tokens: prompt tokens looked up at first admission, and how many hit.
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    # Requests refused at admission or dropped from the queue, by reason.
    num_requests_rejected_total: dict[str, int] = field(default_factory=dict)
    spec_num_drafts_total: int = 0
    spec_num_draft_tokens_total: int = 0
    spec_num_accepted_tokens_total: int = 0
    spec_accepted_tokens_per_position_total: dict[int, int] = field(default_factory=dict)
