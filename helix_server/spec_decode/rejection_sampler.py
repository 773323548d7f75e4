"""Lossless speculative decoding: the rejection sampler (Leviathan et al. 2022; Chen et al. 2023).

A proposer drafts `d_1..d_s` for a request; the target model scores them in one forward, giving its
distribution `p_i` at every draft position plus one more, `p_{s+1}`. The proposer's distribution at
position i is `q_i` (one-hot for deterministic proposers such as n-gram lookup). Per request:

    for i in 1..s:
        accept d_i with probability min(1, p_i(d_i) / q_i(d_i))      (one uniform u_i per position)
        on rejection: emit r ~ norm(max(0, p_i - q_i)) (the *recovered* token) and stop
    if all s were accepted: emit b ~ p_{s+1} (the *bonus* token)

so every step emits the accepted drafts followed by exactly one new token.

Why the output is distributed exactly as p. Fix a position, write q for the draft's distribution and
p for the target's, and let beta = sum_x min(p(x), q(x)), the probability that the draft is accepted
(sum_x q(x) * min(1, p(x) / q(x))). Then

    P(emit x) = P(draft x and accept) + P(reject) * P(recover x)
              = q(x) * min(1, p(x) / q(x))  + (1 - beta) * max(0, p(x) - q(x)) / Z
              = min(p(x), q(x))             + (1 - beta) * max(0, p(x) - q(x)) / Z

with Z = sum_x max(0, p(x) - q(x)) = sum_x (p(x) - min(p(x), q(x))) = 1 - beta (p sums to 1). The
second term is therefore max(0, p(x) - q(x)), and min(p, q) + max(0, p - q) = p(x). The same holds at
every later position conditionally on the accepted prefix, because p_{i+1} is the target's
distribution given that prefix and u_{i+1}, d_{i+1} are drawn independently of what came before; and a
bonus token is a plain draw from p_{s+1}. So the emitted sequence has the target's joint distribution.

Corner cases (all outside the exact math, where the inputs are not a proper (p, q) pair):
* q_i(d_i) == 0: the proposer could not have drafted d_i; the draft is rejected.
* p_i(d_i) == 0: the ratio is 0, the draft is always rejected (and cannot be recovered: p - q <= 0 there).
* max(0, p_i - q_i) sums to 0 (p <= q everywhere, e.g. p == q with a forced rejection): the recovered
  token falls back to a draw from p_i.

Greedy rows (p and q one-hot at argmaxes) compare tokens instead: accept while d_i == argmax p_i, then
emit argmax p at the first mismatch (or at the bonus position). They draw no random numbers.

Randomness. A non-greedy row with its own generator (a seeded request) draws, from that generator
only, first s uniforms (one per real draft, padding excluded) and then V exponentials for its one
new token; so its result depends only on its own inputs, never on the batch or the padded width S.
Rows without a generator take one block of uniforms `[n, S]` and then one block of exponentials
`[n, V]` from the shared generator. New tokens are drawn with the exponential race argmax(w / E),
E ~ Exp(1) i.i.d., which picks i with probability w_i / sum(w): the weights need no normalisation,
and no `torch.multinomial` is needed (DirectML lacks it).

Host synchronisation: `rejection_sample_tensors` makes none; `rejection_sample` makes one `.tolist()`
at the end. Both take one `RejectionSamplerInput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Output tensor entries past the new token (see `rejection_sample_tensors`).
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True)
class RejectionSamplerInput:
    """One batch of drafts to verify, for `rejection_sample` / `rejection_sample_tensors`.

    Shapes: `target_probs` float32 `[R, S + 1, V]` (p at each draft position plus the bonus position),
    `draft_probs` float32 `[R, S, V]` (q), `draft_token_ids` int64 `[R, S]`. Entries at or past
    `num_draft_tokens[r]` (and target positions past it + 1) are padding and may hold any value, NaN
    included; real draft ids must lie in [0, V). `greedy[r]` selects exact matching,
    `generators[r]` is the row's own generator or None (then `shared_generator` is used).
    """

    target_probs: torch.Tensor
    draft_probs: torch.Tensor
    draft_token_ids: torch.Tensor
    num_draft_tokens: Sequence[int]
    greedy: Sequence[bool]
    generators: Sequence[torch.Generator | None]
    shared_generator: torch.Generator


def rejection_sample(batch: RejectionSamplerInput) -> tuple[list[list[int]], list[int]]:
    """Verify the drafts of R requests with one host transfer: per row, the accepted drafts then
    exactly one new token; and the number of accepted drafts per row."""
    output, num_accepted = rejection_sample_tensors(batch)
    packed = torch.cat([output, num_accepted.unsqueeze(1)], dim=1).tolist()  # [R, S + 2]: the sync
    counts = [row[-1] for row in packed]
    return [row[: count + 1] for row, count in zip(packed, counts)], counts


def rejection_sample_tensors(batch: RejectionSamplerInput) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-side core of `rejection_sample`; makes no host synchronisation.

    Returns `(output_token_ids, num_accepted)`: int64 `[R, S + 1]` holding, per row, the
    `num_accepted[r]` accepted drafts, then the new token at index `num_accepted[r]`, then
    `PLACEHOLDER_TOKEN_ID`; and int64 `[R]`, each in `0..num_draft_tokens[r]`.
    """
    target_probs, draft_probs, draft_token_ids = batch.target_probs, batch.draft_probs, batch.draft_token_ids
    num_draft_tokens, greedy, generators = batch.num_draft_tokens, batch.greedy, batch.generators
    num_rows, width, vocab = target_probs.shape  # width = S + 1
    num_slots = width - 1  # S
    assert tuple(draft_probs.shape) == (num_rows, num_slots, vocab), (draft_probs.shape, target_probs.shape)
    assert tuple(draft_token_ids.shape) == (num_rows, num_slots), (draft_token_ids.shape, target_probs.shape)
    assert len(num_draft_tokens) == len(greedy) == len(generators) == num_rows
    assert all(0 <= s <= num_slots for s in num_draft_tokens), (list(num_draft_tokens), num_slots)
    device = target_probs.device
    target_probs = target_probs.to(torch.float32)
    draft_probs = draft_probs.to(torch.float32)

    num_drafts = torch.tensor(list(num_draft_tokens), dtype=torch.long, device=device)  # [R]
    slot = torch.arange(num_slots, device=device).unsqueeze(0)  # [1, S]
    valid = slot < num_drafts.unsqueeze(1)  # [R, S]: real drafts, not padding
    # Padding may hold anything (-1, ids past V): replace it so that gather stays in range.
    draft_ids = torch.where(valid, draft_token_ids.to(device=device, dtype=torch.long), 0)  # [R, S]

    greedy_ids = [r for r in range(num_rows) if greedy[r]]
    random_ids = [r for r in range(num_rows) if not greedy[r]]
    greedy_mask = torch.tensor([bool(g) for g in greedy], dtype=torch.bool, device=device)  # [R]

    # ---- accept test, all rows and positions at once
    accept = torch.zeros((num_rows, num_slots), dtype=torch.bool, device=device)  # [R, S]
    target_argmax = None
    if greedy_ids:
        target_argmax = target_probs.argmax(dim=-1)  # [R, S + 1]
        accept = draft_ids == target_argmax[:, :num_slots]
    if random_ids:
        uniforms, exponentials = _draw_noise(batch, num_slots, vocab, device)  # [R, S], [R, V]
        p_draft = target_probs[:, :num_slots].gather(2, draft_ids.unsqueeze(2)).squeeze(2)  # [R, S]
        q_draft = draft_probs.gather(2, draft_ids.unsqueeze(2)).squeeze(2)  # [R, S]
        # u < p / q accepts with probability min(1, p / q) (u is in [0, 1), so ratio >= 1 always
        # accepts, exactly, with no rounding of u * q). q == 0: a draft q could not produce, rejected.
        ratio = p_draft / q_draft.clamp(min=torch.finfo(torch.float32).tiny)  # [R, S]
        random_accept = (q_draft > 0) & (uniforms < ratio)  # [R, S]
        accept = torch.where(greedy_mask.unsqueeze(1), accept, random_accept)
    accept = accept & valid

    # Leading run of acceptances: stop at the first rejection (products of 0/1 floats are exact).
    num_accepted = accept.to(torch.float32).cumprod(dim=1).sum(dim=1).to(torch.long)  # [R]
    rejected = num_accepted < num_drafts  # [R]: the new token is recovered, else it is the bonus

    # ---- the one new token per row, at position num_accepted (a recovery or the bonus position)
    new_tokens = torch.zeros(num_rows, dtype=torch.long, device=device)  # [R]
    if random_ids:
        index = num_accepted.view(num_rows, 1, 1).expand(num_rows, 1, vocab)  # [R, 1, V]
        p_new = target_probs.gather(1, index).squeeze(1)  # [R, V]
        if num_slots > 0:
            q_new = draft_probs.gather(1, index.clamp(max=num_slots - 1)).squeeze(1)  # [R, V]
            # Recovered rows sample from max(0, p - q); bonus rows from p (their q is padding).
            q_new = torch.where(rejected.unsqueeze(1), q_new, 0.0)
            residual = (p_new - q_new).clamp(min=0.0)  # [R, V]
            has_mass = residual.sum(dim=-1, keepdim=True) > 0  # [R, 1]
            weights = torch.where(has_mass, residual, p_new)  # [R, V]: fallback to p
        else:
            weights = p_new
        # Exponential race: argmax(w / E) is w-distributed, so the residual needs no normalisation.
        new_tokens = (weights / exponentials).argmax(dim=-1)  # [R]
    if greedy_ids:
        greedy_new = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)  # [R]
        new_tokens = torch.where(greedy_mask, greedy_new, new_tokens)

    # ---- [accepted drafts..., new token, placeholders...] per row
    position = torch.arange(width, device=device).unsqueeze(0)  # [1, S + 1]
    drafts_wide = torch.nn.functional.pad(draft_ids, (0, 1), value=PLACEHOLDER_TOKEN_ID)  # [R, S + 1]
    accepted_count = num_accepted.unsqueeze(1)  # [R, 1]
    output = torch.where(position < accepted_count, drafts_wide, PLACEHOLDER_TOKEN_ID)
    output = torch.where(position == accepted_count, new_tokens.unsqueeze(1), output)  # [R, S + 1]
    return output, num_accepted


