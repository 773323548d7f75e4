"""Per-step attention metadata: where each new token's K/V goes and which cached K/V each query reads.

Built once per step by the runner (from the scheduler's block tables) and shared by every layer.
Token order in the flattened batch: all single-token queries first (decodes, and one-token chunks),
then the multi-token chunks (prompt chunks, recomputation after preemption, verification of drafts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    """One request's multi-token query: rows [token_start, token_end) of the batch.

    `context_len` tokens of this request are already in the cache; the chunk's queries sit at
    positions context_len .. context_len + num_tokens - 1. When `context_len` is 0 the keys are the
    chunk's own K/V and `block_table` is not needed.
    """

    token_start: int
    token_end: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks] int64

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_tokens


@dataclass
class DecodeGroup:
    """Single-token queries at rows [token_start, token_end) that attend in one batched call.

    Rows come sorted by length and are grouped so that padding every row to its group's longest
    (`block_tables` is 0-padded) wastes little: gathering and attending over padding costs as much
    as over real keys.
    """

    token_start: int
    token_end: int
    block_tables: torch.Tensor  # [n, max_num_blocks] int64 (0-padded)
    seq_lens: torch.Tensor  # [n] int64: keys per row, the new token included


@dataclass
class AttentionMetadata:
    """Everything an attention layer needs to write and read the paged KV cache for one step."""

    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: physical slot (block_id * block_size + offset)
    num_decode_tokens: int  # the first rows are single-token queries, in `decode_groups`
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    # The dtype of queries and keys (masks are built in it).
    dtype: torch.dtype = torch.float32
    # Masks depend only on the metadata and the sliding window, so the first layer builds them and
    # the others reuse them.
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, index: int, sliding_window: int | None) -> torch.Tensor:
        """[n, 1, 1, S] additive float mask of decode group `index`: 0 where a query may attend key
        slot j, -inf elsewhere (float, not bool: SDPA would convert a bool mask in every layer)."""
        key = ("decode", index, sliding_window)
        mask = self._masks.get(key)
        if mask is None:
            group = self.decode_groups[index]
            num_slots = group.block_tables.shape[1] * self.block_size
            j = torch.arange(num_slots, device=group.seq_lens.device)
            seq_lens = group.seq_lens[:, None]
            mask = j[None, :] < seq_lens
            if sliding_window is not None:
                # The query sits at position seq_len - 1 and sees keys with pos > q_pos - window.
                mask &= j[None, :] >= seq_lens - sliding_window
            mask = _additive(mask[:, None, None, :], self.dtype)
            self._masks[key] = mask
        return mask

    def prefill_mask(self, index: int, sliding_window: int | None) -> torch.Tensor | None:
        """[num_tokens, seq_len] additive float mask for chunk `index`, or None when plain causal
        attention is exact."""
        chunk = self.prefills[index]
        if chunk.context_len == 0 and sliding_window is None:
            return None
        key = ("prefill", index, sliding_window)
        mask = self._masks.get(key)
        if mask is None:
            device = chunk.block_table.device
            q_pos = torch.arange(chunk.context_len, chunk.seq_len, device=device)[:, None]
            k_pos = torch.arange(chunk.seq_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            mask = _additive(mask, self.dtype)
            self._masks[key] = mask
        return mask


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" -> additive mask: 0 where allowed, -inf where not."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass
class ForwardContext:
    """What a model forward needs besides token ids and positions: this step's metadata and the
    per-layer KV cache tensors `(key_cache, value_cache)`, each [num_blocks, block_size, kv_heads, head_dim]."""

    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
