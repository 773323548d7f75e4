"""Float32 and bfloat16 linear layers on helix's own AVX-512 kernel (`cpu_kernels/panel_gemm.cpp`).

The weight is held as panels of 16 outputs, [panels, in, 16], and every output is summed over the
inputs in order, one fused multiply-add each: a row's result never depends on the other rows of
the batch (bitwise, by construction, for any row count), which keeps a request's greedy output
independent of its company under continuous batching. Measured on this project's 2-core AVX-512
machine against oneDNN's pre-packed kernel (`PackedLinear`), the projections and LM head of the
~100M benchmark Llama (400 MB of float32 weights): 12.9 vs 17.2 ms for one row (31 vs 23 GB/s;
the read bandwidth is ~30-32 GB/s), 19.0 vs 27.1 ms for 16 rows, about equal from 64 rows on
(256-1,024 rows: 262-299 GFLOPS against 261-292).

In bfloat16 the weight is held (and streamed) in bfloat16, products and sums are float32 in the
same order, and each output is rounded once: rows stay independent of the batch, which oneDNN's
bfloat16 kernels do not keep on CPUs with AMX (a row's bits change with the row count there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helix_server.layers.cpu_kernels import load_cpu_kernels

PANEL_WIDTH = 16  # outputs per panel: one AVX-512 register of float32
PANEL_DTYPES = (torch.float32, torch.bfloat16)


def panel_linear_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `PanelLinear` runs here: float32 or bfloat16 on a CPU where helix's kernels build,
    checked once against `F.linear` in float32."""
    if device.type != "cpu" or dtype not in PANEL_DTYPES or not load_cpu_kernels():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=generator).to(dtype)
    bias = torch.randn(40, generator=generator).to(dtype)
    x = torch.randn(5, 24, generator=generator).to(dtype)
    with torch.inference_mode():
        got = PanelLinear(weight, bias)(x)
    expected = F.linear(x.float(), weight.float(), bias.float())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    return got.dtype == dtype and bool(torch.allclose(got.float(), expected, atol=tolerance, rtol=tolerance))


def pack_panels(weight: torch.Tensor) -> torch.Tensor:  # [out, in] -> [ceil(out / 16), in, 16]
    """The kernel's layout: outputs in groups of 16 (the last padded with zero rows), each group
    stored input by input, so that W[n0:n0 + 16, k] is one contiguous 64-byte load."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL_WIDTH)
    padded = weight.new_zeros(panels * PANEL_WIDTH, in_features)
    padded[:out_features] = weight
    return padded.view(panels, PANEL_WIDTH, in_features).transpose(1, 2).contiguous()


class PanelLinear(nn.Module):
    """y = x W^T + b with W in 16-output panels for `torch.ops.helix.panel_linear` (CPU, inference
    only, 2-D inputs in the weight's dtype: float32 or bfloat16; any other weight is held in
    float32). The bias is held in float32 and added before the one rounding. With `float_out`
    (bfloat16 weights) the outputs are the float32 sums, unrounded: for logits, where bfloat16's
    8 bits of mantissa would make ties of distinct tokens. Takes and ignores `bulk_start`, like the
    other linear layers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, float_out: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        dtype = weight.dtype if weight.dtype in PANEL_DTYPES else torch.float32
        self.panels = pack_panels(weight.detach().to(dtype))
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.float_out = float_out

    def forward(self, x: torch.Tensor, bulk_start: int | None = None) -> torch.Tensor:  # [T, in] -> [T, out]
        return torch.ops.helix.panel_linear(x, self.panels, self.bias, self.out_features, self.float_out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"float_out={self.float_out}"
        )
