"""The runner's half of speculative decoding: verifying last step's drafts and proposing the next.

Verification: the model has scored `[last, d_1 .. d_s]` in one forward, so for each request we have
the target logits at s + 1 positions. Each position's logits go through the same processing as
ordinary sampling (penalties see the drafts before that position as output), giving p_1 .. p_{s+1};
the q of each draft was stored when it was proposed. The rejection sampler turns (p, q, drafts) into
the accepted drafts plus one token, distributed exactly as sampling from the model one token at a
time would be. A seeded sampled request is verified like a greedy one against its noisy argmax at
each position (`runner.generators`): the token plain sampling would draw there, so its text is the
same with speculation on or off and at any depth.

Proposal: for each request that just got new tokens the proposer drafts k tokens; a model-based
proposer's logits are processed and sampled here (`_DraftChooser`), with the request's own rules and
generator, and the resulting q is kept for the next step's verification.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from helix_server.runner.generators import RequestGenerators
from helix_server.runner.output import TokenLogprob
from helix_server.runner.sampler import Sampler, SamplingRow
from helix_server.scheduler.output import ScheduledRequest
from helix_server.scheduler.request import Request
from helix_server.spec.proposer import Proposal, ProposalRequest, Proposer
from helix_server.spec.rejection_sampler import rejection_sample

# (request, drafts so far) -> the int32 `[num_words]` grammar bitmask of the next draft, or None.
DraftBitmask = Callable[[Request, list[int]], "np.ndarray | None"]


@dataclass
class VerifiedTokens:
    """One request's result: accepted drafts plus one new token, and how many drafts it had."""

    token_ids: list[int]
    num_draft_tokens: int
    logprobs: list[TokenLogprob] | None = None

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


class SpecDecoder:
    """Verifies and proposes drafts for the requests of a `ModelRunner`."""

    def __init__(
        self,
        proposer: Proposer,
        sampler: Sampler,
        generators: RequestGenerators,
    ) -> None:
        self.proposer = proposer
        self.sampler = sampler
        self.generators = generators
        # request_id -> q of its pending drafts, [k, V] (absent for deterministic proposers).
        self._draft_probs: dict[str, torch.Tensor] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        for request_id in request_ids:
            self._draft_probs.pop(request_id, None)
        self.proposer.forget(request_ids)

    # ------------------------------------------------------------------ verification

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
        tokens = rejection_sample(
            target_probs,
            draft_probs,
            draft_ids,
            num_drafts,
            greedy=exact,
            generators=[None] * num_rows,  # only unseeded rows draw, from the shared stream
            shared_generator=self.sampler.generator,
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

    # ------------------------------------------------------------------ proposal

    def backlogs(self, requests: list[Request]) -> dict[str, int]:
        """Per request, the tokens the proposer would catch up on before drafting for it."""
        return {r.request_id: self.proposer.backlog(r.request_id, r.num_computed_tokens, r.num_tokens) for r in requests}

    def propose(
        self, requests: list[ProposalRequest], by_id: dict[str, Request], draft_bitmask: DraftBitmask | None = None
    ) -> Proposal:
        """Draft for each request; keeps q for the next verification."""
        if not requests:
            return Proposal(token_ids=[])
        chooser = _DraftChooser(self.sampler, [by_id[r.request_id] for r in requests], self.generators, draft_bitmask)
        proposal: Proposal = self.proposer.propose(requests, chooser)
        for r, (request, tokens) in enumerate(zip(requests, proposal.token_ids)):
            if proposal.probs is not None and tokens:
                self._draft_probs[request.request_id] = proposal.probs[r, : len(tokens)]
            else:
                self._draft_probs.pop(request.request_id, None)
        return proposal


class _DraftChooser:
    """Turns a model proposer's logits into drafts with each request's own sampling rules.

    Called once per drafting step with the logits of every request; keeps the drafts so far so the
    penalties (and the grammar mask) of step j see drafts 1..j-1 as output. Greedy rows take the
    argmax (no randomness); the others are sampled from the processed distribution, seeded ones with the noise of the
    position they draft (see `runner.generators`).
    """

    def __init__(
        self,
        sampler: Sampler,
        requests: list[Request],
        generators: RequestGenerators,
        draft_bitmask: DraftBitmask | None = None,
    ) -> None:
        self.sampler = sampler
        self.requests = requests
        self.generators = generators
        self.draft_bitmask = draft_bitmask
        self.drafts: list[list[int]] = [[] for _ in requests]
        self.greedy = [r.sampling_params.greedy for r in requests]

    def __call__(self, logits: torch.Tensor, step: int, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [
            SamplingRow(
                self.requests[r].sampling_params,
                self.requests[r].prompt_token_ids,
                self.requests[r].output_token_ids + self.drafts[r],
                # The noise of the position drafted: the target's own there (Gumbel coupling).
                self.generators.get(self.requests[r], self.requests[r].num_tokens + len(self.drafts[r])),
                self._bitmask(r),
            )
            for r in active
        ]
        probs = self.sampler.probs(self.sampler.process_logits(logits, rows), rows)  # [A, V]
        tokens = probs.argmax(dim=-1)  # greedy rows: one-hot probs
        random_ids = [i for i, r in enumerate(active) if not self.greedy[r]]
        if random_ids:
            index = torch.tensor(random_ids, device=logits.device)
            sampled = self.sampler.sample_from_probs(probs.index_select(0, index), [rows[i] for i in random_ids])
            tokens = tokens.index_copy(0, index, sampled)
        for r, token in zip(active, tokens.tolist()):
            self.drafts[r].append(token)
        return tokens, probs

    def _bitmask(self, r: int) -> torch.Tensor | None:
        """The grammar's mask for request r's next draft (drafts the grammar allows are useful)."""
        if self.draft_bitmask is None:
            return None
        mask = self.draft_bitmask(self.requests[r], self.drafts[r])
        return None if mask is None else torch.from_numpy(mask)
