"""Wire fields -> `SamplingParams`, plus the wire-level checks the engine can't make.

The engine is the source of truth for values it knows: `SamplingParams` validates itself and the
engine validates against the model. This module only maps names (a `ParameterError` about
`max_tokens` is re-labelled `max_completion_tokens` when that is what the client sent), refuses
and refuses options we do not support yet. The engine caps `speculation_depth` at the server's
maximum.
"""

from __future__ import annotations

from typing import Any

from helix_server.api.errors import bad_request
from helix_server.api.protocol.sampling import SamplingFields
from helix_server.api.serving.structured import structured_output_spec
from helix_server.errors import ParameterError
from helix_server.sampling_params import MAX_LOGPROBS, SamplingParams

# vLLM's seed range (a torch long): wider seeds would be reduced and collide with seeds in it.
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    renames: dict[str, str] | None = None,
) -> SamplingParams:
    """The `SamplingParams` of a request; a `ParameterError` names the parameter the client sent."""
    check_seed(request.seed)
    for name in ("no_stop_trim", "return_hidden_states"):  # the routers' fields, at their defaults only
        if getattr(request, name):
            raise bad_request(f"{name}: true is not supported; leave it out or false.", name)
    values: dict[str, Any] = {
        "n": request.n,
        "max_tokens": max_tokens,
        "min_tokens": request.min_tokens,
        "stop": _stop_list(request.stop),
        "stop_token_ids": list(request.stop_token_ids or []),
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "ignore_eos": request.ignore_eos,
        "skip_special_tokens": request.skip_special_tokens,
        "seed": request.seed,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "logit_bias": dict(request.logit_bias) if request.logit_bias else None,
        "speculation_depth": request.speculation_depth,
        "structured_output": structured_output_spec(
            getattr(request, "response_format", None), request.structured_outputs
        ),
    }
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
    }
    values.update({name: value for name, value in optional.items() if value is not None})
    try:
        return SamplingParams(**values)
    except ParameterError as exc:
        raise relabel(exc, renames or {}) from None


def relabel(exc: ParameterError, renames: dict[str, str]) -> ParameterError:
    """`exc` with its param renamed to the client's name for it (message mentions included)."""
    if exc.param not in renames:
        return exc
    new = renames[exc.param]
    return ParameterError(exc.message.replace(exc.param, new), new, exc.code)


def check_seed(seed: int | None) -> None:
    """400 naming `seed` for a seed outside vLLM's range [-2**63, 2**63 - 1]."""
    if isinstance(seed, int) and not isinstance(seed, bool) and not SEED_MIN <= seed <= SEED_MAX:
        raise bad_request(f"seed must be between {SEED_MIN} and {SEED_MAX}, got {seed}.", "seed")


def check_prompt_logprobs(request: SamplingFields) -> None:
    """`prompt_logprobs` is 0-20 and not sent in streams (as vLLM): a 400 rather than silently none."""
    value = request.prompt_logprobs
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        message = f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {value}."
        raise bad_request(message, "prompt_logprobs")
    if value is not None and request.stream:
        raise bad_request("prompt_logprobs are not available when stream is true.", "prompt_logprobs")


def continuous_usage(request: SamplingFields) -> bool:
    """Whether every chunk carries the usage so far (`stream_options.continuous_usage_stats`)."""
    return request.stream_options is not None and request.stream_options.continuous_usage_stats


def check_stream_options(request: SamplingFields) -> bool:
    """Whether the stream ends with a usage chunk; `stream_options` without `stream` is a 400."""
    if request.stream_options is None:
        return False
    if not request.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    options = request.stream_options
    if options.continuous_usage_stats and options.include_usage is False:
        raise bad_request(
            "continuous_usage_stats needs include_usage (leave it out or set it to true).",
            "stream_options.continuous_usage_stats",
        )
    return bool(options.include_usage) or options.continuous_usage_stats


def reject(field: str, what: str | None = None) -> None:
    """Raise the 400 for an option we do not support yet."""
    raise bad_request(f"{what or field} is not supported by this server.", field)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
