"""Decoder layers on the CPU with helix's fused kernels (`cpu_kernels/fused_ops.cpp`, `paged_attention.cpp`).

A decode step of a small model on the CPU spends a fifth of its time between the linear layers:
~25 torch kernels a layer (RMSNorm alone is seven), each costing ~5-15 us of dispatch and cold
caches on a few rows right after a weight stream. `use_fused_cpu_ops` swaps the pieces of a loaded
float32 or bfloat16 model for versions that run one fused kernel each (at load, where
`helix_server.models.cpu_kernel_choice` chooses helix's kernels):

* `RMSNorm` -> `FusedRMSNorm` (residual add + norm in one pass; 2-D inputs, the q/k norms of 3-D
  heads keep torch's ops);
* `SiluAndMul` -> `FusedSiluAndMul`;
* `RotaryEmbedding` -> `FusedRotaryEmbedding` (same bits as the torch ops);
* `Attention` -> `FusedAttention`: the K/V store in one kernel (same bits as `write_kv_cache`)
  and the short queries' attention in one kernel per query group, reading the paged cache in
  place (`paged_attention.cpp`, or in bfloat16 on CPUs with AMX `paged_attention_amx.cpp`; rows
  independent of the batch and of the query length).

In bfloat16 the kernels widen their inputs to float32 exactly, compute in float32 and round to
bfloat16 where the torch ops they replace round. The attention kernel rounds each output once, so
a bfloat16 position too gets the same bits as a decode and as a verified draft, which keeps greedy
speculative decoding lossless in bfloat16 (SDPA's bits change with the query length).

The norm and the activation round differently in the last bit (another summation order, another
exp); every row's result still depends on that row alone. Measured on the ~100M benchmark Llama
(`bench/decode_profile.py`, 2-core AVX-512 CPU, helix's panel kernel for the linear layers): a
batch-1 decode step 18.4-18.6 ms with torch's ops, 16.5-16.7 ms with the fused element-wise ops,
16.4-16.7 ms with the attention kernel too; 16 requests 39.4-40.6, 36.3-37.1 and 33.8-34.5 ms.
"""

from __future__ import annotations

import torch
from torch import nn

from helix_server.layers.activation import SiluAndMul
from helix_server.layers.attention import Attention, AttentionMetadata
from helix_server.layers.attention.portable import prefill_attention
from helix_server.layers.norm import RMSNorm
from helix_server.layers.panel_linear import amx_available
from helix_server.layers.rotary import RotaryEmbedding


class FusedRMSNorm(RMSNorm):
    """`RMSNorm` with the residual add and the norm in one kernel for 2-D inputs."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2:  # q/k norms over [T, heads, d] views
            return super().forward(x, residual)
        if residual is None:
            return torch.ops.helix.rms_norm(x, self.weight, self.eps)  # [T, hidden]
        return torch.ops.helix.add_rms_norm_(residual, x, self.weight, self.eps), residual


class FusedSiluAndMul(SiluAndMul):
    """`SiluAndMul` in one kernel: [T, 2I] -> [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.helix.silu_and_mul(x)


class FusedRotaryEmbedding(RotaryEmbedding):
    """`RotaryEmbedding` whose in-place rotation is one kernel (same bits as the torch ops)."""

    def rotate_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        torch.ops.helix.rotary_(x, cos, sin)
        return x


def store_kv(
    key: torch.Tensor,  # [T, kv_heads, head_dim]
    value: torch.Tensor,  # [T, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """`write_kv_cache` in one kernel: non-finite values stored as 0, the rest unchanged."""
    torch.ops.helix.store_kv_(key_cache, value_cache, key, value, slot_mapping)


def amx_attention_supported(head_dim: int) -> bool:
    """Whether bfloat16 short queries of this head size run `helix::paged_query_attention_amx` here
    (`paged_attention_amx.cpp`): AMX is available, and head_dim is a multiple of 32 up to 128. The
    kernel also needs a block size that is a multiple of 16, checked per call."""
    return head_dim % 32 == 0 and head_dim <= 128 and amx_available()


class FusedAttention(Attention):
    """`Attention` whose K/V store is one kernel and whose short queries (decodes, verification of
    drafts) attend the paged cache in place, one call per query group: `helix::paged_query_attention`,
    or in bfloat16 with `use_amx` (and a block size that is a multiple of 16)
    `helix::paged_query_attention_amx`, the same contract on AMX's tiles. Prompt chunks keep the
    portable SDPA path.

    Chunks of up to 64 tokens count as short queries here (16 elsewhere): the kernels compute each
    row over exactly its keys, so a chunk after a long cached prefix (16 requests' 10-30-word
    questions after a shared 1,300-token prompt) needs no gathered copy of its keys for SDPA; that
    step took 0.27 s instead of 0.41 in bfloat16, 0.65 instead of 0.87 in float32."""

    max_short_query_len = 64

    def __init__(self, *args, use_amx: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_amx = use_amx

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
        window = self.sliding_window or 0
        amx = self.use_amx and query.dtype == torch.bfloat16 and key_cache.shape[1] % 16 == 0
        op = torch.ops.helix.paged_query_attention_amx if amx else torch.ops.helix.paged_query_attention
        parts = [
            op(
                query[group.token_start : group.token_end], key_cache, value_cache, group.block_tables,
                group.seq_lens, group.query_len, self.scale, window,
            )  # [rows, heads, d]
            for group in metadata.merged_query_groups()  # rows read exactly their keys: no key-length classes
        ]
        parts += prefill_attention(
            query, key, value, key_cache, value_cache, metadata, self.scale, self.sliding_window
        )
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# The dtypes the fused kernels take.
FUSED_DTYPES = (torch.float32, torch.bfloat16)


def use_fused_cpu_ops(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Swap `model`'s norms, activations, RoPE and attention layers for the fused CPU kernels, in
    place (float32 and bfloat16 CPU models, after `load_cpu_kernels()` returned True; other dtypes
    keep torch's ops); returns how many were swapped."""
    if dtype not in FUSED_DTYPES:
        return 0
    count = 0
    fused_rotary: dict[int, FusedRotaryEmbedding] = {}  # id of a shared RotaryEmbedding -> its swap
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is RMSNorm:
                fused = FusedRMSNorm(child.weight.shape[0], child.eps)
                fused.weight = child.weight
                setattr(module, name, fused)
                count += 1
            elif type(child) is SiluAndMul:
                setattr(module, name, FusedSiluAndMul())
                count += 1
            elif type(child) is Attention:
                fused = FusedAttention(
                    child.num_heads, child.num_kv_heads, child.head_dim, child.layer_idx, child.scale,
                    child.sliding_window,
                    use_amx=dtype == torch.bfloat16 and amx_attention_supported(child.head_dim),
                )
                setattr(module, name, fused)
                count += 1
        rotary = getattr(module, "rotary", None)
        if type(rotary) is RotaryEmbedding:
            if id(rotary) not in fused_rotary:
                fused = FusedRotaryEmbedding(rotary.rope, rotary.head_dim, rotary.max_position_embeddings)
                fused.cos_sin_cache = rotary.cos_sin_cache  # the table is shared, not copied
                fused_rotary[id(rotary)] = fused
                count += 1
            module.rotary = fused_rotary[id(rotary)]
    return count
