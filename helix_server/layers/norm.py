"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back.

    Matches transformers' Llama: the normalised activations are cast to the input dtype *before*
    the multiplication by `weight`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise x [..., hidden]. With `residual`, first does `residual += x` in place and
        normalises the sum, returning (normed, residual) for the next residual connection."""
        if residual is not None:
            x = residual.add_(x)
        # Not `F.rms_norm` in float32, though it gives the same bits and is faster alone (15 us
        # against 35 for 16 rows of 768): on the CPU it is a composite of ten kernels to these
        # seven, and in the engine it measured no faster (batch-1 decode 1.835 s against 1.779 s
        # for 64 tokens, the same at 16 requests; medians of 8 alternations).
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)  # [..., 1]
        normed = (x32 * torch.rsqrt(variance.add_(self.eps))).to(input_dtype)
        out = self.weight * normed
        if residual is None:
            return out
        return out, residual

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
