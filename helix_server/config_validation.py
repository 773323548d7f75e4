"""Checks on an `EngineConfig` that run before any weight is loaded.

`validate_engine_config` checks what the settings alone decide (speculation, cache sizes);
`validate_against_checkpoint` checks them against the checkpoints' configs (`config.json` or GGUF
metadata: layers, vocabulary, context), which are read before the weights. A bad setting is a
`ParameterError` naming it, at once, not after a long load.
"""

from __future__ import annotations

from typing import Any

from helix_server.config import SPECULATIVE_METHODS, CacheConfig, EngineConfig, SpeculativeConfig
from helix_server.errors import ParameterError


def validate_engine_config(config: EngineConfig) -> None:
    """Raise `ParameterError` for settings that cannot work with any model."""
    validate_speculative_config(config.speculative)
    validate_cache_config(config.cache)
    if config.model.max_model_len is not None and config.model.max_model_len < 1:
        raise ParameterError(f"max_model_len must be at least 1, got {config.model.max_model_len}.", "max_model_len")


def validate_speculative_config(spec: SpeculativeConfig) -> None:
    """The speculative settings on their own: a known method, a valid depth, a draft model to draft with."""
    if spec.method not in SPECULATIVE_METHODS:
        raise ParameterError(
            f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, got {spec.method!r}.",
            "speculative_method",
        )
    depth = spec.num_speculative_tokens_or_auto
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


def validate_cache_config(cache: CacheConfig) -> None:
    """Block size, an exact block count, and the GPU memory share."""
    if cache.block_size < 1:
        raise ParameterError("block_size must be at least 1.", "block_size")
    if cache.num_kv_blocks is not None and cache.num_kv_blocks < 1:
        raise ParameterError("num_kv_blocks must be at least 1.", "num_kv_blocks")
    if not 0.0 < cache.gpu_memory_utilization <= 1.0:
        raise ParameterError("gpu_memory_utilization must be in (0, 1].", "gpu_memory_utilization")


def validate_against_checkpoint(
    spec: SpeculativeConfig, hf_config: Any, draft_hf_config: Any | None, max_model_len: int
) -> None:
    """The speculative settings against the model's (and draft model's) checkpoint config."""
    num_layers = hf_config.num_hidden_layers
    if spec.method == "layer-skip" and num_layers < 2:
        raise ParameterError("layer-skip needs a model with at least 2 layers.", "draft_layers")
    if spec.draft_layers is not None and not 1 <= spec.draft_layers < num_layers:
        raise ParameterError(
            f"draft_layers must be between 1 and {num_layers - 1} (the model has {num_layers} layers).",
            "draft_layers",
        )
    if draft_hf_config is None:
        return
    if draft_hf_config.vocab_size != hf_config.vocab_size:
        raise ParameterError(
            f"the draft model's vocabulary ({draft_hf_config.vocab_size} tokens) differs from the model's "
            f"({hf_config.vocab_size}); a draft must share the target's tokenizer.",
            "draft_model",
        )
    if draft_hf_config.max_position_embeddings < max_model_len:
        raise ParameterError(
            f"the draft model's context ({draft_hf_config.max_position_embeddings}) is shorter than max_model_len "
            f"({max_model_len}).",
            "draft_model",
        )
