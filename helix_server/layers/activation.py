"""Gated activations applied to a fused projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """SwiGLU gate: for x = [gate, up] (halves of the last dim), returns silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
        half = x.shape[-1] // 2
        return F.silu(x[..., :half]).mul_(x[..., half:])
