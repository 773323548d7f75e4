"""Build the proposer that `--speculative-method` asks for, from loaded components."""

from __future__ import annotations

import logging

from helix_server.config import SpeculativeConfig
from helix_server.engine.runtime import EngineComponents
from helix_server.spec.model_proposer import ModelProposer
from helix_server.spec.ngram import NgramProposer
from helix_server.spec.proposer import Proposer

logger = logging.getLogger("helix_server")


def build_proposer(spec: SpeculativeConfig, components: EngineComponents) -> Proposer | None:
    """The proposer for `spec.method`, or None when speculation is off."""
    runtime = components.runtime
    method = spec.method
    if method == "none" or spec.max_depth == 0:
        return None
    if method == "ngram":
        proposer: Proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
    elif method == "draft":
        proposer = ModelProposer(
            components.draft_model, components.draft_kv_caches, runtime.block_size, runtime.device, own_kv_cache=True
        )
    else:  # layer-skip: the model's own first layers, its final norm and LM head, on its own KV cache
        proposer = ModelProposer(
            components.model,
            components.kv_caches,
            runtime.block_size,
            runtime.device,
            num_layers=draft_layers(spec, components.model.num_layers),
            own_kv_cache=False,
        )
    logger.info(
        "speculative decoding: %s, %s tokens per step",
        method if method != "layer-skip" else f"layer-skip ({draft_layers(spec, components.model.num_layers)} layers)",
        "auto (up to %d)" % spec.max_speculative_tokens if spec.adaptive else spec.depth,
    )
    return proposer


def draft_layers(spec: SpeculativeConfig, num_layers: int) -> int:
    """layer-skip's draft depth: `--draft-layers`, else a quarter of the model (at least 1)."""
    return spec.draft_layers if spec.draft_layers is not None else max(1, num_layers // 4)


def prior_draft_cost(spec: SpeculativeConfig, components: EngineComponents) -> float:
    """A first guess of a drafting step's cost relative to a model step, before any measurement."""
    model = components.model
    if spec.method == "ngram":
        return 0.0
    if spec.method == "layer-skip":
        return draft_layers(spec, model.num_layers) / model.num_layers
    draft = components.draft_model
    return draft.num_layers * draft.head_dim * draft.num_kv_heads / (model.num_layers * model.head_dim * model.num_kv_heads)
