"""How many steps each phase takes: given by the recipe, or fitted to a time budget.

For a phase without a step count, a few steps are timed on the device (on throwaway copies), and the
phase gets its share of the time left, capped at `max_epochs` passes over the training stream; time a
capped phase does not use goes to distillation. Every phase also gets a deadline (its planned time
plus a margin, never past the budget), so a slower-than-measured device still finishes in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from helix_server.training.data import random_batches
from helix_server.training.distill import distillation_loss
from helix_server.training.loop import ce_loss, seconds_per_step
from helix_server.training.presets import Recipe

PHASES = ("target", "draft", "distill")


@dataclass(frozen=True)
class StepPlan:
    """Step counts per phase, the planned seconds of budgeted phases, and the run's last moment."""

    steps: dict[str, int]
    planned_seconds: dict[str, float]
    hard_deadline: float | None

    def count(self, name: str) -> int:
        return self.steps[name]

    def deadline(self, name: str, now: float) -> float | None:
        """The `time.monotonic()` after which phase `name`, starting `now`, must stop."""
        limits = [d for d in (self.hard_deadline,) if d is not None]
        if name in self.planned_seconds:
            limits.append(now + 1.25 * self.planned_seconds[name] + 10.0)
        return min(limits) if limits else None


def plan_steps(
    recipe: Recipe,
    target: torch.nn.Module,
    draft: torch.nn.Module,
    stream: torch.Tensor,
    device: torch.device,
    deadline: float | None,
    seed: int,
    log: Callable[[str], None],
) -> StepPlan:
    """The plan described in the module docstring; `deadline` is the budget's end (`time.monotonic()`)."""
    phases = {"target": recipe.target_phase, "draft": recipe.draft_phase, "distill": recipe.distill_phase}
    steps = {name: phase.steps for name, phase in phases.items() if phase.steps is not None}
    hard = None
    if deadline is not None:
        hard = deadline - (15.0 + 0.05 * (deadline - time.monotonic()))  # held-out evaluation and saving
    open_phases = [name for name in PHASES if name not in steps]
    if not open_phases:
        log(f"steps: {steps}")
        return StepPlan(steps, {}, hard)
    if hard is None:
        raise ValueError(f"phases {open_phases} have no step count: give a time budget or their steps")

    def distill_probe(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = target(input_ids=batch[:, :-1], use_cache=False).logits  # [batch, seq, vocab]
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [batch, seq, vocab]
        return distillation_loss(logits, teacher_logits, batch[:, 1:])

    probes = {"target": (target, ce_loss), "draft": (draft, ce_loss), "distill": (draft, distill_probe)}
    generator = torch.Generator().manual_seed(seed * 1000 + 99)
    batches = random_batches(stream, recipe.batch_size, recipe.seq_len, generator)
    step_seconds = {
        name: seconds_per_step(probes[name][0], batches, phases[name], probes[name][1], device) for name in open_phases
    }
    log("seconds per step: " + ", ".join(f"{name} {s:.3f}" for name, s in step_seconds.items()))

    tokens_per_step = recipe.batch_size * recipe.seq_len
    epoch_cap = max(1, int(recipe.max_epochs * stream.numel() / tokens_per_step))
    left = max(0.0, hard - time.monotonic())
    shares = dict(zip(PHASES, recipe.time_shares))
    total_share = sum(shares[name] for name in open_phases)
    planned: dict[str, float] = {}
    spare = 0.0
    for name in open_phases:
        seconds = shares[name] / total_share * left + (spare if name == "distill" else 0.0)
        count = max(1, min(epoch_cap, int(seconds / step_seconds[name])))
        steps[name] = count
        planned[name] = count * step_seconds[name]
        spare += max(0.0, seconds - planned[name]) if name != "distill" else 0.0
    log(f"planned steps for {left:.0f}s of training: {steps} (cap {epoch_cap} steps = {recipe.max_epochs} epochs)")
    return StepPlan(steps, planned, hard)
