"""Held-out evaluation with plain torch: per-token loss, and how often the draft agrees with the target.

`greedy_agreement` is the teacher-forced share of positions where the draft's most likely next token
is the target's; it approximates greedy speculative decoding's per-token acceptance rate (the real
one, through helix's engine, is measured by `bench/default_model_eval.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helix_server.training.loop import autocast


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy in nats per token over `windows` `[num, seq_len + 1]`."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        with autocast(device):
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits  # [batch, seq, vocab]
        losses = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        total += losses.item()
        count += chunk[:, 1:].numel()
    return total / count


@torch.no_grad()
def greedy_agreement(
    target: torch.nn.Module, draft: torch.nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8
) -> float:
    """Share of held-out positions where `argmax draft == argmax target` (teacher-forced)."""
    target.eval()
    draft.eval()
    same, count = 0, 0
    for chunk in windows.split(batch_size):
        inputs = chunk[:, :-1].to(device)
        with autocast(device):
            target_ids = target(input_ids=inputs, use_cache=False).logits.argmax(-1)  # [batch, seq]
            draft_ids = draft(input_ids=inputs, use_cache=False).logits.argmax(-1)  # [batch, seq]
        same += (target_ids == draft_ids).sum().item()
        count += target_ids.numel()
    return same / count
