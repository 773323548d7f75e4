"""CPU fast path for linear layers: weights pre-packed once for oneDNN (mkldnn).

On this kind of CPU, MKL's sgemm behind `F.linear` is 1.5-2x slower for 4-32 rows than for one row,
and that is exactly the decode batch of continuous batching; oneDNN with pre-packed weights is as
fast for one row and much faster for a few. Its rows also do not depend on how many rows are in the
batch (bitwise), so a request's logits do not change with the batch around it, with one exception
this module works around: for some shapes (more than 1,024 input features here) oneDNN computes a
single row with a different kernel, whose last bits differ. Each `PackedLinear` checks its shape
once and, where a lone row would differ, runs it as two identical rows (1.5% of a one-request decode
step of the 125M benchmark model, where only down_proj needs it; ~3.5% if every layer did).

`pack_linear_layers` swaps every `nn.Linear` of a loaded model for a `PackedLinear`. It is used only
when the platform supports it (a CPU torch build with mkldnn, float32/bfloat16) and after a numeric
self-check; everything else (DirectML, CUDA, torch builds without it) keeps `nn.Linear`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("helix_server")

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (inference only, 2-D inputs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()
        self.pad_single_row = lone_row_differs(self.in_features, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.pad_single_row and x.shape[0] == 1:
            # [1, in] -> [2, in] (a view, no copy) -> first row: the batched kernel's result.
            return self._linear(x.expand(2, -1))[:1]
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pad_single_row={self.pad_single_row}"
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


def pack_linear_layers(module: nn.Module) -> int:
    """Replace every `nn.Linear` under `module` by a `PackedLinear`; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            count += 1
        else:
            count += pack_linear_layers(child)
    return count
