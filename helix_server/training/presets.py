"""Model sizes and training schedules of the two recipes: `cpu` (about an hour on 2 cores) and `gpu`.

Step counts of the `cpu` recipe were chosen from measured throughput on the project's 2-core
machine (one torch thread: ~2.4k tokens/s for the target's training steps, ~10k for the draft's).
The `gpu` recipe has a time budget instead: the steps of each phase are set after timing a few
steps on the device (and capped at `max_epochs` passes over the training text, since the whole
standard library is only ~10M tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MAX_POSITION_EMBEDDINGS = 2048


@dataclass(frozen=True)
class ModelShape:
    """A Llama's dimensions (vocabulary size comes from the tokenizer)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class Phase:
    """One training phase: steps (None: from the time budget), peak learning rate, warm-up share."""

    steps: int | None
    lr: float
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Recipe:
    """Everything `train_default` needs besides the output directory, device and seed."""

    name: str
    vocab_size: int
    seq_len: int
    batch_size: int
    target: ModelShape
    draft: ModelShape
    target_phase: Phase
    draft_phase: Phase
    distill_phase: Phase
    include_tests: bool
    # Distillation: the student matches the teacher's distribution at this temperature; the loss is
    # kl_weight * KL + (1 - kl_weight) * CE on the text.
    distill_temperature: float = 1.0
    distill_kl_weight: float = 0.8
    # Shares of the time budget for target / draft / distillation (time-budgeted runs only).
    time_shares: tuple[float, float, float] = (0.6, 0.1, 0.3)
    max_epochs: float = 8.0
    eval_tokens: int = 131_072
    # Checkpoints are saved in float32 unless the pair would exceed this many bytes, then bfloat16.
    max_weight_bytes: int = 38_000_000
    # Wall-clock seconds for the whole run when no --time-budget is given (None: unlimited).
    time_budget_s: float | None = None


CPU = Recipe(
    name="cpu",
    vocab_size=4096,
    seq_len=256,
    batch_size=16,
    target=ModelShape(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
    draft=ModelShape(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    target_phase=Phase(steps=1200, lr=1.5e-3),
    draft_phase=Phase(steps=600, lr=3e-3),
    distill_phase=Phase(steps=700, lr=1e-3),
    include_tests=False,
)

GPU = Recipe(
    name="gpu",
    vocab_size=8192,
    seq_len=512,
    batch_size=64,
    target=ModelShape(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2),
    draft=ModelShape(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1),
    target_phase=Phase(steps=None, lr=1.5e-3),
    draft_phase=Phase(steps=None, lr=3e-3),
    distill_phase=Phase(steps=None, lr=1.5e-3),
    include_tests=True,
    eval_tokens=262_144,
    time_budget_s=420.0,
)

PRESETS = {"cpu": CPU, "gpu": GPU}


def with_steps(recipe: Recipe, target: int | None, draft: int | None, distill: int | None) -> Recipe:
    """`recipe` with the phases' step counts replaced where a count is given."""
    return replace(
        recipe,
        target_phase=replace(recipe.target_phase, steps=target if target is not None else recipe.target_phase.steps),
        draft_phase=replace(recipe.draft_phase, steps=draft if draft is not None else recipe.draft_phase.steps),
        distill_phase=replace(
            recipe.distill_phase, steps=distill if distill is not None else recipe.distill_phase.steps
        ),
    )
