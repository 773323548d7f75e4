"""`Speculator`: everything speculative decoding needs, in one object the model runner owns.

It holds the proposer (n-gram, draft model or layer-skip), the depth policy and what feeds it (step
timings, acceptance), the verifier (rejection sampling against the processed target distribution)
and the speculation counters. The runner calls `verify` for requests with drafts, `observe_step`
after every step, `propose` after the scheduler's update, and `release` for requests that left;
through the runner, the engine only reports each step's duration, asks for drafts, and asks how
many lookahead tokens a request may use.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from helix_server.sample.generators import RequestGenerators
from helix_server.sample.sampler import Sampler
from helix_server.spec_decode.acceptance_monitor import AcceptanceMonitor
from helix_server.spec_decode.depth_policy import DepthPolicy
from helix_server.spec_decode.draft_chooser import DraftBitmask, SampledDraftChooser
from helix_server.spec_decode.proposer import Proposal, ProposalRequest, Proposer
from helix_server.spec_decode.verifier import DraftVerifier, VerifiedTokens
from helix_server.step_contract import ModelRunnerOutput, ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from helix_server.scheduler.request import Request


@dataclass
class SpecCounters:
    """Running totals: verifications that had drafts, drafts verified, drafts accepted, and accepted
    drafts by their position in the draft (0-based)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: Counter = field(default_factory=Counter)


