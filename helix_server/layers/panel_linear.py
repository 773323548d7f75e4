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
On CPUs with AMX, bfloat16 layers run `helix::amx_linear` instead (`cpu_kernels/amx_linear.cpp`):
the same contract (float32 sums in a fixed order, one rounding, rows independent of the batch) at
AMX's rate. Measured on this project's 2-core Sapphire Rapids machine, 512 rows through SmolLM2's
576x1536 projection: 0.37 ms against oneDNN's 0.41 ms; one row through its 49,152x576 LM head:
1.2 ms against 2.0 ms; a 512-token prompt of SmolLM2's shape in the engine: 0.14 s against 0.62 s
on the AVX-512 panel kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helix_server.layers.cpu_kernels import load_cpu_kernels

PANEL_WIDTH = 16  # outputs per panel: one AVX-512 register of float32
PANEL_DTYPES = (torch.float32, torch.bfloat16)
AMX_BLOCK = 32  # inputs per AMX tile row: the AMX layout pads the inputs to a multiple of this


def amx_available() -> bool:
    """Whether bfloat16 `PanelLinear`s run on AMX here: helix's kernels are loaded and this CPU and
    kernel give the process AMX's bfloat16 tiles."""
    return load_cpu_kernels() and bool(torch.ops.helix.amx_supported())


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


def pack_amx_panels(weight: torch.Tensor) -> torch.Tensor:  # [out, in] -> [ceil(out / 16), in_pad / 2, 16, 2]
    """AMX's layout: panels of 16 outputs, inputs in pairs side by side (element [p, kk, j, i] is
    W[16 p + j, 2 kk + i]), inputs padded with zeros to a multiple of 32 and outputs to a multiple
    of 16, so that 32 inputs of a panel are one 1 KB tile in consecutive memory."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL_WIDTH)
    in_padded = -(-in_features // AMX_BLOCK) * AMX_BLOCK
    padded = weight.new_zeros(panels * PANEL_WIDTH, in_padded)
    padded[:out_features, :in_features] = weight
    return padded.view(panels, PANEL_WIDTH, in_padded // 2, 2).permute(0, 2, 1, 3).contiguous()


class PanelLinear(nn.Module):
    """y = x W^T + b with W in 16-output panels for `torch.ops.helix.panel_linear` (CPU, inference
    only, 2-D inputs in the weight's dtype: float32 or bfloat16; any other weight is held in
    float32). The bias is held in float32 and added before the one rounding. With `float_out`
    (bfloat16 weights) the outputs are the float32 sums, unrounded: for logits, where bfloat16's
    8 bits of mantissa would make ties of distinct tokens. bfloat16 weights run on AMX where
    `amx_available()` (`use_amx` forces the choice). Takes and ignores `bulk_start`, like the other
    linear layers."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, float_out: bool = False, use_amx: bool | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        dtype = weight.dtype if weight.dtype in PANEL_DTYPES else torch.float32
        self.use_amx = dtype == torch.bfloat16 and (amx_available() if use_amx is None else use_amx)
        pack = pack_amx_panels if self.use_amx else pack_panels
        self.panels = pack(weight.detach().to(dtype))
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.float_out = float_out

    def forward(self, x: torch.Tensor, bulk_start: int | None = None) -> torch.Tensor:  # [T, in] -> [T, out]
        op = torch.ops.helix.amx_linear if self.use_amx else torch.ops.helix.panel_linear
        return op(x, self.panels, self.bias, self.out_features, self.float_out)

    def unpacked_weight(self) -> torch.Tensor:  # [out, in], in the panels' dtype
        """The weight as it was given (in the kernel's dtype), from either layout."""
        if self.use_amx:  # [panels, in_pad / 2, 16, 2] -> [out, in]
            weight = self.panels.permute(0, 2, 1, 3).reshape(-1, self.panels.shape[1] * 2)
        else:  # [panels, in, 16] -> [out, in]
            weight = self.panels.transpose(1, 2).reshape(-1, self.in_features)
        return weight[: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"float_out={self.float_out}, use_amx={self.use_amx}"
        )
