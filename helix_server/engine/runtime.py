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

from helix_server.config import SPECULATIVE_METHODS, CacheConfig, EngineConfig, SpeculativeConfig
from helix_server.default_model import ensure_default_model
from helix_server.engine.tokenizer import Tokenizer, load_tokenizer
from helix_server.errors import ParameterError
from helix_server.layers.attention.builder import allocate_kv_caches, kv_cache_bytes_per_block
from helix_server.models import load_hf_config, load_model
from helix_server.platform import device_description, resolve_device, resolve_dtype
from helix_server.platform.allocator import keep_freed_memory

logger = logging.getLogger("helix_server")

GIB = 1 << 30


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
    model_dir = Path(config.model.model) if config.model.model else ensure_default_model()
    device = resolve_device(config.model.device)
    if device.type == "cpu":
        keep_freed_memory()  # big activations are reused every step: don't re-fault their pages
    hf_config = load_hf_config(model_dir)
    dtype = resolve_dtype(config.model.dtype, hf_config, device)
    max_model_len = _max_model_len(config.model.max_model_len, hf_config.max_position_embeddings)
    model = load_model(model_dir, dtype, device, progress=progress, max_model_len=max_model_len)
    tokenizer = load_tokenizer(Path(config.model.tokenizer) if config.model.tokenizer else model_dir)

    validate_speculative_config(config.speculative, model.num_layers)
    draft_model = None
    if config.speculative.method == "draft":
        draft_model = _load_draft_model(config.speculative, model, dtype, device, max_model_len)

    block_size = config.cache.block_size
    bytes_per_block = sum(
        kv_cache_bytes_per_block(m.num_layers, block_size, m.num_kv_heads, m.head_dim, dtype)
        for m in (model, draft_model)
        if m is not None
    )
    num_blocks = size_kv_pool(config.cache, bytes_per_block, max_model_len, config.scheduler.max_num_seqs)
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
    depth = spec.num_speculative_tokens
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
    spec: SpeculativeConfig, model: torch.nn.Module, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> torch.nn.Module:
    draft_dir = Path(spec.draft_model)
    draft = load_model(draft_dir, dtype, device, max_model_len=max_model_len)
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


def size_kv_pool(cache: CacheConfig, bytes_per_block: int, max_model_len: int, max_num_seqs: int) -> int:
    """Number of KV blocks: `num_kv_blocks` if set, else what `kv_cache_memory` GiB holds, capped at
    what `max_num_seqs` sequences of `max_model_len` tokens could ever use."""
    if cache.block_size < 1:
        raise ParameterError("block_size must be at least 1.", "block_size")
    if cache.num_kv_blocks is not None:
        if cache.num_kv_blocks < 1:
            raise ParameterError("num_kv_blocks must be at least 1.", "num_kv_blocks")
        return cache.num_kv_blocks
    by_memory = int(cache.kv_cache_memory * GIB) // bytes_per_block
    if by_memory < 1:
        raise ParameterError(
            f"kv_cache_memory {cache.kv_cache_memory} GiB holds no KV block "
            f"({bytes_per_block} bytes each).",
            "kv_cache_memory",
        )
    useful = max_num_seqs * -(-max_model_len // cache.block_size)
    return min(by_memory, useful)


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
