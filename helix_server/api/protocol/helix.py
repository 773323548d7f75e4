"""The original Helix endpoints: `/generate`, `/generate/batch`, `/generate/stream`."""

from __future__ import annotations

from typing import Any

import msgspec

DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0


class GenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One prompt to complete."""

    prompt: str
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    speculation_depth: int | None = None
    # Structured outputs, with the same shapes as on /v1/completions.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None


class BatchGenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Several prompts, completed concurrently with the same settings."""

    prompts: list[str]
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    speculation_depth: int | None = None
    # Structured outputs, with the same shapes as on /v1/completions.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None


class GenerationMetrics(msgspec.Struct):
    """Latency figures of one generation (seconds; `acceptance_rate` is null without speculation)."""

    time_to_first_token: float | None
    tokens_per_second: float | None
    acceptance_rate: float | None = None


class GenerateResponse(msgspec.Struct):
    """The completion, its length in tokens, and its metrics."""

    text: str
    num_tokens: int
    finish_reason: str | None
    metrics: GenerationMetrics


class BatchGenerateResponse(msgspec.Struct):
    """One result per prompt, in order."""

    results: list[GenerateResponse]


class StreamEvent(msgspec.Struct, omit_defaults=True):
    """One SSE event of `/generate/stream`; the last has `is_final: true` and the metrics."""

    token: str
    is_final: bool
    num_tokens: int | None = None
    finish_reason: str | None = None
    metrics: GenerationMetrics | None = None
