"""Wire types shared by several endpoints: the error envelope, usage, stream options, model cards."""

from __future__ import annotations

from typing import Any

import msgspec


class ErrorDetail(msgspec.Struct):
    """OpenAI's error body: a message, a type, the parameter at fault and a machine-readable code."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    """The envelope every error leaves in: `{"error": {...}}`."""

    error: ErrorDetail


class PromptTokensDetails(msgspec.Struct):
    """`usage.prompt_tokens_details`: prompt tokens whose KV came from the prefix cache."""

    cached_tokens: int = 0


class UsageInfo(msgspec.Struct):
    """Token counts of one request (prompts counted once, completions summed over all choices)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    """`stream_options`: `include_usage` adds a last chunk with `choices: []` and `usage`; vLLM's
    `continuous_usage_stats` also puts the usage so far on every chunk (and implies `include_usage`
    when that is left out, as vLLM's default is true)."""

    include_usage: bool | None = None
    continuous_usage_stats: bool = False
    # OpenAI's obfuscation padding; it changes nothing here.
    include_obfuscation: bool | None = None


class PromptLogprob(msgspec.Struct):
    """vLLM's `Logprob` of one token at one prompt position (`prompt_logprobs` entries)."""

    logprob: float
    rank: int | None
    decoded_token: str | None


# vLLM's prompt logprobs: per prompt position, null for the first token, else token id -> logprob
# (the prompt token itself plus the `prompt_logprobs` most likely ones).
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class ModelCard(msgspec.Struct):
    """One entry of `GET /v1/models`."""

    id: str
    created: int
    object: str = "model"
    owned_by: str = "helix"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    """The body of `GET /v1/models`."""

    data: list[ModelCard]
    object: str = "list"


def to_builtins(value: Any) -> Any:
    """Structs to plain JSON-able Python values (for Litestar responses and SSE payloads)."""
    return msgspec.to_builtins(value)
