"""Load what the runner runs on: the model (and a draft model), and the KV pool sized for them.

`load_model(config)` resolves the device and dtype, loads the weights, sizes and allocates the KV
pool, and returns them with a `RuntimeInfo` (the values learned here never go back into the frozen
config). The tokenizer is the engine's business, not the runner's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from helix_server.config import EngineConfig
from helix_server.config_validation import validate_against_checkpoint, validate_engine_config
from helix_server.errors import ParameterError
from helix_server.models import load_hf_config, open_gguf
from helix_server.models import load_model as load_weights
from helix_server.platform import device_description, resolve_device, resolve_dtype
from helix_server.runner.kv_cache import KVCaches, allocate_kv_pool

logger = logging.getLogger("helix_server")


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
    # The model's context (--max-model-len, else the checkpoint's max_position_embeddings).
    max_model_len: int
    vocab_size: int

    @property
    def kv_pool_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


@dataclass
class LoadedModel:
    """A loaded model, its KV cache tensors and the runtime facts."""

    model: torch.nn.Module
    kv_caches: KVCaches
    runtime: RuntimeInfo
    # Speculative decoding's draft model ("draft" method) and its own KV caches, on the same blocks.
    draft_model: torch.nn.Module | None = None
    draft_kv_caches: KVCaches | None = None


def load_model(
    config: EngineConfig,
    progress: Callable[[int, int], None] | None = None,
    gguf_config: Callable[[], dict[str, Any] | None] | None = None,
) -> LoadedModel:
    """Load the model named by `config` and allocate its KV pool.

    The entry points (the CLI, `LLM`) have chosen the model (`with_default_model`): a config that
    names none is an error here, never a second choice of default. `gguf_config` returns the config
    values transformers reads from a GGUF model's metadata when they are read elsewhere (the engine
    reads them with the tokenizer, `engine.checkpoint_reading`); without it they are read here.
    """
    if not config.model.model:
        raise ValueError("the config names no model: entry points resolve it with `with_default_model`")
    validate_engine_config(config)
    model_dir = Path(config.model.model)
    device = resolve_device(config.model.device)
    gguf = open_gguf(model_dir)  # parsed once, for its config and its weights
    if gguf is not None:
        hf_config = gguf.hf_config(gguf_config() if gguf_config is not None else None)
    else:
        hf_config = load_hf_config(model_dir)
    dtype = resolve_dtype(config.model.dtype, hf_config, device)
    max_model_len = _max_model_len(config.model.max_model_len, hf_config.max_position_embeddings)
    spec = config.speculative
    draft_hf_config = load_hf_config(Path(spec.draft_model)) if spec.method == "draft" else None
    validate_against_checkpoint(spec, hf_config, draft_hf_config, max_model_len)
    model = load_weights(
        model_dir,
        dtype,
        device,
        progress=progress,
        max_model_len=max_model_len,
        cpu_kernels=config.model.cpu_kernels,
        quantization=config.model.quantization,
        hf_config=hf_config,
        gguf=gguf,
    )
    del gguf  # its map of the file: the weights are copied out of it

    draft_model = None
    if spec.method == "draft":
        draft_model = load_weights(
            Path(spec.draft_model), dtype, device, max_model_len=max_model_len, cpu_kernels=config.model.cpu_kernels
        )
        logger.info("draft model %s: %d layers", spec.draft_model, draft_model.num_layers)

    pool = allocate_kv_pool(
        config.cache, config.scheduler, model, draft_model, max_model_len, dtype, device, config.model.enforce_eager
    )
    runtime = RuntimeInfo(
        model_dir=model_dir,
        model_name=config.model.served_model_name or model_dir.name,
        device=device,
        dtype=dtype,
        block_size=config.cache.block_size,
        num_kv_blocks=pool.num_blocks,
        kv_cache_bytes=pool.num_bytes,
        max_model_len=max_model_len,
        vocab_size=model.vocab_size,
    )
    logger.info(
        "model %s on %s (%s), max_model_len %d; KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB",
        model_dir,
        device_description(device),
        str(dtype).removeprefix("torch."),
        max_model_len,
        pool.num_blocks,
        runtime.block_size,
        runtime.kv_pool_tokens,
        runtime.kv_cache_bytes / (1 << 20),
    )
    return LoadedModel(model, pool.kv_caches, runtime, draft_model, pool.draft_kv_caches)


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
