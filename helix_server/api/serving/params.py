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
from helix_server.errors import ParameterError
from helix_server.sampling_params import SamplingParams


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    renames: dict[str, str] | None = None,
) -> SamplingParams:
    """The `SamplingParams` of a request; a `ParameterError` names the parameter the client sent."""
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


def check_stream_options(request: SamplingFields) -> bool:
    """Whether the stream ends with a usage chunk; `stream_options` without `stream` is a 400."""
    if request.stream_options is None:
        return False
    if not request.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    return request.stream_options.include_usage


def reject(field: str, what: str | None = None) -> None:
    """Raise the 400 for an option we do not support yet."""
    raise bad_request(f"{what or field} is not supported by this server.", field)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
