"""Turn a `SchedulerOutput` into tensors, run the model over the paged KV cache, and sample.

The runner owns the KV cache tensors, the sampler and, with speculative decoding, the `Speculator`
(proposer, depth policy, verification, counters). It never sees HTTP or request queues; what it
returns is plain Python (`ModelRunnerOutput`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from helix_server.config import EngineConfig
from helix_server.layers.attention.builder import SequenceChunk, build_forward_context, order_for_attention
from helix_server.layers.attention.layer import short_query_len
from helix_server.runner.cuda_graphs import CudaGraphRunner, cuda_graphs_enabled, graph_max_tokens
from helix_server.runner.loader import LoadedModel
from helix_server.sample.generators import RequestGenerators
from helix_server.sample.sampler import Sampler
from helix_server.sample.sampling_row import SamplingRow
from helix_server.spec_decode.draft_chooser import DraftBitmask
from helix_server.spec_decode.factory import build_speculator
from helix_server.spec_decode.speculator import SpecCounters, Speculator
from helix_server.step_contract import ModelRunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprob

if TYPE_CHECKING:
    from helix_server.scheduler.request import Request


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
        generators: RequestGenerators | None = None,
        speculator: Speculator | None = None,
        graphs: CudaGraphRunner | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = device
        self.generators = generators or RequestGenerators(device)
        self.speculator = speculator
        # Short steps (decodes, verification) replay CUDA graphs through this when set.
        self.graphs = graphs
        self.max_short_len = short_query_len(model)  # the step's short queries, for its attention

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, config: EngineConfig, eos_token_ids: set[int]) -> ModelRunner:
        """The runner of a loaded model: its sampler and, when `config` speculates, its `Speculator`."""
        runtime = loaded.runtime
        sampler = Sampler(runtime.vocab_size, eos_token_ids, runtime.device, seed=config.model.seed)
        generators = RequestGenerators(runtime.device)
        speculator = build_speculator(
            config.speculative,
            sampler,
            generators,
            loaded.model,
            loaded.kv_caches,
            runtime.block_size,
            runtime.device,
            loaded.draft_model,
            loaded.draft_kv_caches,
        )
        graphs = None
        if cuda_graphs_enabled(runtime.device, config.model.enforce_eager):
            scheduler = config.scheduler
            graphs = CudaGraphRunner(
                loaded.model, loaded.kv_caches, runtime.block_size,
                graph_max_tokens(scheduler.max_num_seqs, scheduler.max_num_batched_tokens),
                runtime.max_model_len, runtime.device,
            )
            graphs.capture()
        return cls(
            loaded.model, loaded.kv_caches, runtime.block_size, sampler, runtime.device, generators, speculator, graphs
        )

    @property
    def num_speculative_tokens(self) -> int:
        """The most drafts a request may verify per step (0: no speculative decoding)."""
        return 0 if self.speculator is None else self.speculator.num_speculative_tokens

    def num_lookahead_tokens(self, requested: int | None) -> int:
        """The lookahead (draft) slots a request gets per step; `requested` is its own cap, if any."""
        return 0 if self.speculator is None else self.speculator.num_lookahead_tokens(requested)

    @property
    def spec_counters(self) -> SpecCounters:
        """Speculation's running totals (all zero without speculative decoding)."""
        return SpecCounters() if self.speculator is None else self.speculator.counters

    def release_finished(self, scheduler_output: SchedulerOutput) -> None:
        """Drop the per-request state (drafts, the drafter's KV bookkeeping) of requests that
        finished or were preempted; the engine calls this even for a step with nothing to run."""
        if self.speculator is not None:
            self.speculator.release(scheduler_output.finished_request_ids, scheduler_output.preempted_request_ids)

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
        self._run(scheduler_output, masks, output)
        return output

    def observe_step(self, scheduler_output: SchedulerOutput, output: ModelRunnerOutput, seconds: float) -> None:
        """A step took `seconds` end to end (grammar masks included): speculation's depth policy
        and counters learn from it. Call it before the scheduler's update."""
        if self.speculator is not None:
            self.speculator.observe_step(scheduler_output, output, seconds)

    def _run(
        self, scheduler_output: SchedulerOutput, masks: dict[str, torch.Tensor], output: ModelRunnerOutput
    ) -> None:
        """The forward over every scheduled token, then sampling, verification and prompt logprobs."""

        num_blocks = self.kv_caches[0][0].shape[0]
        chunks = [SequenceChunk(s.start_position, s.num_new_tokens, s.block_ids) for s in scheduler_output.scheduled]
        order = order_for_attention(chunks, self.block_size, num_blocks, self.max_short_len)
        batch = [scheduler_output.scheduled[i] for i in order]
        input_ids: list[int] = []
        positions: list[int] = []
        last_rows: list[int] = []  # the row of each request's last token in this step
        for scheduled in batch:
            input_ids.extend(scheduled.token_ids)
            positions.extend(range(scheduled.start_position, scheduled.start_position + scheduled.num_new_tokens))
            last_rows.append(len(input_ids) - 1)

        ordered = [chunks[i] for i in order]
        if self.graphs is not None and self.graphs.can_run(ordered):
            hidden = self.graphs.run(ordered, input_ids, positions)  # [num_tokens, hidden]
        else:
            ctx = build_forward_context(ordered, self.block_size, self.device, self.kv_caches, self.max_short_len)
            hidden = self.model(
                torch.tensor(input_ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device),
                ctx,
            )  # [num_tokens, hidden]

        plain = [(b, row) for b, row in zip(batch, last_rows) if b.samples and not b.num_spec_tokens]
        if plain:
            logits = self.model.compute_logits(_take_rows(hidden, [row for _, row in plain])).float()  # [num_plain, vocab]
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

    def _verify(
        self,
        verifying: list[tuple[ScheduledRequest, int]],
        hidden: torch.Tensor,
        output: ModelRunnerOutput,
        masks: dict[str, torch.Tensor],
    ) -> None:
        """Score each request's drafts: logits at its last known token and each draft position."""
        row_lists = [list(range(row - b.num_spec_tokens, row + 1)) for b, row in verifying]
        logits = self.model.compute_logits(_take_rows(hidden, [r for rows in row_lists for r in rows])).float()  # [sum(s + 1), vocab]
        per_request = list(logits.split([len(rows) for rows in row_lists]))
        results = self.speculator.verify([b for b, _ in verifying], per_request, masks)
        for (scheduled, _), result in zip(verifying, results):
            output.sampled_token_ids[scheduled.request_id] = result.token_ids
            output.num_draft_tokens[scheduled.request_id] = result.num_draft_tokens
            if result.logprobs is not None:
                output.logprobs[scheduled.request_id] = result.logprobs

    @torch.inference_mode()
    def propose(
        self,
        requests: list[Request],
        num_running: int,
        block_ids_of: Callable[[str], list[int]],
        draft_bitmask: DraftBitmask | None = None,
    ) -> list[tuple[Request, list[int]]]:
        """Drafts for the next step of requests that just got new tokens, as (request, drafts)
        (none without speculative decoding). `block_ids_of(request_id)` is a request's block table;
        `draft_bitmask(request, drafts_so_far)` (structured outputs) masks a model drafter's choices."""
        if self.speculator is None:
            return []
        return self.speculator.propose(requests, num_running, block_ids_of, draft_bitmask)

    def proposal_backlogs(self, requests: list[Request]) -> dict[str, int]:
        """Per request, the tokens the proposer must catch up on before drafting (empty without one)."""
        return {} if self.speculator is None else self.speculator.backlogs(requests)

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


def _take_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden [num_tokens, H] -> [len(rows), H]: itself when `rows` are all of its rows in order (a
    step of decodes only, or of verification rows only), else the rows gathered with an index
    uploaded without a host sync (on CUDA, from pinned memory: a pageable upload would wait for the
    forward to finish before the LM head could be queued)."""
    if len(rows) == hidden.shape[0] and rows == list(range(len(rows))):
        return hidden
    index = torch.tensor(rows, dtype=torch.long, pin_memory=hidden.is_cuda)
    return hidden[index.to(hidden.device, non_blocking=True)]
