"""Turn a `SchedulerOutput` into tensors, run the model over the paged KV cache, and sample.

The runner owns the KV cache tensors and the per-request sampling state that must outlive a step
(seeded generators). It never sees HTTP or request queues; what it returns is plain Python
(`ModelRunnerOutput`).
"""

from __future__ import annotations

import torch

from helix_server.layers.attention.builder import SequenceChunk, build_attention_metadata, order_for_attention
from helix_server.layers.attention.metadata import ForwardContext
from helix_server.runner.output import ModelRunnerOutput, TokenLogprob
from helix_server.runner.sampler import Sampler, SamplingRow
from helix_server.scheduler.output import ScheduledRequest, SchedulerOutput


class ModelRunner:
    """Executes one scheduler step: one forward over every scheduled token, then sampling.

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
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = device
        # request_id -> generator of a request that asked for a seed; lives until the request ends,
        # preemptions included, so its random stream depends only on its own history.
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self._generators.pop(request_id, None)
        output = ModelRunnerOutput()
        if scheduler_output.is_empty:
            return output

        order = order_for_attention(
            [SequenceChunk(s.start_position, s.num_new_tokens, s.block_ids) for s in scheduler_output.scheduled]
        )
        batch = [scheduler_output.scheduled[i] for i in order]
        input_ids: list[int] = []
        positions: list[int] = []
        chunks: list[SequenceChunk] = []
        last_rows: list[int] = []  # the row of each request's last token in this step
        for scheduled in batch:
            input_ids.extend(scheduled.token_ids)
            positions.extend(range(scheduled.start_position, scheduled.start_position + scheduled.num_new_tokens))
            chunks.append(SequenceChunk(scheduled.start_position, scheduled.num_new_tokens, scheduled.block_ids))
            last_rows.append(len(input_ids) - 1)

        metadata = build_attention_metadata(chunks, self.block_size, self.device, self.kv_caches[0][0].dtype)
        ctx = ForwardContext(attn_metadata=metadata, kv_caches=self.kv_caches)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            ctx,
        )  # [num_tokens, hidden]

        sampling = [(b, row) for b, row in zip(batch, last_rows) if b.samples]
        if sampling:
            rows_index = torch.tensor([row for _, row in sampling], dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden[rows_index]).float()  # [num_sampling, vocab]
            results = self.sampler.sample(logits, [self._sampling_row(b) for b, _ in sampling])
            for (scheduled, _), (token_id, logprob) in zip(sampling, results):
                output.sampled_token_ids[scheduled.request_id] = [token_id]
                if logprob is not None:
                    output.logprobs[scheduled.request_id] = [logprob]

        start = 0
        for scheduled in batch:
            end = start + scheduled.num_new_tokens
            if _wants_prompt_logprobs(scheduled):
                output.prompt_logprobs[scheduled.request_id] = self._prompt_logprobs(scheduled, hidden[start:end])
            start = end
        return output

    def _sampling_row(self, scheduled: ScheduledRequest) -> SamplingRow:
        request = scheduled.request
        params = request.sampling_params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = self._generators.get(request.request_id)
            if generator is None:
                generator = Sampler.make_generator(params.seed, self.device)
                self._generators[request.request_id] = generator
        return SamplingRow(
            params=params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            generator=generator,
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
            result.extend(
                self.sampler.logprobs_of(logits, targets, request.sampling_params.prompt_logprobs)
            )
        return result


def _wants_prompt_logprobs(scheduled: ScheduledRequest) -> bool:
    request = scheduled.request
    return (
        request.sampling_params.prompt_logprobs is not None
        and scheduled.start_position < request.num_prompt_tokens
        and request.index == 0
    )
