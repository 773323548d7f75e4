"""`TritonAttention`: the attention layer on CUDA with Triton's paged kernels (no gather, one launch).

Every row of a step (decodes, verification rows, prompt chunks with or without a cached prefix)
goes through one `paged_attention` launch over the flat per-token layout (`paged_inputs`), after
one `store_kv` launch; see `triton_kernels` for why a position's bits do not depend on how many
query rows its request has in the step.
"""

from __future__ import annotations

import torch
from torch import nn

from helix_server.layers.attention.layer import Attention
from helix_server.layers.attention.metadata import AttentionMetadata
from helix_server.layers.attention.paged_inputs import paged_inputs_of
from helix_server.layers.attention.triton_kernels import paged_attention, store_kv


class TritonAttention(Attention):
    """`Attention` whose K/V store and attention are Triton kernels reading the paged cache in place."""

    def attend(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        store_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
        inputs = paged_inputs_of(metadata)
        return paged_attention(
            query, key_cache, value_cache, inputs.block_table, inputs.token_seq, inputs.token_pos,
            self.scale, self.sliding_window,
        )


def use_triton_attention(model: nn.Module) -> int:
    """Swap `model`'s `Attention` layers for `TritonAttention`, in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is Attention:
                setattr(
                    module, name,
                    TritonAttention(
                        child.num_heads, child.num_kv_heads, child.head_dim, child.layer_idx, child.scale,
                        child.sliding_window,
                    ),
                )
                count += 1
    return count
