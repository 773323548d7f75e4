"""The paged KV pool: how many blocks it gets, and its tensors.

`allocate_kv_pool` sizes the pool for the loaded model (and draft model, which shares the block
table) with `size_kv_pool`, and allocates one (key, value) pair of
`[num_blocks, block_size, kv_heads, head_dim]` tensors per layer of each model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_server.config import CacheConfig, SchedulerConfig
from helix_server.config_validation import validate_cache_config
from helix_server.errors import ParameterError
from helix_server.layers.attention.builder import allocate_kv_caches, kv_cache_bytes_per_block
from helix_server.layers.attention.selector import TRITON, attention_backend
from helix_server.platform import device_memory
from helix_server.runner.cuda_graphs import cuda_graphs_enabled, graph_max_tokens, graph_pool_bytes

GIB = 1 << 30
# CUDA memory besides weights, KV and activations that a running engine takes: library workspaces
# (cuBLAS, Triton), the caching allocator's rounding and fragmentation. Kept out of the KV budget.
CUDA_OVERHEAD_BYTES = 256 << 20

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class KVPool:
    """The allocated pool: per layer (key_cache, value_cache) for the model and the draft model."""

    num_blocks: int
    bytes_per_block: int
    kv_caches: KVCaches
    draft_kv_caches: KVCaches | None = None

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def allocate_kv_pool(
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    model: torch.nn.Module,
    draft_model: torch.nn.Module | None,
    max_model_len: int,
    dtype: torch.dtype,
    device: torch.device,
    enforce_eager: bool = True,
) -> KVPool:
    """Size the pool (see `size_kv_pool`) once the weights are loaded, then allocate it. With CUDA
    graphs (`cuda_graphs_enabled`) their memory pool is set aside too; the Triton attention backend
    gathers nothing, so no share of the pool is kept for gathering then."""
    block_size = cache.block_size
    models = [m for m in (model, draft_model) if m is not None]
    bytes_per_block = sum(
        kv_cache_bytes_per_block(m.num_layers, block_size, m.num_kv_heads, m.head_dim, dtype) for m in models
    )
    num_blocks = size_kv_pool(
        cache,
        bytes_per_block,
        max_model_len,
        scheduler.max_num_seqs,
        device=device,
        activation_bytes=estimate_activation_bytes(model, scheduler, dtype)
        + cuda_graph_bytes(model, scheduler, dtype, device, enforce_eager),
        gather_factor=0.0 if attention_backend(device) == TRITON else attention_gather_factor(model),
    )
    caches = [
        allocate_kv_caches(m.num_layers, num_blocks, block_size, m.num_kv_heads, m.head_dim, dtype, device)
        for m in models
    ]
    return KVPool(num_blocks, bytes_per_block, caches[0], caches[1] if draft_model is not None else None)


def size_kv_pool(
    cache: CacheConfig,
    bytes_per_block: int,
    max_model_len: int,
    max_num_seqs: int,
    device: torch.device | None = None,
    activation_bytes: int = 0,
    gather_factor: float = 0.0,
) -> int:
    """Number of KV blocks: `num_kv_blocks` if set; else, on CUDA, what is left of
    `gpu_memory_utilization` of the GPU's memory once the weights are loaded and `activation_bytes`
    are set aside for a step's activations; elsewhere what `kv_cache_memory` GiB holds. Either is
    capped at what `max_num_seqs` sequences of `max_model_len` tokens could ever use.

    `gather_factor`: transient bytes a step may need per byte of KV pool (attention that gathers
    the batch's K/V through the block tables needs up to that much of the pool again, one layer at
    a time); on CUDA the pool and that share of it must fit the budget together."""
    validate_cache_config(cache)
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if device is not None and device.type == "cuda":
        free, total = device_memory(device)
        # Everything in use now (weights, CUDA context, other processes) counts against the budget.
        budget = int(total * cache.gpu_memory_utilization) - (total - free) - activation_bytes - CUDA_OVERHEAD_BYTES
        by_memory = int(max(budget, 0) / (1.0 + gather_factor)) // bytes_per_block
        if by_memory < 1:
            raise ParameterError(
                f"gpu_memory_utilization {cache.gpu_memory_utilization} of {total / GIB:.1f} GiB leaves no room "
                f"for KV blocks ({(total - free) / GIB:.1f} GiB in use, {activation_bytes / GIB:.2f} GiB set "
                "aside for activations); raise it or lower max_num_batched_tokens.",
                "gpu_memory_utilization",
            )
    else:
        by_memory = int(cache.kv_cache_memory * GIB) // bytes_per_block
        if by_memory < 1:
            raise ParameterError(
                f"kv_cache_memory {cache.kv_cache_memory} GiB holds no KV block "
                f"({bytes_per_block} bytes each).",
                "kv_cache_memory",
            )
    useful = max_num_seqs * -(-max_model_len // cache.block_size)
    return min(by_memory, useful)


def cuda_graph_bytes(
    model: torch.nn.Module, scheduler: SchedulerConfig, dtype: torch.dtype, device: torch.device, enforce_eager: bool
) -> int:
    """The memory the CUDA graphs of `model` will pin (`graph_pool_bytes`); 0 without graphs."""
    arch = getattr(model, "arch", None)
    if arch is None or not cuda_graphs_enabled(device, enforce_eager):
        return 0
    max_tokens = graph_max_tokens(scheduler.max_num_seqs, scheduler.max_num_batched_tokens)
    return graph_pool_bytes(arch.hidden_size, arch.intermediate_size, max_tokens, dtype)


def attention_gather_factor(model: torch.nn.Module) -> float:
    """Transient bytes per KV-pool byte of the portable attention: a decoding batch's K and V of
    one layer are gathered through the block tables (a copy), then widened from KV heads to query
    heads (another, `num_heads / num_kv_heads` times bigger, when they differ). At worst the whole
    pool is in the batch, so per layer (1 + widening) / num_layers of the pool."""
    arch = getattr(model, "arch", None)
    if arch is None:
        return 0.0
    group = arch.num_heads // arch.num_kv_heads
    return (1 + (group if group > 1 else 0)) / arch.num_layers


def estimate_activation_bytes(model: torch.nn.Module, scheduler: SchedulerConfig, dtype: torch.dtype) -> int:
    """A generous bound on one step's activation memory, set aside before sizing a CUDA KV pool:
    the widest per-token tensors of a layer for a full token budget, plus float32 logits (and their
    softmax) for every token of the budget (prompt logprobs may ask for them all)."""
    arch = getattr(model, "arch", None)
    if arch is None:
        return 0
    tokens = scheduler.max_num_batched_tokens
    itemsize = torch.empty((), dtype=dtype).element_size()
    # residual + normed input, fused qkv, attention output, gate_up, activation, down.
    per_token = 3 * arch.hidden_size + 2 * (arch.q_size + 2 * arch.kv_size) + 3 * arch.intermediate_size
    logits = tokens * arch.vocab_size * 4 * 2
    return 2 * tokens * per_token * itemsize + logits
