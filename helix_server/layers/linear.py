"""CPU fast path for linear layers: weights pre-packed once for oneDNN (mkldnn).

On this kind of CPU, MKL's sgemm behind `F.linear` is 1.5-2x slower for 4-32 rows than for one row,
and that is exactly the decode batch of continuous batching; oneDNN with pre-packed weights is as
fast for one row and much faster for a few. Its rows also do not depend on how many rows are in the
batch (bitwise), so a request's logits do not change with the batch around it, with one exception
this module works around: for some shapes (more than 1,024 input features here) oneDNN computes a
single row with a different kernel, whose last bits differ. Each `PackedLinear` checks its shape
once and, where a lone row would differ, runs it as two identical rows (1.5% of a one-request decode
step of the 125M benchmark model, where only down_proj needs it; ~3.5% if every layer did).

`pack_linear_layers` swaps every `nn.Linear` of a loaded model for a `PackedLinear`, or, for
float32 where helix's own AVX-512 kernel builds, a `PanelLinear` (`helix_server.layers.panel_linear`:
faster at every decode batch size, rows independent of the batch by construction). It is used only
when the platform supports it (a CPU torch build with mkldnn, float32/bfloat16) and after a numeric
self-check; everything else (DirectML, CUDA, torch builds without it) keeps `nn.Linear`.

Bulk rows in float32. On a CPU with AVX512-BF16 but no AMX, oneDNN's bfloat16 kernel runs large
batches slower than its float32 one (measured here: 143-156 against 205-227 GFLOPS), so a bfloat16
model computed its prompts 1.65x slower than a float32 one (the throughput benchmark's 16 prompts:
4.16 s against 2.52 s; 3.18 s with what follows). A `PackedLinear` built with
`bulk_in_float32` computes the rows of long prompt chunks (from `bulk_start` on, see
`bulk_row_start`) in float32: the weight is unpacked to float32 for the call and the result rounded
back to bfloat16. Measured for the projections of a 12-layer, 768-wide model: 1.02x the bfloat16
kernel's speed at 128 rows, 1.20x at 192, 1.44x at 512, 1.57x at 2,048 (unpacking its 48 weights
costs ~40 ms a step). The other rows (decodes, short chunks) keep the bfloat16 kernel and its
bits. The float32 call's rows do not depend on how many rows it has (checked from 16 to 2,048), so a
chunk's result does not depend on the other long chunks in its step either.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from helix_server.layers.panel_linear import PanelLinear

logger = logging.getLogger("helix_server")

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


# A prompt chunk of at least this many tokens is a bulk chunk: its rows come last in the step
# (`order_for_attention`) and may be computed by a throughput kernel (see the module docstring).
# 128: where the float32 route breaks even for a chunk alone (it pays the unpacking); in a step
# with other bulk chunks it wins more. Per chunk, not per step: a chunk's kernel, hence its bits,
# depends on its own length only, never on what else the step holds.
BULK_CHUNK_TOKENS = 128


def bulk_row_start(chunk_lengths: list[int]) -> int | None:
    """The first row of a step's bulk chunks, given its chunks' token counts in batch order (bulk
    chunks last, as `order_for_attention` puts them), or None when it has none."""
    row = 0
    for index, length in enumerate(chunk_lengths):
        if length >= BULK_CHUNK_TOKENS:
            if any(n < BULK_CHUNK_TOKENS for n in chunk_lengths[index:]):
                raise ValueError("bulk chunks must come last in the batch")
            return row
        row += length
    return None


class Linear(nn.Linear):
    """`nn.Linear` that takes (and ignores) `bulk_start`, so plain and packed projections share a call."""

    def forward(self, x: torch.Tensor, bulk_start: int | None = None) -> torch.Tensor:
        return super().forward(x)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (inference only, 2-D inputs).

    With `bulk_in_float32` (bfloat16 weights), rows from `bulk_start` on are computed in float32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bulk_in_float32: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()
        self.pad_single_row = lone_row_differs(self.in_features, weight.dtype)
        self.bulk_in_float32 = bulk_in_float32 and weight.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor, bulk_start: int | None = None) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.bulk_in_float32 and bulk_start is not None and bulk_start < x.shape[0]:
            bulk = self._linear_float32(x[bulk_start:])
            return bulk if bulk_start == 0 else torch.cat((self.forward(x[:bulk_start]), bulk))
        if self.pad_single_row and x.shape[0] == 1:
            # [1, in] -> [2, in] (a view, no copy) -> first row: the batched kernel's result.
            return self._linear(x.expand(2, -1))[:1]
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def _linear_float32(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] bf16 -> [B, out] bf16
        """The float32 route: the weight unpacked to a dense float32 copy for this call (oneDNN
        takes a dense weight too), products summed in float32, rounded to bfloat16 once. oneDNN,
        not `F.linear`: MKL's rows for 2,048 inputs change with the number of rows (measured)."""
        weight = self.packed_weight.to_dense(torch.float32)  # [out, in]
        bias = None if self.bias is None else self.bias.float()
        out = torch.ops.mkldnn._linear_pointwise(x.float(), weight, bias, "none", [], "")
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pad_single_row={self.pad_single_row}, bulk_in_float32={self.bulk_in_float32}"
        )


