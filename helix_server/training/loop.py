"""The training loop: AdamW, linear warm-up then cosine decay, gradient clipping, progress lines.

One function trains any phase (the target on text, the draft on text, the draft distilled on the
target); what differs is the loss function, `loss_fn(model, batch) -> scalar`, where `batch` is
`[batch_size, seq_len + 1]` token ids (inputs are `batch[:, :-1]`, labels `batch[:, 1:]`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helix_server.training.presets import Phase

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
Log = Callable[[str], None]


@dataclass(frozen=True)
class PhaseResult:
    """What a phase did: optimizer steps taken, tokens seen, wall time, last logged loss."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float
    stopped_early: bool


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; plain float32 elsewhere (CPU training in bfloat16 was slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ce_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of `model` on `batch`."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [batch, seq, vocab]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def make_optimizer(model: torch.nn.Module, phase: Phase, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms), fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": phase.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=phase.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lr_at(step: int, total_steps: int, phase: Phase) -> float:
    """Learning rate of (0-based) `step`: linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    warmup = max(1, int(total_steps * phase.warmup_fraction))
    if step < warmup:
        return phase.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = phase.lr * phase.min_lr_ratio
    return floor + (phase.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_phase(
    name: str,
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    steps: int,
    phase: Phase,
    loss_fn: LossFn,
    device: torch.device,
    log: Log,
    deadline: float | None = None,
    log_every: int = 50,
) -> PhaseResult:
    """Train `model` for `steps` optimizer steps (fewer if `time.monotonic()` passes `deadline`)."""
    model.train()
    optimizer = make_optimizer(model, phase, device)
    start = last_time = time.monotonic()
    tokens = last_tokens = 0
    loss_value = float("nan")
    done = 0
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            log(f"[{name}] time is up: stopping after {done} of {steps} steps")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, phase)
        batch = next(batches).to(device, non_blocking=True)
        loss = _optimizer_step(model, optimizer, batch, phase, loss_fn, device)
        done = step + 1
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        if done % log_every == 0 or done == steps:
            loss_value = loss.item()
            now = time.monotonic()
            rate = (tokens - last_tokens) / max(now - last_time, 1e-9)
            log(
                f"[{name}] step {done}/{steps} loss {loss_value:.3f} lr {lr_at(step, steps, phase):.2e} "
                f"{rate:,.0f} tok/s elapsed {now - start:.0f}s"
            )
            last_time, last_tokens = now, tokens
    model.eval()
    if math.isnan(loss_value) and done:
        loss_value = loss.item()
    return PhaseResult(done, tokens, time.monotonic() - start, loss_value, done < steps)


def seconds_per_step(
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    phase: Phase,
    loss_fn: LossFn,
    device: torch.device,
    timed_steps: int = 3,
) -> float:
    """Measured wall time of one training step, on a throwaway copy of `model` (it stays untouched)."""
    trial = copy.deepcopy(model).train()
    optimizer = make_optimizer(trial, phase, device)
    elapsed = 0.0
    for index in range(timed_steps + 2):  # the first two steps warm up kernels and allocators
        batch = next(batches).to(device)
        _synchronize(device)
        start = time.monotonic()
        _optimizer_step(trial, optimizer, batch, phase, loss_fn, device)
        _synchronize(device)
        if index >= 2:
            elapsed += time.monotonic() - start
    del trial, optimizer
    return elapsed / timed_steps


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    phase: Phase,
    loss_fn: LossFn,
    device: torch.device,
) -> torch.Tensor:
    """One training step on `batch` (forward under autocast, backward, clip, AdamW); returns the loss."""
    with autocast(device):
        loss = loss_fn(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), phase.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
