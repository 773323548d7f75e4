"""Build the `Speculator` that `--speculative-method` asks for, from the loaded model(s)."""

from __future__ import annotations

import logging

import torch

from helix_server.config import SpeculativeConfig
from helix_server.sample.generators import RequestGenerators
from helix_server.sample.sampler import Sampler
from helix_server.spec_decode.acceptance_monitor import AcceptanceMonitor
from helix_server.spec_decode.depth_policy import DepthPolicy
from helix_server.spec_decode.model_proposer import ModelProposer
from helix_server.spec_decode.ngram import NgramProposer
from helix_server.spec_decode.proposer import Proposer
from helix_server.spec_decode.speculator import Speculator

logger = logging.getLogger("helix_server")

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def build_speculator(
    spec: SpeculativeConfig,
    sampler: Sampler,
    generators: RequestGenerators,
    model: torch.nn.Module,
    kv_caches: KVCaches,
    block_size: int,
    device: torch.device,
    draft_model: torch.nn.Module | None = None,
    draft_kv_caches: KVCaches | None = None,
) -> Speculator | None:
    """The speculator for `spec.method`, or None when speculation is off."""
    if spec.method == "none" or spec.resolved_num_speculative_tokens == 0:
        return None
    if spec.method == "ngram":
        proposer: Proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
        prior_draft_cost = 0.0
    elif spec.method == "draft":
        proposer = ModelProposer(draft_model, draft_kv_caches, block_size, device, own_kv_cache=True)
        prior_draft_cost = (draft_model.num_layers * draft_model.head_dim * draft_model.num_kv_heads) / (
            model.num_layers * model.head_dim * model.num_kv_heads
        )
    else:  # layer-skip: the model's own first layers, its final norm and LM head, on its own KV cache
        num_layers = draft_layers(spec, model.num_layers)
        proposer = ModelProposer(model, kv_caches, block_size, device, num_layers=num_layers, own_kv_cache=False)
        prior_draft_cost = num_layers / model.num_layers
    logger.info(
        "speculative decoding: %s, %s tokens per step",
        spec.method if spec.method != "layer-skip" else f"layer-skip ({draft_layers(spec, model.num_layers)} layers)",
        "auto (up to %d)" % spec.max_speculative_tokens if spec.adaptive else spec.num_speculative_tokens_or_auto,
    )
    depth_policy = DepthPolicy(
        num_speculative_tokens=spec.resolved_num_speculative_tokens,
        adaptive=spec.adaptive,
        prior_draft_cost=prior_draft_cost,
    )
    # A fixed depth warns when its drafts are rarely accepted (`auto` backs off by itself).
    monitor = None if spec.adaptive else AcceptanceMonitor(spec.resolved_num_speculative_tokens)
    return Speculator(proposer, sampler, generators, depth_policy, monitor)


def draft_layers(spec: SpeculativeConfig, num_layers: int) -> int:
    """layer-skip's draft depth: `--draft-layers`, else a quarter of the model (at least 1)."""
    return spec.draft_layers if spec.draft_layers is not None else max(1, num_layers // 4)
