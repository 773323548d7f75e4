"""`ModelRunnerOutput`: what one step of the model produced, the runner's half of the contract.

Plain Python data (ints and floats), so the engine and scheduler never touch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The log-probability of one chosen token and, optionally, the most likely alternatives.

    `top` holds (token_id, logprob) pairs, most likely first; `rank` is the chosen token's 1-based
    rank in the distribution (1 = most likely).
    """

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """Per request id: the tokens this step appended (empty for a partial prefill chunk; with
    speculative decoding, the accepted drafts plus one).

    `logprobs[request_id]` is parallel to `sampled_token_ids[request_id]` when the request asked for
    logprobs. `prompt_logprobs[request_id]` covers the prompt positions computed this step (the first
    prompt token has none and appears as None).
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob | None]] = field(default_factory=dict)
    # Speculative decoding: drafts verified this step per request (their accepted count is
    # len(sampled_token_ids[request_id]) - 1).
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
