"""The scheduler's view of one sequence being generated.

A `Request` here is one *sequence*: a prompt plus the tokens generated for it so far. An API request
with `n` > 1 becomes n `Request`s: the first (the leader) prefills the prompt, the others (followers)
wait until the leader's prompt KV is computed and then fork its full prompt blocks (see
`Scheduler.update_from_output`). Pure Python: no torch.
"""

from __future__ import annotations

import enum
import time
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    """One sequence: prompt, generated tokens, and how much of it has KV in the cache.

    The one rule the scheduler lives by: a request has `num_tokens` known tokens, of which the first
    `num_computed_tokens` have their K/V in the paged cache; each step it may be given up to
    `num_tokens - num_computed_tokens` more. When a step computes the last known token, the model
    samples the next one.

    `sampling_params` is opaque to the scheduler (the runner and engine read it).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any = None,
        arrival_time: float | None = None,
        parent_id: str | None = None,
        index: int = 0,
        fork_parent: Request | None = None,
        cache_salt: str | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        # A follower of an n > 1 request waits for this leader's prompt KV, then shares its blocks.
        self.fork_parent = fork_parent
        self.first_scheduled_time: float | None = None
        # Speculative decoding: tokens drafted for the next step (not output yet; verified by the
        # model in that step), and how many KV slots past the scheduled tokens to reserve so the
        # proposer can write its drafts' K/V (the most it may draft per step).
        self.spec_token_ids: list[int] = []
        self.num_lookahead_tokens = 0
        # The bound on this sequence's `num_tokens` (prompt + output): prompt + max_tokens, capped at
        # the engine's `seq_num_tokens_limit`; reaching it is the length stop, and no slot past it is
        # ever reserved. None means unbounded.
        self.num_tokens_limit: int | None = None
        # Prefix caching: a salt that only requests bringing the same one can share blocks under
        # (it enters the first block's hash), and how many prompt tokens the first admission found
        # cached (-1 until then).
        self.cache_salt = cache_salt
        self.num_cached_tokens = -1
        # Set when every prompt position must be computed (prompt logprobs): no cache hits taken.
        self.skip_reading_prefix_cache = False
        # The stop token id that finished it (`stop.check_stop`); None otherwise.
        self.stop_reason: int | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt plus generated."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        """Known tokens plus the drafts waiting to be verified."""
        return self.num_tokens + len(self.spec_token_ids)

    @property
    def cache_extra_keys(self) -> tuple | None:
        """What besides token ids goes into the first block's hash."""
        return None if self.cache_salt is None else (self.cache_salt,)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output + drafts."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        tokens = self.output_token_ids + self.spec_token_ids if self.spec_token_ids else self.output_token_ids
        if start >= num_prompt:
            return tokens[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + tokens[: end - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def waiting_for_fork(self) -> bool:
        return self.fork_parent is not None

    def lookahead_slots(self, start: int, num_new_tokens: int) -> int:
        """KV slots to reserve past a step's tokens (from position `start`) for the proposer's
        drafts: none unless the step reaches the end of the known tokens (a sampling step), and
        never past `num_tokens_limit`."""
        if not self.num_lookahead_tokens:
            return 0
        end = start + num_new_tokens
        if end < self.num_tokens:
            return 0
        if self.num_tokens_limit is None:
            return self.num_lookahead_tokens
        return max(0, min(self.num_lookahead_tokens, self.num_tokens_limit - end))

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
