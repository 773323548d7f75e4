"""Distillation of the draft on the target: match the target's next-token distribution.

The loss is `kl_weight * T^2 * KL(p_target^T || p_draft^T) + (1 - kl_weight) * CE(draft, text)`, where
`p^T` is a softmax at temperature `T` (Hinton et al. 2015; `T^2` keeps the gradient scale independent
of `T`). Speculative decoding accepts a drafted token with probability `min(1, p(x) / q(x))`; its
expected acceptance is `1 - TV(p, q)`, which the forward KL bounds (Pinsker), so this is the
objective that raises the acceptance rate, not just the draft's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helix_server.training.loop import LossFn


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 0.8,
) -> torch.Tensor:
    """The combined loss above; logits are `[batch, seq, vocab]`, labels `[batch, seq]`."""
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).float()  # [tokens, vocab]
    teacher = teacher_logits.reshape(-1, vocab).float()  # [tokens, vocab]
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(student, labels.reshape(-1))
    return kl_weight * temperature**2 * kl + (1.0 - kl_weight) * ce


def make_distill_loss(teacher: torch.nn.Module, temperature: float, kl_weight: float) -> LossFn:
    """A `loss_fn(student, batch)` for `train_phase` that scores `batch` with the frozen `teacher`."""
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)

    def loss_fn(student: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, :-1]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=inputs, use_cache=False).logits  # [batch, seq, vocab]
        student_logits = student(input_ids=inputs, use_cache=False).logits  # [batch, seq, vocab]
        return distillation_loss(student_logits, teacher_logits, batch[:, 1:], temperature, kl_weight)

    return loss_fn
