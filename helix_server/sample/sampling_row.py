"""`SamplingRow`: one row of the logits matrix, the unit the sampler and its processors work on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_server.sampling_params import SamplingParams


def is_greedy(params: SamplingParams) -> bool:
    """True when the row takes the argmax of its processed logits (no randomness, no draws)."""
    return params.greedy


@dataclass
class SamplingRow:
    """One row of the logits matrix: one request's choice of its next token.

    `output_token_ids` are the tokens generated so far (penalties, min_tokens); for speculative
    verification they include the drafted tokens before this position. `generator` is the request's
    own generator when `params.seed` is set (see `Sampler.make_generator`), else None.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    # Structured outputs: which tokens the grammar allows here, int32 `[num_words]` (None: all).
    token_bitmask: torch.Tensor | None = None
