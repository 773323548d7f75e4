"""Admission control: how much work may wait to be scheduled, and for how long.

`QueuedRequests` is the engine's record of requests added but not yet scheduled (a request leaves
it when the first of its sequences is scheduled, or when it finishes). `check_admission` is the
bound a new request must pass before it is queued (`max_queued_requests` sequences, a request with
`n` counting n, and `max_queued_tokens` prompt tokens); past it the request is refused with
`EngineOverloadedError`, before any byte of a response is sent. A request is always admitted when
nothing waits, so no single request is refused forever; `check_request_size` keeps that from letting
one request flood the queue: a request whose sequences (prompts x n) could never fit in the queue
plus the running batch, or with more than `max_prompts_per_request` prompts, is a 400.
"""

from __future__ import annotations

from helix_server.config import SchedulerConfig
from helix_server.errors import EngineOverloadedError, ParameterError

# Seconds a refused client is asked to wait before retrying.
RETRY_AFTER_SECONDS = 1


class QueuedRequests:
    """Requests not yet scheduled, in arrival order, with their sequence and prompt-token counts.

    Written by the engine thread only; `num_sequences` and `num_prompt_tokens` are plain ints that
    other threads may read at any time.
    """

    def __init__(self) -> None:
        # request id -> (arrival time, sequences, prompt tokens); dicts keep insertion order.
        self._queued: dict[str, tuple[float, int, int]] = {}
        self.num_sequences = 0
        self.num_prompt_tokens = 0

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._queued

    def add(self, request_id: str, arrival_time: float, num_sequences: int, num_prompt_tokens: int) -> None:
        self._queued[request_id] = (arrival_time, num_sequences, num_prompt_tokens)
        self.num_sequences += num_sequences
        self.num_prompt_tokens += num_prompt_tokens

    def discard(self, request_id: str) -> None:
        """The request was scheduled or finished (a no-op if it already left)."""
        entry = self._queued.pop(request_id, None)
        if entry is not None:
            self.num_sequences -= entry[1]
            self.num_prompt_tokens -= entry[2]

    def arrived_before(self, deadline: float) -> list[str]:
        """Ids of the queued requests that arrived before `deadline` (time.monotonic)."""
        return [request_id for request_id, entry in self._queued.items() if entry[0] < deadline]


def check_admission(
    limits: SchedulerConfig,
    queued_sequences: int,
    queued_prompt_tokens: int,
    num_sequences: int,
    num_prompt_tokens: int,
) -> None:
    """Raise `EngineOverloadedError` ("queue_full") if queuing this request would pass a bound."""
    if queued_sequences <= 0:
        return
    max_requests = limits.max_queued_requests
    if max_requests is not None and queued_sequences + num_sequences > max_requests:
        raise EngineOverloadedError(
            f"The server is overloaded: {queued_sequences} requests are waiting (at most {max_requests}); "
            "retry later.",
            "queue_full",
            RETRY_AFTER_SECONDS,
        )
    max_tokens = limits.max_queued_tokens
    if max_tokens is not None and queued_prompt_tokens + num_prompt_tokens > max_tokens:
        raise EngineOverloadedError(
            f"The server is overloaded: {queued_prompt_tokens} prompt tokens are waiting (at most "
            f"{max_tokens}); retry later.",
            "queue_full",
            RETRY_AFTER_SECONDS,
        )


def check_request_size(
    limits: SchedulerConfig, num_prompts: int, n: int, prompt_param: str = "prompt"
) -> None:
    """Raise `ParameterError` if one request asks for more than the engine could ever queue.

    A request has `num_prompts` prompts of `n` sequences each; past `max_prompts_per_request` prompts
    it names the prompt; past `max_queued_requests + max_num_seqs` sequences (all of the queue and
    the running batch) it names `n` when n > 1, else the prompt.
    """
    max_prompts = limits.max_prompts_per_request
    if num_prompts > max_prompts:
        raise ParameterError(
            f"A request may have at most {max_prompts} prompts, got {num_prompts}; send them in "
            "several requests.",
            prompt_param,
        )
    if limits.max_queued_requests is None:
        return
    max_sequences = limits.max_queued_requests + limits.max_num_seqs
    num_sequences = num_prompts * n
    if num_sequences > max_sequences:
        param = "n" if n > 1 else prompt_param
        raise ParameterError(
            f"This request asks for {num_sequences} sequences ({num_prompts} prompts x n={n}), more than "
            f"this server can ever queue and run at once ({max_sequences}); reduce the number of prompts "
            "or n.",
            param,
        )
