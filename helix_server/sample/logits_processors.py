"""Logits processors that run before temperature: grammar masks, logit bias, min_tokens, penalties.

Each function edits a float32 logits matrix `[num_rows, width]` in place, one row per `SamplingRow`,
and does nothing when no row asks for its processor. They run in vLLM's order (bias, then min_tokens,
then penalties) from `Sampler.process_logits`; the structured-output bitmask comes last, so what it
forbids stays forbidden whatever the bias. Per-row options are gathered in Python, moved to the
device as small index/value tensors, and applied to the whole batch with a few vectorised ops.

`width` is the logits' last dimension; it may exceed the tokenizer's vocabulary (padded LM heads),
and every column is treated as a token. Token ids at or beyond `width` are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from helix_server.sample.sampling_row import SamplingRow


def min_tokens_active(row: SamplingRow) -> bool:
    """True while the row has produced fewer than `min_tokens` tokens (EOS and stop ids are banned)."""
    return len(row.output_token_ids) < row.params.min_tokens


def needs_processing(row: SamplingRow) -> bool:
    """True when any processor of this module changes the row's logits this step."""
    params = row.params
    return (
        bool(params.logit_bias) or min_tokens_active(row) or params.has_penalties or row.token_bitmask is not None
    )


def apply_token_bitmask(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Set to -inf every token a row's grammar forbids (`row.token_bitmask`, int32 `[num_words]`,
    bit t % 32 of word t // 32 set when token t is allowed). Columns beyond the bitmask (a padded
    LM head) are forbidden too. Rows without a bitmask are untouched and cost nothing."""
    picked = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
    if not picked:
        return
    device = logits.device
    width = logits.shape[1]
    words = torch.stack([rows[i].token_bitmask for i in picked]).to(device)  # [M, W] int32
    shifts = torch.arange(32, dtype=torch.int32, device=device)  # [32]
    bits = ((words.unsqueeze(-1) >> shifts) & 1).reshape(len(picked), -1).bool()  # [M, W * 32]
    allowed = torch.zeros((len(picked), width), dtype=torch.bool, device=device)  # [M, V]
    usable = min(width, bits.shape[1])
    allowed[:, :usable] = bits[:, :usable]
    index = torch.tensor(picked, device=device)
    sub = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))  # [M, V]
    logits.index_copy_(0, index, sub)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add `params.logit_bias[token]` to `logits[row, token]` (ids beyond the width are skipped)."""
    width = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        for token_id, bias in (row.params.logit_bias or {}).items():
            if token_id < width:
                row_ids.append(i)
                token_ids.append(token_id)
                values.append(bias)
    if not row_ids:
        return
    device = logits.device
    index = (torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device))
    logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: set[int]) -> None:
    """Set EOS ids and `params.stop_token_ids` to -inf for rows that have not reached `min_tokens`.

    EOS is banned even when the request sets `ignore_eos` (vLLM does the same: the flag only stops
    EOS from ending the request, it says nothing about whether EOS may be sampled early).
    """
    width = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, row in enumerate(rows):
        if not min_tokens_active(row):
            continue
        for token_id in sorted(set(eos_token_ids).union(row.params.stop_token_ids)):
            if token_id < width:
                row_ids.append(i)
                token_ids.append(token_id)
    if not row_ids:
        return
    device = logits.device
    logits[torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)] = float("-inf")


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Apply repetition, frequency and presence penalties to the rows that set any of them.

    - repetition (HF/vLLM, multiplicative, over prompt AND output tokens): a token that occurred gets
      `logit / p` when its logit is positive and `logit * p` otherwise, so p > 1 always makes it less
      likely and p < 1 more likely;
    - frequency and presence (OpenAI, additive, over OUTPUT tokens only):
      `logit -= frequency_penalty * count + presence_penalty * (count > 0)`.
    Repetition is applied first, then the additive penalties (vLLM's order).
    """
    picked = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not picked:
        return
    sub_rows = [rows[i] for i in picked]
    device = logits.device
    width = logits.shape[1]
    index = torch.tensor(picked, device=device)
    sub = logits.index_select(0, index)  # [M, width]
    output_counts = token_counts([r.output_token_ids for r in sub_rows], width, device)  # [M, width]

    repetition = [r.params.repetition_penalty for r in sub_rows]
    if any(p != 1.0 for p in repetition):
        prompt_counts = token_counts([r.prompt_token_ids for r in sub_rows], width, device)
        seen = (prompt_counts + output_counts) > 0  # [M, width]
        penalty = _column(repetition, device)  # [M, 1]
        # Rows with p == 1 divide/multiply by exactly 1.0, which leaves their logits bit-identical.
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalised, sub)

    frequency = [r.params.frequency_penalty for r in sub_rows]
    presence = [r.params.presence_penalty for r in sub_rows]
    if any(f != 0.0 for f in frequency) or any(p != 0.0 for p in presence):
        occurred = (output_counts > 0).to(sub.dtype)
        sub = sub - _column(frequency, device) * output_counts - _column(presence, device) * occurred

    logits.index_copy_(0, index, sub)


def token_counts(token_lists: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each list: float32 `[len(token_lists), width]`.

    Lists are padded to a common length with the dummy id `width`, counted with one `scatter_add_`
    into `width + 1` columns, and the dummy column is dropped. Ids >= width also land there.
    """
    num_rows = len(token_lists)
    longest = max((len(t) for t in token_lists), default=0)
    if longest == 0:
        return torch.zeros((num_rows, width), dtype=torch.float32, device=device)
    padded = [list(t) + [width] * (longest - len(t)) for t in token_lists]
    ids = torch.tensor(padded, dtype=torch.long, device=device).clamp_(0, width)  # [M, longest]
    counts = torch.zeros((num_rows, width + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :width]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row scalars as a float32 column `[M, 1]` that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
