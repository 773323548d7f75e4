"""`SampledDraftChooser`: a model proposer's logits -> drafts, with each request's sampling rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from helix_server.sample.generators import RequestGenerators
from helix_server.sample.sampler import Sampler
from helix_server.sample.sampling_row import SamplingRow

if TYPE_CHECKING:
    from helix_server.scheduler.request import Request

# (request, drafts so far) -> the int32 `[num_words]` grammar bitmask of the next draft, or None.
DraftBitmask = Callable[["Request", list[int]], "np.ndarray | None"]


class SampledDraftChooser:
    """Turns a model proposer's logits into drafts with each request's own sampling rules.

    Called once per drafting step with the logits of every request; keeps the drafts so far so the
    penalties (and the grammar mask) of step j see drafts 1..j-1 as output. Greedy rows take the
    argmax (no randomness); the others are sampled from the processed distribution, seeded ones with the noise of the
    position they draft (see `sample.generators`).
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
