"""`InputProcessor` (vLLM's name): the engine's one front door for a request's inputs.

Every request passes it exactly once, before it is queued, whichever front it comes through:
`AsyncEngine.add_requests` runs it on the event loop (so bad input fails before any response byte,
and every prompt of an API request is checked before any is queued), `LLM` and
`EngineCore.add_request` run it for synchronous callers. It returns an `EngineCoreRequest`, which
`EngineCore.add_core_request` trusts and does not check again. The checks need only values the
engine fixes at start-up (vocabulary size, the longest sequence, `max_n`), so the processor is safe
to use from any thread.

Request ids are checked by `check_request_id`, once, by the front that registers them (the async
front's streams, or the core's own requests for a synchronous caller): an id is refused when it, or
one of its sequences' ids, is already in use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from helix_server.engine.validation import validate_request
from helix_server.errors import ParameterError
from helix_server.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineCoreRequest:
    """A validated request, ready for `EngineCore.add_core_request` (built by `InputProcessor`)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    cache_salt: str | None = None


def sequence_ids(request_id: str, n: int) -> list[str]:
    """The scheduler's ids of a request's `n` sequences: the request id itself when n == 1, else
    `request_id#index`."""
    return [request_id] if n == 1 else [f"{request_id}#{index}" for index in range(n)]


class InputProcessor:
    """Validates requests against the model and the KV pool (see the module docstring)."""

    def __init__(self, vocab_size: int, seq_num_tokens_limit: int, max_n: int) -> None:
        self.vocab_size = vocab_size
        # The longest sequence (prompt + completion) a request may reach.
        self.seq_num_tokens_limit = seq_num_tokens_limit
        self.max_n = max_n

    def process(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        prompt_param: str = "prompt",
    ) -> EngineCoreRequest:
        """Raise `ParameterError` naming the parameter (`prompt_param` for the prompt) if the request
        can't run on this engine; else the request, ready to queue."""
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ParameterError("cache_salt must be a non-empty string.", "cache_salt")
        validate_request(
            prompt_token_ids,
            params,
            vocab_size=self.vocab_size,
            seq_num_tokens_limit=self.seq_num_tokens_limit,
            max_n=self.max_n,
            prompt_param=prompt_param,
        )
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        return EngineCoreRequest(request_id, list(prompt_token_ids), params, arrival_time, cache_salt)


def check_request_id(request_id: str, n: int, num_sequences_of: Callable[[str], int | None]) -> None:
    """Raise `ParameterError` if `request_id` is in use, or one of its `n` sequence ids is a live
    sequence's id.

    `num_sequences_of(id)` is the `n` of the live request with that id, or None if there is none.
    """
    if num_sequences_of(request_id) is not None:
        raise ParameterError(f"Request id {request_id!r} is already in use.", "request_id")
    if any(_is_live_sequence(seq_id, num_sequences_of) for seq_id in sequence_ids(request_id, n)):
        raise ParameterError(f"Request id {request_id!r} clashes with a running request.", "request_id")


def _is_live_sequence(seq_id: str, num_sequences_of: Callable[[str], int | None]) -> bool:
    """Whether `seq_id` is one of `sequence_ids(parent, n)` of a live request."""
    if num_sequences_of(seq_id) == 1:
        return True
    parent, sep, index = seq_id.rpartition("#")
    if not (sep and index.isdigit() and f"{parent}#{int(index)}" == seq_id):
        return False
    live_n = num_sequences_of(parent)
    return live_n is not None and live_n > 1 and int(index) < live_n