# Outputs the lone-row check computes. The kernel choice follows the reduction length (measured:
# float32 lone rows differ for every output count from 64 to 32,000 once in_features exceeds
# 1,024, never below), and 1,024 outputs of 32 rows are plenty to see a difference in bfloat16
# too, where rounding hides most (64 outputs missed it); a layer's own output count would make the
# check of an LM head cost seconds. Padding a lone row where it was not needed costs time only.
_PROBE_OUTPUTS = 1024


@functools.cache
def lone_row_differs(in_features: int, dtype: torch.dtype) -> bool:
    """Whether oneDNN computes one row alone with other last bits than the same row in a batch,
    for weights with `in_features` inputs in `dtype` (a property of the kernel it picks, checked
    once on seeded random data)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(_PROBE_OUTPUTS, in_features, generator=generator).to(dtype)
    x = torch.randn(32, in_features, generator=generator).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)

    def linear(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")

    with torch.inference_mode():
        batched = linear(x)
        return any(not torch.equal(linear(x[i : i + 1]), batched[i : i + 1]) for i in range(x.shape[0]))


def cpu_packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `PackedLinear` can run here, checked by running it once against `F.linear`."""
    if device.type != "cpu" or dtype not in _PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        bias = torch.randn(24, generator=generator).to(dtype)
        x = torch.randn(5, 40, generator=generator).to(dtype)
        with torch.inference_mode():
            got = PackedLinear(weight, bias)(x)
        expected = F.linear(x, weight, bias)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        return bool(torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=tolerance))
    except (RuntimeError, AttributeError) as exc:  # op missing or unsupported in this torch build
        logger.debug("packed CPU linear unavailable: %s", exc)
        return False


def bulk_float32_supported() -> bool:
    """Whether this torch build runs `PackedLinear`'s float32 route for bfloat16 weights (checked
    once against `F.linear` in float32)."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator).to(torch.bfloat16)
        x = torch.randn(5, 40, generator=generator).to(torch.bfloat16)
        with torch.inference_mode():
            got = PackedLinear(weight, None, bulk_in_float32=True)(x, bulk_start=0)
        expected = F.linear(x.float(), weight.float()).to(torch.bfloat16)
        return bool(torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, AttributeError, TypeError) as exc:  # op or signature missing in this build
        logger.debug("float32 route for bfloat16 bulk rows unavailable: %s", exc)
        return False


def cpu_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, bulk_in_float32: bool = False, use_panels: bool = False
) -> nn.Module:
    """The CPU fast-path layer for one weight: helix's own float32 kernel (`PanelLinear`, see
    `helix_server.layers.panel_linear`) with `use_panels`, else oneDNN's `PackedLinear`."""
    if use_panels:
        return PanelLinear(weight, bias)
    return PackedLinear(weight, bias, bulk_in_float32)


def pack_linear_layers(module: nn.Module, bulk_in_float32: bool = False, use_panels: bool = False) -> int:
    """Replace every `nn.Linear` under `module` by its `cpu_linear`; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, cpu_linear(child.weight, child.bias, bulk_in_float32, use_panels))
            count += 1
        else:
            count += pack_linear_layers(child, bulk_in_float32, use_panels)
    return count