def _draw_noise(
    batch: RejectionSamplerInput, num_slots: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms `[R, S]` for the accept tests and Exp(1) noise `[R, V]` for the new tokens.

    Greedy rows draw nothing (their entries are filler). Rows without a generator share one block of
    each from `shared_generator` (uniforms first); a row with its own generator draws its
    `num_draft_tokens[r]` uniforms, then V exponentials, from that generator alone.
    """
    greedy, generators, shared_generator = batch.greedy, batch.generators, batch.shared_generator
    num_rows = len(greedy)
    shared = [r for r in range(num_rows) if not greedy[r] and generators[r] is None]
    if len(shared) == num_rows:  # the common case: one block of each, no scatter
        uniforms = _uniform(shared_generator, (num_rows, num_slots), device)  # [R, S]
        exponentials = _exponential(shared_generator, (num_rows, vocab), device)  # [R, V]
        return uniforms, exponentials.clamp_(min=torch.finfo(torch.float32).tiny)
    uniforms = torch.zeros((num_rows, num_slots), dtype=torch.float32, device=device)  # [R, S]
    exponentials = torch.ones((num_rows, vocab), dtype=torch.float32, device=device)  # [R, V]
    if shared:
        index = torch.tensor(shared, dtype=torch.long, device=device)
        if num_slots > 0:
            uniforms.index_copy_(0, index, _uniform(shared_generator, (len(shared), num_slots), device))
        exponentials.index_copy_(0, index, _exponential(shared_generator, (len(shared), vocab), device))
    for r in range(num_rows):
        generator = generators[r]
        if greedy[r] or generator is None:
            continue
        count = int(batch.num_draft_tokens[r])
        if count > 0:
            uniforms[r, :count] = _uniform(generator, (count,), device)
        exponentials[r] = _exponential(generator, (vocab,), device)
    # exponential_ can return exactly 0: a floor of the smallest normal float keeps 0 / E = 0 (never
    # NaN, which argmax would pick) and w / E finite for w <= 1.
    return uniforms, exponentials.clamp_(min=torch.finfo(torch.float32).tiny)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 draws from `generator`, made on its own device (the CPU for DirectML), moved over."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _exponential(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Exp(1) float32 draws from `generator`, made on its own device, moved to `device`."""
    noise = torch.empty(shape, dtype=torch.float32, device=generator.device)
    return noise.exponential_(generator=generator).to(device)
