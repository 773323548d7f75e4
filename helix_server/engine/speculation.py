"""Build the proposer that `--speculative-method` asks for, from loaded components, and watch that
a fixed depth's drafts are worth it (`AcceptanceMonitor`)."""

from __future__ import annotations

import logging
import time

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


# A fixed depth whose drafts are accepted less often than this is very likely slower than no
# speculation (with k = 3 and a drafter a quarter of the model, alpha = 0.25 yields 1.33 tokens per
# step for 1.75 steps' worth of work), judged over at least this many drafted tokens.
LOW_ACCEPTANCE_RATE = 0.25
LOW_ACCEPTANCE_MIN_DRAFTED = 128
# At most one warning per this many seconds.
LOW_ACCEPTANCE_WARN_EVERY_S = 600.0


class AcceptanceMonitor:
    """Warns (rate-limited) when a fixed speculation depth drafts tokens that are rarely accepted.

    Counts drafted and accepted tokens; every `LOW_ACCEPTANCE_MIN_DRAFTED` drafted tokens it judges
    the acceptance rate of that window and starts a new one. `auto` needs no warning: it stops
    drafting where drafting does not pay.
    """

    def __init__(self, depth: int, clock=time.monotonic) -> None:
        self.depth = depth
        self._clock = clock
        self._drafted = 0
        self._accepted = 0
        self._last_warning: float | None = None

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """A request's `num_drafts` drafted tokens were verified and `num_accepted` kept."""
        self._drafted += num_drafts
        self._accepted += num_accepted
        if self._drafted < LOW_ACCEPTANCE_MIN_DRAFTED:
            return
        rate = self._accepted / self._drafted
        drafted, accepted = self._drafted, self._accepted
        self._drafted = self._accepted = 0
        now = self._clock()
        if rate >= LOW_ACCEPTANCE_RATE:
            return
        if self._last_warning is not None and now - self._last_warning < LOW_ACCEPTANCE_WARN_EVERY_S:
            return
        self._last_warning = now
        logger.warning(
            "speculative decoding: only %.0f%% of drafted tokens are accepted (%d of the last %d) at a "
            "fixed --num-speculative-tokens %d, so it is probably slower than no speculation; use "
            "--num-speculative-tokens auto (drafts only where it measures a gain) or "
            "--speculative-method none",
            100 * rate,
            accepted,
            drafted,
            self.depth,
        )
