"""Load what an engine runs on and work out the values only known at run time.

`load_components(config)` resolves the device and dtype, loads the model and tokenizer, sizes and
allocates the KV pool, and returns them with a `RuntimeInfo` (the values learned here never go back
into the frozen config).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from helix_server.config import (
    SPECULATIVE_METHODS,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from helix_server.default_model import ensure_default_model
from helix_server.engine.tokenizer import Tokenizer, load_tokenizer
from helix_server.errors import ParameterError
from helix_server.layers.attention.builder import allocate_kv_caches, kv_cache_bytes_per_block
from helix_server.models import load_hf_config, load_model
from helix_server.platform import device_description, resolve_device, resolve_dtype
from helix_server.platform.allocator import keep_freed_memory

logger = logging.getLogger("helix_server")

GIB = 1 << 30
# CUDA memory besides weights, KV and activations that a running engine takes: library workspaces
# (cuBLAS, Triton), the caching allocator's rounding and fragmentation. Kept out of the KV budget.
CUDA_OVERHEAD_BYTES = 256 << 20


@dataclass(frozen=True)
class RuntimeInfo:
    """Facts about the running engine that the config does not hold."""

    model_dir: Path
    model_name: str
    device: torch.device
    dtype: torch.dtype
    block_size: int
    num_kv_blocks: int
    kv_cache_bytes: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]

    @property
    def kv_pool_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


@dataclass
class EngineComponents:
    """A loaded model, its tokenizer, its KV cache tensors and the runtime facts."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    runtime: RuntimeInfo
    # Speculative decoding's draft model ("draft" method) and its own KV caches, on the same blocks.
    draft_model: torch.nn.Module | None = None
    draft_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def load_components(
    config: EngineConfig, progress: Callable[[int, int], None] | None = None
) -> EngineComponents:
    """Load model and tokenizer named by `config` (the embedded default when none) and allocate KV."""
    # No model: the shipped default target. Entry points (the CLI, `LLM`) first apply
    # `with_default_model`, which also makes the shipped draft its speculative proposer.
    model_dir = Path(config.model.model) if config.model.model else ensure_default_model()
    device = resolve_device(config.model.device)
    if device.type == "cpu":
        keep_freed_memory()  # big activations are reused every step: don't re-fault their pages
    hf_config = load_hf_config(model_dir)
    dtype = resolve_dtype(config.model.dtype, hf_config, device)
    max_model_len = _max_model_len(config.model.max_model_len, hf_config.max_position_embeddings)
    model = load_model(
        model_dir,
        dtype,
        device,
        progress=progress,
        max_model_len=max_model_len,
        cpu_kernels=config.model.cpu_kernels,
        quantization=config.model.quantization,
    )
    tokenizer = load_tokenizer(Path(config.model.tokenizer) if config.model.tokenizer else model_dir)

    validate_speculative_config(config.speculative, model.num_layers)
    draft_model = None
    if config.speculative.method == "draft":
        draft_model = _load_draft_model(
            config.speculative, model, dtype, device, max_model_len, config.model.cpu_kernels
        )

    block_size = config.cache.block_size
    bytes_per_block = sum(
        kv_cache_bytes_per_block(m.num_layers, block_size, m.num_kv_heads, m.head_dim, dtype)
        for m in (model, draft_model)
        if m is not None
    )
    num_blocks = size_kv_pool(
        config.cache,
        bytes_per_block,
        max_model_len,
        config.scheduler.max_num_seqs,
        device=device,
        activation_bytes=estimate_activation_bytes(model, config.scheduler, dtype),
        gather_factor=attention_gather_factor(model),
    )
    kv_caches = allocate_kv_caches(
        model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim, dtype, device
    )
    draft_kv_caches = None
    if draft_model is not None:
        draft_kv_caches = allocate_kv_caches(
            draft_model.num_layers, num_blocks, block_size, draft_model.num_kv_heads, draft_model.head_dim, dtype, device
        )
    runtime = RuntimeInfo(
        model_dir=model_dir,
        model_name=config.model.served_model_name or model_dir.name,
        device=device,
        dtype=dtype,
        block_size=block_size,
        num_kv_blocks=num_blocks,
        kv_cache_bytes=num_blocks * bytes_per_block,
        max_model_len=max_model_len,
        vocab_size=model.vocab_size,
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
    )
    logger.info(
        "model %s on %s (%s), max_model_len %d; KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB",
        model_dir,
        device_description(device),
        str(dtype).removeprefix("torch."),
        max_model_len,
        num_blocks,
        block_size,
        runtime.kv_pool_tokens,
        runtime.kv_cache_bytes / (1 << 20),
    )
    return EngineComponents(
        model=model,
        tokenizer=tokenizer,
        kv_caches=kv_caches,
        runtime=runtime,
        draft_model=draft_model,
        draft_kv_caches=draft_kv_caches,
    )


