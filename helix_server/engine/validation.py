"""Checks a request must pass where it enters the engine (the API layer checks the wire format first).

Everything here needs the model or the pool (vocabulary size, context length); the model-free checks
live in `SamplingParams` itself.
"""

from __future__ import annotations

from helix_server.errors import ParameterError
from helix_server.sampling_params import SamplingParams


def validate_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    seq_num_tokens_limit: int,
    max_n: int,
    prompt_param: str = "prompt",
) -> None:
    """Raise `ParameterError` naming the parameter if this request can't run on this engine.

    `seq_num_tokens_limit` is the most tokens (prompt + completion) a sequence may reach on this
    engine: the model's context length, or the KV pool if that is smaller.
    """
    if not prompt_token_ids:
        raise ParameterError("The prompt is empty (it has no tokens).", prompt_param)
    if params.n > max_n:
        raise ParameterError(f"n must be at most {max_n}, got {params.n}.", "n")
    num_prompt = len(prompt_token_ids)
    requested = num_prompt + (params.max_tokens or 0)
    if num_prompt >= seq_num_tokens_limit or requested > seq_num_tokens_limit:
        completion = f", {params.max_tokens} in the completion" if params.max_tokens else ""
        raise ParameterError(
            f"This model's maximum context length is {seq_num_tokens_limit} tokens. However, you requested "
            f"{max(requested, num_prompt)} tokens ({num_prompt} in the prompt{completion}). Please reduce "
            "the length of the prompt or the completion.",
            prompt_param,
            code="context_length_exceeded",
        )
    # After the length check: an over-long prompt is refused without a pass over its ids.
    for token_id in prompt_token_ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ParameterError(
                f"The prompt contains token id {token_id!r}, outside the vocabulary [0, {vocab_size}).",
                prompt_param,
            )
    if params.min_tokens and num_prompt + params.min_tokens > seq_num_tokens_limit:
        raise ParameterError(
            f"min_tokens ({params.min_tokens}) does not fit in the context after the prompt.", "min_tokens"
        )
    for token_id in params.logit_bias or {}:
        if token_id >= vocab_size:
            raise ParameterError(
                f"logit_bias has token id {token_id}, outside the vocabulary [0, {vocab_size}).", "logit_bias"
            )
    for token_id in params.stop_token_ids:
        if token_id >= vocab_size:
            raise ParameterError(
                f"stop_token_ids has token id {token_id}, outside the vocabulary [0, {vocab_size}).",
                "stop_token_ids",
            )
