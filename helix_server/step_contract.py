"""The step contract: what the scheduler asks of the runner, and what the runner gives back.

`SchedulerOutput` (who runs this step, with how many tokens) goes from the pure-Python side to the
torch side; `ModelRunnerOutput` (the tokens each request got, their logprobs, drafts verified) comes
back. Both are plain data (ints, floats, lists): the engine and scheduler never touch tensors, and
the runner never touches queues. The module belongs to neither side (both import it; it imports
neither), so the scheduler and runner packages stay independent of each other.

`ScheduledRequest.request` is the scheduler's `Request`; the runner only reads it (its tokens,
sampling params and drafts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helix_server.scheduler.request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens starting at `start_position`.

    `block_ids` is the request's whole block table after this step's allocation (lookahead slots
    for the proposer included). `samples` is True when the chunk reaches the last known token, so
    the step yields new tokens: one, plus any accepted drafts.
    """

    request: Request
    start_position: int
    num_new_tokens: int
    block_ids: list[int]
    # The last `num_spec_tokens` of the new tokens are drafts to verify (speculative decoding).
    num_spec_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """The token ids whose K/V this step computes."""
        return self.request.token_ids_between(self.start_position, self.start_position + self.num_new_tokens)

    @property
    def samples(self) -> bool:
        return self.start_position + self.num_new_tokens - self.num_spec_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """Everything that runs in one step, in batch order, plus bookkeeping the runner needs."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests that stopped being tracked since the previous step (finished, aborted): the runner
    # drops any per-request state it keeps (seeded generators).
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests the scheduler itself finished as FINISHED_LENGTH this step: even with every other
    # block released they do not fit in the KV pool. Also listed in `finished_request_ids`.
    length_capped_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprob:
    """The log-probability of one chosen token and, optionally, the most likely alternatives.

    `top` holds (token_id, logprob) pairs, most likely first; `rank` is the chosen token's 1-based
    rank in the distribution (1 = most likely).
    """

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """Per request id: the tokens this step appended (empty for a partial prefill chunk; with
    speculative decoding, the accepted drafts plus one).

    `logprobs[request_id]` is parallel to `sampled_token_ids[request_id]` when the request asked for
    logprobs. `prompt_logprobs[request_id]` covers the prompt positions computed this step (the first
    prompt token has none and appears as None).
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob | None]] = field(default_factory=dict)
    # Speculative decoding: drafts verified this step per request (their accepted count is
    # len(sampled_token_ids[request_id]) - 1).
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
