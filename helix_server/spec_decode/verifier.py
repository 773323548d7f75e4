"""Verifying last step's drafts: the rejection sampler fed with the processed target distribution.

The model has scored `[last, d_1 .. d_s]` in one forward, so for each request we have the target
logits at s + 1 positions. Each position's logits go through the same processing as ordinary
sampling (penalties see the drafts before that position as output), giving p_1 .. p_{s+1}; the q of
each draft was stored when it was proposed (`store_draft_probs`). The rejection sampler turns
(p, q, drafts) into the accepted drafts plus one token, distributed exactly as sampling from the
model one token at a time would be. A seeded sampled request is verified like a greedy one against
its noisy argmax at each position (`sample.generators`): the token plain sampling would draw there,
so its text is the same with speculation on or off and at any depth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from helix_server.sample.generators import RequestGenerators
from helix_server.sample.sampler import Sampler
from helix_server.sample.sampling_row import SamplingRow
from helix_server.spec_decode.rejection_sampler import RejectionSamplerInput, rejection_sample
from helix_server.step_contract import ScheduledRequest, TokenLogprob


@dataclass
class VerifiedTokens:
    """One request's result: accepted drafts plus one new token, and how many drafts it had."""

    token_ids: list[int]
    num_draft_tokens: int
    logprobs: list[TokenLogprob] | None = None

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


class DraftVerifier:
    """Verifies the drafts of a batch, keeping each request's q from proposal to verification."""

    def __init__(self, sampler: Sampler, generators: RequestGenerators) -> None:
        self.sampler = sampler
        self.generators = generators
        # request_id -> q of its pending drafts, [k, V] (absent for deterministic proposers).
        self._draft_probs: dict[str, torch.Tensor] = {}

    def store_draft_probs(self, request_id: str, probs: torch.Tensor | None) -> None:
        """Keep q (`[k, V]`) of a request's new drafts; None: they came from a deterministic proposer."""
        if probs is None:
            self._draft_probs.pop(request_id, None)
        else:
            self._draft_probs[request_id] = probs

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._draft_probs.pop(request_id, None)

    def verify(
        self,
        scheduled: list[ScheduledRequest],
        logits: list[torch.Tensor],  # per request [s + 1, V]: positions of its last token and drafts
        token_bitmasks: dict[str, torch.Tensor] | None = None,  # per constrained request [s + 1, W]
    ) -> list[VerifiedTokens]:
        """Accepted drafts plus one token per request. A constrained request's target distribution at
        each position includes its grammar's mask there (the matcher advanced through the drafts
        before it), so acceptance uses the constrained p and a forbidden draft is always rejected."""
        token_bitmasks = token_bitmasks or {}
        num_rows = len(scheduled)
        num_drafts = [s.num_spec_tokens for s in scheduled]
        max_drafts = max(num_drafts)
        width = logits[0].shape[-1]
        device = logits[0].device

        # Processed target distributions, one row per position: [sum(s + 1), V] -> [R, S + 1, V].
        rows: list[SamplingRow] = []
        for s in scheduled:
            request = s.request
            drafts = request.spec_token_ids[: s.num_spec_tokens]
            masks = token_bitmasks.get(s.request_id)
            for i in range(s.num_spec_tokens + 1):
                rows.append(
                    SamplingRow(
                        request.sampling_params,
                        request.prompt_token_ids,
                        request.output_token_ids + drafts[:i],
                        self.generators.get(request, request.num_tokens + i),  # position-keyed noise
                        None if masks is None else masks[i],
                    )
                )
        flat_logits = torch.cat(logits, dim=0)  # [sum(s + 1), V]
        flat_probs = self.sampler.probs(self.sampler.process_logits(flat_logits, rows), rows)
        flat_probs = self._seeded_to_one_hot(flat_probs, rows)
        target_probs = torch.zeros((num_rows, max_drafts + 1, width), device=device)
        draft_probs = torch.zeros((num_rows, max_drafts, width), device=device)
        draft_ids = torch.zeros((num_rows, max_drafts), dtype=torch.long, device=device)
        offset = 0
        for r, s in enumerate(scheduled):
            count = s.num_spec_tokens
            target_probs[r, : count + 1] = flat_probs[offset : offset + count + 1]
            offset += count + 1
            drafts = s.request.spec_token_ids[:count]
            draft_ids[r, :count] = torch.tensor(drafts, dtype=torch.long, device=device)
            stored = self._draft_probs.get(s.request_id)
            if stored is not None:
                draft_probs[r, :count] = stored[:count]
            else:  # a deterministic proposer: q is one-hot at each draft
                draft_probs[r, torch.arange(count, device=device), draft_ids[r, :count]] = 1.0

        # Seeded rows are one-hot at their noisy argmaxes: matched exactly, like greedy rows.
        exact = [s.request.sampling_params.greedy or s.request.sampling_params.seed is not None for s in scheduled]
        tokens, _ = rejection_sample(
            RejectionSamplerInput(
                target_probs,
                draft_probs,
                draft_ids,
                num_drafts,
                greedy=exact,
                generators=[None] * num_rows,  # only unseeded rows draw, from the shared stream
                shared_generator=self.sampler.generator,
            )
        )
        results = [VerifiedTokens(t, n) for t, n in zip(tokens, num_drafts)]
        for s, result, row_logits in zip(scheduled, results, logits):
            self._draft_probs.pop(s.request_id, None)
            num_top = s.request.sampling_params.logprobs
            if num_top is not None:
                raw = row_logits[: len(result.token_ids)]  # position i scored token i
                result.logprobs = self.sampler.logprobs_of(raw, result.token_ids, num_top)
        return results

    def _seeded_to_one_hot(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Rows with a generator (seeded, sampled) -> one-hot at the token plain sampling would draw
        at that position (the exponential race with the position's noise); others unchanged."""
        seeded = [i for i, row in enumerate(rows) if row.generator is not None]
        if not seeded:
            return probs
        index = torch.tensor(seeded, device=probs.device)
        tokens = self.sampler.sample_from_probs(probs.index_select(0, index), [rows[i] for i in seeded])  # [M]
        one_hot = torch.zeros((len(seeded), probs.shape[1]), dtype=probs.dtype, device=probs.device)
        one_hot.scatter_(1, tokens.unsqueeze(1), 1.0)
        return probs.index_copy(0, index, one_hot)
