"""Which CPU kernels a loaded model runs, chosen at load (`helix_server.models.loader.load_model`).

The model classes hold the architecture only: they are built with torch's portable modules, and
after the weights are in, the load step swaps them for the kernels this CPU runs best:

* float32 and bfloat16 projections and the LM head: helix's own panel kernel where it builds and
  the `cpu_kernels` setting is on (`helix_server.layers.panel_linear`), and then the norms,
  activations, RoPE, K/V stores and attention too (`helix_server.layers.fused_cpu`); else oneDNN's
  pre-packed weights (`helix_server.layers.linear`), where a bfloat16 model on a CPU without AMX
  computes its long prompt chunks in float32;
* quantized projections (int8, a GGUF file's blocks): helix's kernels on AVX-512 or AVX2 CPUs.

Everything else (other devices and dtypes, `--no-cpu-kernels` without oneDNN) keeps the portable
modules. The choice lives here, in the load step every model goes through (target and draft), and
not in `layers`, because it needs the causal LM's head layout (a tied LM head gets its own packed
copy of the embedding matrix), which is the models package's knowledge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from helix_server.layers.cpu_kernels import load_quant_kernels
from helix_server.layers.fused_cpu import use_fused_cpu_ops
from helix_server.layers.int8_linear import Int8Linear
from helix_server.layers.linear import (
    bulk_float32_supported,
    cpu_linear,
    cpu_packing_supported,
    pack_linear_layers,
)
from helix_server.layers.panel_linear import PanelLinear, panel_linear_supported
from helix_server.layers.quantized_embedding import QuantizedEmbedding
from helix_server.layers.quantized_linear import QuantizedLinear
from helix_server.platform.device import cpu_has_amx


@dataclass(frozen=True)
class CpuKernelChoice:
    """The kernels chosen for one model: `packed` float linears (on helix's panel kernel and fused
    ops with `helix_kernels`, else on oneDNN, with `bulk_in_float32` for long prompt chunks of a
    bfloat16 model), and helix's kernels for the `quantized` layers."""

    packed: bool = False
    helix_kernels: bool = False
    bulk_in_float32: bool = False
    quantized: bool = False

    def describe(self) -> str | None:
        """What the float layers run on, for the start-up log (None: torch's modules)."""
        if self.helix_kernels:
            return "helix's own (linear layers, norms, activations, RoPE, attention)"
        if self.packed:
            return "oneDNN's pre-packed linear layers"
        return None


def choose_cpu_kernels(
    device: torch.device, dtype: torch.dtype, cpu_kernels: bool, pack: bool
) -> CpuKernelChoice:
    """The kernels a model in `dtype` on `device` runs: with `pack`, the float linears' (helix's own
    only with `cpu_kernels`); with `cpu_kernels`, the quantized layers' (even without `pack`).
    Builds (or waits for) helix's kernels where it needs to know whether they run here."""
    packed = helix_kernels = bulk_in_float32 = False
    if pack:
        helix_kernels = cpu_kernels and panel_linear_supported(device, dtype)
        packed = helix_kernels or cpu_packing_supported(device, dtype)
        # oneDNN's bfloat16 kernel outruns its float32 one on long prompt chunks only with AMX.
        bf16_on_onednn = packed and not helix_kernels and dtype == torch.bfloat16
        bulk_in_float32 = bf16_on_onednn and not cpu_has_amx() and bulk_float32_supported()
    quantized = cpu_kernels and device.type == "cpu" and load_quant_kernels()
    return CpuKernelChoice(packed, helix_kernels, bulk_in_float32, quantized)


def use_cpu_kernels(model: nn.Module, choice: CpuKernelChoice) -> None:
    """Swap `model`'s modules for `choice`'s kernels, in place (inference only and irreversible:
    after the weights are loaded). `model` is a causal LM with `lm_head` (None when tied) and
    `model.embed_tokens`; a tied LM head gets its own packed copy of the embedding matrix (the
    embedding lookup keeps the original), and a panel-kernel LM head returns float32 logits. A GGUF
    head tied to a packed embedding is repacked once, and the embedding then reads that copy."""
    if choice.packed:
        pack_linear_layers(model, choice.bulk_in_float32, use_panels=choice.helix_kernels)
        if model.lm_head is None:
            model.lm_head = cpu_linear(model.model.embed_tokens.weight, None, use_panels=choice.helix_kernels)
        if isinstance(model.lm_head, PanelLinear):
            model.lm_head.float_out = True  # float32 logits (unrounded sums) in bfloat16 too
        if choice.helix_kernels:
            use_fused_cpu_ops(model, model.dtype)
    if choice.quantized:
        embedding, head = model.model.embed_tokens, model.lm_head
        # A GGUF head tied to a packed embedding starts on the embedding's very tensor (gguf_loader).
        tied = (
            isinstance(embedding, QuantizedEmbedding)
            and isinstance(head, QuantizedLinear)
            and len(head.qtypes) == 1
            and head.packed0.data_ptr() == embedding.packed.data_ptr()
        )
        for module in model.modules():  # quantized weights: helix's kernels for this CPU (AVX-512 or AVX2)
            if isinstance(module, (Int8Linear, QuantizedLinear)) and not module.native:
                module.use_cpu_kernels()
        if tied and head.repacked[0]:  # the embedding reads the head's repacked table: one copy
            embedding.share_dot_layout(head.packed0)
