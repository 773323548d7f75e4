"""`SchedulerOutput`: the scheduler's decision for one step, the contract with the runner.

Plain data, no torch. The runner turns it into tensors; the engine hands it back to the scheduler
together with the runner's `ModelRunnerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
