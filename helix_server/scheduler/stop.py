"""Stop decisions on token ids, taken in the scheduler's update: EOS, stop token ids, length.

`check_stop` walks a request's new tokens in order and cuts them at the first that ends the
sequence: an EOS token (unless `ignore_eos`), one of `stop_token_ids`, or the token that brings
the sequence to `num_tokens_limit` (prompt + max_tokens, or the longest sequence the engine holds).
Tokens after it are dropped (a step may yield several with speculative decoding). Stop *strings*
need text, so the engine's output processor checks them and finishes the request itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from helix_server.scheduler.request import Request, RequestStatus


@dataclass(frozen=True)
class StopCheck:
    """The new tokens to keep and, when one of them ends the sequence, why."""

    num_kept: int
    status: RequestStatus | None = None
    # The stop token id that ended it (None for EOS and length).
    stop_reason: int | None = None


def check_stop(request: Request, new_token_ids: list[int], eos_token_ids: frozenset[int]) -> StopCheck:
    """Check `new_token_ids` (not yet appended to `request`) against the request's stop conditions."""
    params = request.sampling_params
    stop_token_ids = params.stop_token_ids if params is not None else ()
    ignore_eos = params is not None and params.ignore_eos
    num_tokens = request.num_tokens
    for i, token_id in enumerate(new_token_ids):
        if token_id in eos_token_ids and not ignore_eos:
            return StopCheck(i + 1, RequestStatus.FINISHED_STOPPED)
        if token_id in stop_token_ids:
            return StopCheck(i + 1, RequestStatus.FINISHED_STOPPED, token_id)
        if request.num_tokens_limit is not None and num_tokens + i + 1 >= request.num_tokens_limit:
            return StopCheck(i + 1, RequestStatus.FINISHED_LENGTH)
    return StopCheck(len(new_token_ids))