class Speculator:
    """Proposes drafts, verifies them, and chooses how many to draft per request and step."""

    def __init__(
        self,
        proposer: Proposer,
        sampler: Sampler,
        generators: RequestGenerators,
        depth_policy: DepthPolicy,
        acceptance_monitor: AcceptanceMonitor | None = None,
    ) -> None:
        self.proposer = proposer
        self.sampler = sampler
        self.generators = generators
        self.verifier = DraftVerifier(sampler, generators)
        self.depth_policy = depth_policy
        self.acceptance_monitor = acceptance_monitor
        self.counters = SpecCounters()
        # Seconds the last drafting took: part of the cost of the step that verifies its drafts.
        self._last_propose_seconds = 0.0

    @property
    def num_speculative_tokens(self) -> int:
        """The most drafts per request and step (`--num-speculative-tokens`, or auto's maximum)."""
        return self.depth_policy.num_speculative_tokens

    def num_lookahead_tokens(self, requested: int | None) -> int:
        """The most drafts per step for a request: the server's maximum, or less if it asks."""
        return self.num_speculative_tokens if requested is None else min(requested, self.num_speculative_tokens)

    def release(self, finished_request_ids: Iterable[str], preempted_request_ids: Iterable[str]) -> None:
        """Drop the drafts and drafter state of requests that left or were preempted; a finished
        request's acceptance history goes too."""
        finished = list(finished_request_ids)
        gone = finished + list(preempted_request_ids)
        self.verifier.forget(gone)
        self.proposer.forget(gone)
        for request_id in finished:
            self.depth_policy.forget(request_id)

    def verify(
        self,
        scheduled: list[ScheduledRequest],
        logits: list[torch.Tensor],  # per request [s + 1, V]
        token_bitmasks: dict[str, torch.Tensor] | None = None,  # per constrained request [s + 1, W]
    ) -> list[VerifiedTokens]:
        """Accepted drafts plus one token per request (see `DraftVerifier.verify`)."""
        return self.verifier.verify(scheduled, logits, token_bitmasks)

    # ------------------------------------------------------------------ measurements

    def observe_step(self, scheduler_output: SchedulerOutput, output: ModelRunnerOutput, seconds: float) -> None:
        """Feed the depth policy and the counters with a step the runner just executed (called before
        the scheduler's update, while `ScheduledRequest.samples` still describes this step)."""
        policy = self.depth_policy
        policy.observe_step(scheduler_output.total_num_scheduled_tokens, seconds)
        sampling = [s for s in scheduler_output.scheduled if s.samples]
        if sampling and len(sampling) == len(scheduler_output.scheduled):  # decode-only steps compare
            policy.observe_outcome(
                num_requests=len(sampling),
                num_drafting=sum(1 for s in sampling if s.num_spec_tokens),
                num_tokens=sum(len(output.sampled_token_ids.get(s.request_id, ())) for s in sampling),
                seconds=seconds + self._last_propose_seconds,
            )
        self._last_propose_seconds = 0.0
        counters = self.counters
        for request_id, num_drafts in output.num_draft_tokens.items():
            num_accepted = len(output.sampled_token_ids.get(request_id, ())) - 1
            counters.num_drafts += 1
            counters.num_draft_tokens += num_drafts
            counters.num_accepted_tokens += num_accepted
            for position in range(num_accepted):
                counters.accepted_per_position[position] += 1
            policy.observe_verification(request_id, num_drafts, num_accepted)
            if self.acceptance_monitor is not None:
                self.acceptance_monitor.observe(num_drafts, num_accepted)

    # ------------------------------------------------------------------ proposal

    def backlogs(self, requests: list[Request]) -> dict[str, int]:
        """Per request, the tokens the proposer would catch up on before drafting for it."""
        return {r.request_id: self.proposer.backlog(r.request_id, r.num_computed_tokens, r.num_tokens) for r in requests}

    def propose(
        self,
        requests: list[Request],
        num_running: int,
        block_ids_of: Callable[[str], list[int]],
        draft_bitmask: DraftBitmask | None = None,
    ) -> list[tuple[Request, list[int]]]:
        """Draft the next step's tokens for requests that just got new ones: the depth policy picks
        each request's depth (within its lookahead and the room it has left), the proposer drafts.
        Returns (request, drafts) for each request drafted for."""
        limits, remaining = {}, {}
        for request in requests:
            # Leave room for the token the verification adds after the accepted drafts.
            room = request.num_tokens_limit - request.num_tokens - 1
            limit = min(request.num_lookahead_tokens, room)
            if limit > 0:
                limits[request.request_id] = limit
                remaining[request.request_id] = room + 1
        if not limits:
            return []
        backlogs = self.backlogs([r for r in requests if r.request_id in limits])
        num_spec_tokens = self.depth_policy.num_spec_tokens(
            limits, num_batch_tokens=num_running, backlogs=backlogs, remaining=remaining
        )
        if not num_spec_tokens:
            return []
        candidates = [r for r in requests if r.request_id in num_spec_tokens]
        block_ids = {r.request_id: block_ids_of(r.request_id) for r in candidates}
        started = time.perf_counter()
        proposal = self._draft(candidates, num_spec_tokens, block_ids, draft_bitmask)
        self._last_propose_seconds = time.perf_counter() - started
        # A drafter catching up on whole prompts says nothing about the cost of drafting itself,
        # but it measures the cost of catching up.
        if proposal.num_catch_up_tokens <= 2 * len(candidates):
            self.depth_policy.observe_proposal(max(num_spec_tokens.values()), self._last_propose_seconds)
        else:
            self.depth_policy.observe_catch_up(proposal.num_catch_up_tokens, self._last_propose_seconds)
        return list(zip(candidates, proposal.token_ids))

    def _draft(
        self,
        requests: list[Request],
        num_spec_tokens: dict[str, int],
        block_ids: dict[str, list[int]],
        draft_bitmask: DraftBitmask | None,
    ) -> Proposal:
        """Draft up to `num_spec_tokens[request_id]` tokens for each request that drafts; keeps q for
        the next verification. `Proposal.token_ids` follows the order of those requests in `requests`."""
        by_id = {r.request_id: r for r in requests}
        proposal_requests = [
            ProposalRequest(
                r.request_id, r.all_token_ids, r.num_computed_tokens, block_ids[r.request_id], num_spec_tokens[r.request_id]
            )
            for r in requests
            if num_spec_tokens.get(r.request_id, 0) > 0
        ]
        if not proposal_requests:
            return Proposal(token_ids=[])
        chooser = SampledDraftChooser(
            self.sampler, [by_id[r.request_id] for r in proposal_requests], self.generators, draft_bitmask
        )
        proposal: Proposal = self.proposer.propose(proposal_requests, chooser)
        for r, (request, tokens) in enumerate(zip(proposal_requests, proposal.token_ids)):
            probs = proposal.probs[r, : len(tokens)] if proposal.probs is not None and tokens else None
            self.verifier.store_draft_probs(request.request_id, probs)
        return proposal
