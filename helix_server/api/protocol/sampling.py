"""The request fields the completions and chat APIs share: sampling, stopping, streaming, model."""

from __future__ import annotations

from typing import Any

import msgspec

from helix_server.api.protocol.common import StreamOptions


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's sampling parameters plus vLLM's extensions (`top_k`, `min_p`, ...).

    A field left out (or null) takes the engine's default. `speculation_depth` (drafted tokens per
    step for this request, 0 = no speculation) is capped by the server's maximum.
    """

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    # OpenAI fields that change nothing in the output: accepted and ignored.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    # vLLM-style extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    speculation_depth: int | None = None
    # Prefix caching: only requests with the same salt share cached KV blocks (vLLM's extension).
    cache_salt: str | None = None
    # vLLM's outputs: logprobs of the prompt's tokens (0-20 alternatives, not with `stream`), and
    # the token ids of the prompt and of each choice.
    prompt_logprobs: int | None = None
    return_token_ids: bool | None = None
    # Structured outputs (vLLM's extension): one of json, regex, choice, grammar, json_object.
    structured_outputs: dict[str, Any] | None = None
    # SGLang's fields, which its router and vLLM's production-stack router add to every request they
    # forward: accepted at their defaults (what helix does anyway), refused otherwise.
    no_stop_trim: bool = False
    return_hidden_states: bool = False
