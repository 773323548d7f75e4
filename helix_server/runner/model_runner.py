"""Turn a `SchedulerOutput` into tensors, run the model over the paged KV cache, and sample.

The runner owns the KV cache tensors and the per-request sampling state that must outlive a step
(seeded generators, the q of pending drafts). It never sees HTTP or request queues; what it returns
is plain Python (`ModelRunnerOutput`).
"""

from __future__ import annotations

import numpy as np
import torch

from helix_server.layers.attention.builder import SequenceChunk, build_forward_context, order_for_attention
from helix_server.runner.generators import RequestGenerators
from helix_server.runner.output import ModelRunnerOutput, TokenLogprob
from helix_server.runner.sampler import Sampler, SamplingRow
from helix_server.runner.spec_decode import DraftBitmask, SpecDecoder
from helix_server.scheduler.output import ScheduledRequest, SchedulerOutput
from helix_server.scheduler.request import Request
from helix_server.spec.proposer import Proposal, ProposalRequest, Proposer


class ModelRunner:
    """Executes one scheduler step: one forward over every scheduled token, then sampling (or, for
    requests with drafts, verification), and proposes drafts for the next step when asked.

    `kv_caches` holds per layer a (key_cache, value_cache) pair shaped
    [num_blocks, block_size, kv_heads, head_dim].
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        sampler: Sampler,
        device: torch.device,
        proposer: Proposer | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = device
        self.generators = RequestGenerators(device)
        self.spec = None if proposer is None else SpecDecoder(proposer, sampler, self.generators)

    def release_finished(self, scheduler_output: SchedulerOutput) -> None:
        """Drop the per-request state (generators, drafts, the drafter's KV bookkeeping) of requests
        that finished or were preempted; the engine calls this even for a step with nothing to run."""
        if self.spec is not None:
            self.spec.forget(scheduler_output.finished_request_ids)
            self.spec.forget(scheduler_output.preempted_request_ids)

    @torch.inference_mode()
    def execute_model(
        self, scheduler_output: SchedulerOutput, token_bitmasks: dict[str, np.ndarray] | None = None
    ) -> ModelRunnerOutput:
        """One step. `token_bitmasks[request_id]` (structured outputs) is int32 `[num_spec_tokens + 1,
        num_words]`: the tokens the grammar allows at each position the request samples at."""
        masks = {rid: torch.from_numpy(m) for rid, m in (token_bitmasks or {}).items()}  # [s + 1, W] each
        self.release_finished(scheduler_output)
        output = ModelRunnerOutput()
        if scheduler_output.is_empty:
            return output

        num_blocks = self.kv_caches[0][0].shape[0]
        chunks = [SequenceChunk(s.start_position, s.num_new_tokens, s.block_ids) for s in scheduler_output.scheduled]
        order = order_for_attention(chunks, self.block_size, num_blocks)
        batch = [scheduler_output.scheduled[i] for i in order]
        input_ids: list[int] = []
        positions: list[int] = []
        last_rows: list[int] = []  # the row of each request's last token in this step
        for scheduled in batch:
            input_ids.extend(scheduled.token_ids)
            positions.extend(range(scheduled.start_position, scheduled.start_position + scheduled.num_new_tokens))
            last_rows.append(len(input_ids) - 1)

        ctx = build_forward_context([chunks[i] for i in order], self.block_size, self.device, self.kv_caches)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            ctx,
        )  # [num_tokens, hidden]

        plain = [(b, row) for b, row in zip(batch, last_rows) if b.samples and not b.num_spec_tokens]
        if plain:
            rows_index = torch.tensor([row for _, row in plain], dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden[rows_index]).float()  # [num_plain, vocab]
            rows = [self._sampling_row(b.request, _first_row(masks.get(b.request_id))) for b, _ in plain]
            results = self.sampler.sample(logits, rows)
            for (scheduled, _), (token_id, logprob) in zip(plain, results):
                output.sampled_token_ids[scheduled.request_id] = [token_id]
                if logprob is not None:
                    output.logprobs[scheduled.request_id] = [logprob]

        verifying = [(b, row) for b, row in zip(batch, last_rows) if b.samples and b.num_spec_tokens]
        if verifying:
            self._verify(verifying, hidden, output, masks)

        start = 0
        for scheduled in batch:
            end = start + scheduled.num_new_tokens
            if _wants_prompt_logprobs(scheduled):
                output.prompt_logprobs[scheduled.request_id] = self._prompt_logprobs(scheduled, hidden[start:end])
            start = end
        return output

    def _verify(
        self,
        verifying: list[tuple[ScheduledRequest, int]],
        hidden: torch.Tensor,
        output: ModelRunnerOutput,
        masks: dict[str, torch.Tensor],
    ) -> None:
        """Score each request's drafts: logits at its last known token and each draft position."""
        row_lists = [list(range(row - b.num_spec_tokens, row + 1)) for b, row in verifying]
        index = torch.tensor([r for rows in row_lists for r in rows], dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[index]).float()  # [sum(s + 1), vocab]
        per_request = list(logits.split([len(rows) for rows in row_lists]))
        results = self.spec.verify([b for b, _ in verifying], per_request, masks)
        for (scheduled, _), result in zip(verifying, results):
            output.sampled_token_ids[scheduled.request_id] = result.token_ids
            output.num_draft_tokens[scheduled.request_id] = result.num_draft_tokens
            if result.logprobs is not None:
                output.logprobs[scheduled.request_id] = result.logprobs

    @torch.inference_mode()
    def propose(
        self,
        requests: list[Request],
        depths: dict[str, int],
        block_ids: dict[str, list[int]],
        draft_bitmask: DraftBitmask | None = None,
    ) -> Proposal:
        """Draft up to `depths[request_id]` tokens for each request with a depth (for the next
        step); `Proposal.token_ids` follows the order of those requests in `requests`.
        `draft_bitmask(request, drafts_so_far)` (structured outputs) masks a model drafter's choices."""
        if self.spec is None:
            return Proposal(token_ids=[])
        proposal_requests = [
            ProposalRequest(r.request_id, r.all_token_ids, r.num_computed_tokens, block_ids[r.request_id], depths[r.request_id])
            for r in requests
            if depths.get(r.request_id, 0) > 0
        ]
        return self.spec.propose(proposal_requests, {r.request_id: r for r in requests}, draft_bitmask)

    def proposal_backlogs(self, requests: list[Request]) -> dict[str, int]:
        """Per request, the tokens the proposer must catch up on before drafting (empty without one)."""
        return {} if self.spec is None else self.spec.backlogs(requests)

    def _sampling_row(self, request: Request, token_bitmask: torch.Tensor | None) -> SamplingRow:
        return SamplingRow(
            params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            generator=self.generators.get(request, request.num_tokens),  # the position being sampled
            token_bitmask=token_bitmask,
        )

    def _prompt_logprobs(
        self, scheduled: ScheduledRequest, hidden: torch.Tensor  # [num_new_tokens, hidden]
    ) -> list[TokenLogprob | None]:
        """Log-probabilities of the prompt tokens this chunk predicts (position p predicts p + 1)."""
        request = scheduled.request
        start = scheduled.start_position
        num_prompt = request.num_prompt_tokens
        result: list[TokenLogprob | None] = [None] if start == 0 else []
        # Positions start .. last predict tokens start+1 .. last+1, as long as those are prompt tokens.
        last = min(start + scheduled.num_new_tokens, num_prompt - 1)
        if last > start:
            logits = self.model.compute_logits(hidden[: last - start]).float()  # [n, vocab]
            targets = request.prompt_token_ids[start + 1 : last + 1]
            result.extend(self.sampler.logprobs_of(logits, targets, request.sampling_params.prompt_logprobs))
        return result


def _first_row(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask[0]


def _wants_prompt_logprobs(scheduled: ScheduledRequest) -> bool:
    request = scheduled.request
    return (
        request.sampling_params.prompt_logprobs is not None
        and scheduled.start_position < request.num_prompt_tokens
        and request.index == 0
    )
