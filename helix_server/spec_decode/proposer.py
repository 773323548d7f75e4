"""What every speculative proposer takes and returns.

A proposer drafts up to k tokens per request for the next step; the model then verifies them all in
one forward. Proposers do not choose tokens themselves: a model-based proposer hands its logits to a
`DraftChooser` supplied by the runner, which applies the request's own sampling rules (temperature,
top-p/k, penalties, logit bias...) so that the draft distribution q is processed exactly like the
target distribution p it is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

# (draft logits [A, V], step j, the indices of those A still-drafting requests in the proposal's
# request list) -> (tokens [A], probs [A, V]).
DraftChooser = Callable[[torch.Tensor, int, list[int]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ProposalRequest:
    """One request to draft for: its known tokens and where its K/V lives."""

    request_id: str
    token_ids: list[int]  # prompt + output; the last token has no K/V yet
    num_computed_tokens: int  # tokens whose K/V the model has computed
    block_ids: list[int]  # the request's block table, lookahead slots included
    num_draft_tokens: int  # k >= 1 for this request

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Proposal:
    """Per request (in input order) its drafts, and the distributions they were drawn from.

    `probs` is [R, K, V] for proposers that sample from a distribution (row r's first
    len(token_ids[r]) entries are meaningful), or None for deterministic proposers (n-gram): q is
    then one-hot at each draft.
    """

    token_ids: list[list[int]]
    probs: torch.Tensor | None = None
    # Tokens the drafter had to process before drafting (a draft model catching up on a prompt).
    num_catch_up_tokens: int = 0


class Proposer(Protocol):
    """Drafts tokens for the next step of a batch of requests."""

    def propose(self, requests: list[ProposalRequest], choose: DraftChooser) -> Proposal: ...

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop per-request state of finished or preempted requests."""
        ...

    def backlog(self, request_id: str, num_computed_tokens: int, num_tokens: int) -> int:
        """Tokens it would process for this request before its first draft (a draft model catching
        up on what it has not seen; 0 for proposers that read the tokens directly)."""
        ...