def validate_speculative_config(spec: SpeculativeConfig, num_layers: int) -> None:
    """Raise `ParameterError` for speculative settings that cannot work with this model."""
    if spec.method not in SPECULATIVE_METHODS:
        raise ParameterError(
            f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, got {spec.method!r}.",
            "speculative_method",
        )
    depth = spec.depth
    if not (depth == "auto" or (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0)):
        raise ParameterError(
            f"num_speculative_tokens must be a count >= 0 or 'auto', got {depth!r}.", "num_speculative_tokens"
        )
    if spec.max_speculative_tokens < 1:
        raise ParameterError("max_speculative_tokens must be at least 1.", "max_speculative_tokens")
    if spec.method == "draft" and not spec.draft_model:
        raise ParameterError("speculative_method 'draft' needs --draft-model.", "draft_model")
    if not 1 <= spec.ngram_min <= spec.ngram_max:
        raise ParameterError("ngram_min and ngram_max need 1 <= ngram_min <= ngram_max.", "ngram_min")
    if spec.method == "layer-skip" and num_layers < 2:
        raise ParameterError("layer-skip needs a model with at least 2 layers.", "draft_layers")
    if spec.draft_layers is not None and not 1 <= spec.draft_layers < num_layers:
        raise ParameterError(
            f"draft_layers must be between 1 and {num_layers - 1} (the model has {num_layers} layers).",
            "draft_layers",
        )


def _load_draft_model(
    spec: SpeculativeConfig,
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    cpu_kernels: bool,
) -> torch.nn.Module:
    draft_dir = Path(spec.draft_model)
    draft = load_model(draft_dir, dtype, device, max_model_len=max_model_len, cpu_kernels=cpu_kernels)
    if draft.vocab_size != model.vocab_size:
        raise ParameterError(
            f"the draft model's vocabulary ({draft.vocab_size} tokens) differs from the model's "
            f"({model.vocab_size}); a draft must share the target's tokenizer.",
            "draft_model",
        )
    if draft.max_position_embeddings < max_model_len:
        raise ParameterError(
            f"the draft model's context ({draft.max_position_embeddings}) is shorter than max_model_len "
            f"({max_model_len}).",
            "draft_model",
        )
    logger.info("draft model %s: %d layers", draft_dir, draft.num_layers)
    return draft


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
    if cache.block_size < 1:
        raise ParameterError("block_size must be at least 1.", "block_size")
    if cache.num_kv_blocks is not None:
        if cache.num_kv_blocks < 1:
            raise ParameterError("num_kv_blocks must be at least 1.", "num_kv_blocks")
        return cache.num_kv_blocks
    if device is not None and device.type == "cuda":
        if not 0.0 < cache.gpu_memory_utilization <= 1.0:
            raise ParameterError("gpu_memory_utilization must be in (0, 1].", "gpu_memory_utilization")
        torch.cuda.empty_cache()  # what loading freed is not ours to keep
        free, total = torch.cuda.mem_get_info(device)
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


def _max_model_len(requested: int | None, max_position_embeddings: int) -> int:
    if requested is None:
        return max_position_embeddings
    if requested < 1 or requested > max_position_embeddings:
        raise ParameterError(
            f"max_model_len must be between 1 and the model's max_position_embeddings "
            f"({max_position_embeddings}), got {requested}.",
            "max_model_len",
        )
    return requested
