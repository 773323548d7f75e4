"""The attention layer a model calls: projections in, paged attention, output out."""

from __future__ import annotations

import torch
from torch import nn

from helix_server.layers.attention.builder import MAX_BATCHED_QUERY_LEN
from helix_server.layers.attention.metadata import AttentionMetadata, ForwardContext
from helix_server.layers.attention.portable import paged_attention


class Attention(nn.Module):
    """Multi-head (grouped-query) causal attention over the paged KV cache of layer `layer_idx`.

    Holds no weights: the model owns the projections and RoPE; this module stores the new K/V and
    attends through the block tables in `ctx.attn_metadata`. `max_short_query_len`: the longest
    chunk it attends as a short query (in the metadata's query groups; longer ones are prompt
    chunks), for the step's metadata (`short_query_len`).
    """

    max_short_query_len = MAX_BATCHED_QUERY_LEN

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads * head_dim]
        key: torch.Tensor,  # [T, num_kv_heads * head_dim]
        value: torch.Tensor,  # [T, num_kv_heads * head_dim]
        ctx: ForwardContext,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        num_tokens = query.shape[0]
        key_cache, value_cache = ctx.kv_caches[self.layer_idx]
        out = self.attend(
            query.view(num_tokens, self.num_heads, self.head_dim),
            key.view(num_tokens, self.num_kv_heads, self.head_dim),
            value.view(num_tokens, self.num_kv_heads, self.head_dim),
            key_cache,
            value_cache,
            ctx.attn_metadata,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def attend(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store the step's K/V and attend: the portable backend (a CPU subclass overrides it)."""
        return paged_attention(
            query, key, value, key_cache, value_cache, metadata, self.scale, self.sliding_window
        )


def short_query_len(model: nn.Module) -> int:
    """The longest chunk every attention layer of `model` attends as a short query (the builder's
    `max_short_len` for its steps)."""
    lengths = [m.max_short_query_len for m in model.modules() if isinstance(m, Attention)]
    return min(lengths, default=MAX_BATCHED_QUERY_LEN)
