"""Weight-only int8 linear layers (`--quantization int8`): a float model's projections quantized at load.

Format: symmetric, per output channel. Row n of a float weight W [out, in] gets one float32 scale
s[n] = max_k |W[n, k]| / 127 and int8 values q[n, k] = round(W[n, k] / s[n]) in [-127, 127] (round half
to even; a row of zeros gets s = 0, q = 0), so W[n, k] ~ s[n] * q[n, k] with an error of at most
s[n] / 2 a weight. One byte a weight plus 4 a row: about a quarter of float32.

`Int8Linear` computes y = s * (x q^T) + b, summing in float32: on a CPU with helix's kernels
(`use_cpu_kernels()`, `cpu_kernels/quant_gemm_int8.cpp`: a row's result never depends on its batch
mates), else on the portable torch path, which widens a chunk of output rows of q to float32 at a
time (never the whole weight) and multiplies with torch (any device; its rows' last bits can change
with the batch size).
"""

from __future__ import annotations

import torch
from torch import nn

from helix_server.layers.quantized_linear import CHUNK_WEIGHTS, kernel_op_suffix

INT8_MAX = 127


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (q int8 [out, in], scale float32 [out]) with weight ~ scale[:, None] * q."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / INT8_MAX  # [out]
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / divisor[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 `weight` [out, in] and float32 `weight_scale` [out]
    (vLLM's names), W = weight_scale[:, None] * weight (inference only, 2-D inputs).

    The sums are float32; the result is returned in the input's dtype, or in float32 with
    `float_out`. Takes and ignores `bulk_start`, like the other projections."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, float_out: bool = False) -> None:
        super().__init__()
        q, scale = quantize_per_channel(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q.to(weight.device))
        self.register_buffer("weight_scale", scale.to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.float_out = float_out
        self.native = False  # `use_cpu_kernels`: `helix::int8_linear` (or its AVX2 twin)
        self.op_suffix = ""

    def use_cpu_kernels(self, isa: str | None = None) -> None:
        """Run on helix's CPU kernel (CPU tensors, after `load_quant_kernels()` returned True), in
        `isa` ("avx512" or "avx2"; default: this CPU's; both give the same bits)."""
        self.op_suffix = kernel_op_suffix(isa)
        self.native = True

    def forward(self, x: torch.Tensor, bulk_start: int | None = None) -> torch.Tensor:  # [T, in] -> [T, out]
        x32 = x.to(torch.float32).contiguous()
        if self.native:
            out = getattr(torch.ops.helix, "int8_linear" + self.op_suffix)(x32, self.weight, self.weight_scale)  # [T, out]
        else:
            out = self._portable(x32)
        if self.bias is not None:
            out = out + self.bias.to(torch.float32)
        return out if self.float_out else out.to(x.dtype)

    def _portable(self, x32: torch.Tensor) -> torch.Tensor:  # [T, in] f32 -> [T, out] f32
        chunk_rows = max(1, CHUNK_WEIGHTS // self.in_features)
        parts = []
        for start in range(0, self.out_features, chunk_rows):
            q = self.weight[start : start + chunk_rows].to(torch.float32)  # [rows, in], exact
            parts.append((x32 @ q.t()).mul_(self.weight_scale[start : start + chunk_rows]))  # [T, rows]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, native={self.native}{self.op_suffix}"
        )


def quantize_linear_layers(module: nn.Module) -> int:
    """Replace every `nn.Linear` under `module` by an `Int8Linear` of its weight; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child.weight, child.bias))
            count += 1
        else:
            count += quantize_linear_layers(child)
    return count

