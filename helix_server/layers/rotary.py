"""Rotary position embedding (RoPE) with `default`, `linear` and `llama3` frequency scaling.

Rotate-half convention (GPT-NeoX / Hugging Face Llama): a head vector x = [x1, x2] (two halves) at
position p becomes [x1*cos - x2*sin, x2*cos + x1*sin], with angle p * inv_freq[i] for pair i.

The inverse frequencies are computed exactly as transformers computes them (float32, on the CPU);
the cos/sin table is then computed once in float32 on the model's device for every position up to
`max_positions` and stored in the model dtype, which is what transformers' per-forward cast gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from helix_server.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters as read from a Hugging Face config (`rope_parameters` / `rope_scaling`)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3 only:
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.rope_type == "llama3" and self.original_max_position_embeddings is None:
            raise UnsupportedModelError("llama3 RoPE scaling needs original_max_position_embeddings")


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequency of each rotated pair, scaled per `rope.rope_type`."""
    # Explicitly on the CPU: the model may be constructed under a `meta` device context.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        # Position interpolation: p / factor, folded into the frequencies.
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are divided by `factor`, short ones kept, and the band
    between `old_len / high_freq_factor` and `old_len / low_freq_factor` is linearly blended."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding:
    """RoPE for one model: a cos/sin table per position and the rotation of query/key heads.

    Not an `nn.Module` on purpose: the table is derived data, not a weight, so it stays out of the
    state dict and is (re)built with `build_cache` on the device the model runs on.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> None:
        if head_dim % 2:
            raise UnsupportedModelError(f"RoPE needs an even head_dim, got {head_dim}")
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.inv_freq = rope_inverse_frequencies(rope, head_dim)  # [head_dim // 2] float32, CPU
        self.cos_sin_cache: torch.Tensor | None = None  # [max_positions, 2 * head_dim]

    def build_cache(
        self, device: torch.device | str, dtype: torch.dtype, max_positions: int | None = None
    ) -> None:
        """Compute cos/sin for positions [0, max_positions) in float32 on `device`, store in `dtype`."""
        num_positions = self.max_position_embeddings if max_positions is None else max_positions
        inv_freq = self.inv_freq.to(device)
        positions = torch.arange(num_positions, device=device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, d]: both halves use the same angles
        self.cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)  # [P, 2d]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token, each [T, 1, head_dim] (broadcast over heads); one gather per step."""
        if self.cos_sin_cache is None:
            raise RuntimeError("RotaryEmbedding.build_cache() must run before the first forward")
        cos_sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1)  # [T, 1, 2d]
        return cos_sin[..., : self.head_dim], cos_sin[..., self.head_dim :]

    def rotate_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `x` [T, heads, head_dim] in place (a view into a projection output is fine)."""
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half(x): [-x2, x1]
        # x*cos + rotate_half(x)*sin, rounding after each op like transformers (no fused addcmul),
        # so half-precision results are bit-identical to its reference.
        return x.mul_(cos).add_(rotated.mul_(sin))

    def apply(
        self,
        positions: torch.Tensor,  # [T] int64
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query and key heads for their positions, in place; returns (query, key)."""
        cos, sin = self.lookup(positions)
        return self.rotate_(query, cos, sin), self.rotate_(key, cos, sin)
