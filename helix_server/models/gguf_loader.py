"""Put a GGUF checkpoint's tensors into a built Llama-family model, quantized weights kept packed.

The model code does not change with the weight format: for each projection whose GGUF weights are
block-quantized, this module replaces the `Linear` with a `QuantizedLinear` holding the file's
packed blocks (fused q/k/v and gate/up get one segment per shard); every float tensor goes through
the model's own `load_weights`. A block-quantized token embedding stays packed too
(`QuantizedEmbedding`: a lookup dequantizes only its rows); when the LM head is tied to it, the head
gets a `QuantizedLinear` over the same packed blocks, as llama.cpp computes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from helix_server.errors import UnsupportedModelError
from helix_server.layers.quantized_embedding import QuantizedEmbedding
from helix_server.layers.quantized_linear import QuantizedLinear, QuantizedWeight
from helix_server.models.gguf_checkpoint import GGUFCheckpoint

_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_EMBEDDING = "model.embed_tokens.weight"


def _module_path(hf_weight_name: str) -> tuple[str, str]:
    """HF weight name -> (our module path, the HF projection name): fused shards map to the fused
    module (`model.layers.0.self_attn.q_proj.weight` -> (`model.layers.0.self_attn.qkv_proj`, `q_proj`))."""
    parts = hf_weight_name.split(".")
    projection = parts[-2]
    for fused, shards in _FUSED.items():
        if projection in shards:
            return ".".join([*parts[:-2], fused]), projection
    return ".".join(parts[:-1]), projection


def load_gguf_weights(
    model: nn.Module,
    checkpoint: GGUFCheckpoint,
    device: torch.device | str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Load `checkpoint` into `model` (materialised uninitialised): block-quantized projections become
    `QuantizedLinear`s on `device`, the rest is copied by `model.load_weights` (cast to its dtype)."""
    arch = model.arch
    floats: list[tuple[str, torch.Tensor]] = []
    quantized: dict[str, dict[str, QuantizedWeight | torch.Tensor]] = {}  # module path -> shard -> weight
    embedding_quantized: QuantizedWeight | None = None
    for hf_name, tensor in checkpoint.tensors(arch.num_heads, arch.num_kv_heads):
        if hf_name == _EMBEDDING and isinstance(tensor, QuantizedWeight):
            embedding_quantized = tensor
            dtype = model.model.embed_tokens.weight.dtype
            model.model.embed_tokens = QuantizedEmbedding(_to(tensor, device), dtype)
        elif hf_name.endswith(".weight") and (isinstance(tensor, QuantizedWeight) or tensor.dim() == 2):
            path, shard = _module_path(hf_name)
            quantized.setdefault(path, {})[shard] = tensor
        else:
            floats.append((hf_name, tensor))

    for path, shards in quantized.items():
        if not any(isinstance(w, QuantizedWeight) for w in shards.values()):
            floats.extend((f"{path_to_hf(path, shard)}", w) for shard, w in shards.items())
            continue
        _swap_in_quantized(model, path, shards, device)

    if arch.tie_word_embeddings and embedding_quantized is not None:
        model.lm_head = QuantizedLinear([_to(embedding_quantized, device)], float_out=True)
    model.load_weights(iter(floats), progress=progress)


def path_to_hf(path: str, shard: str) -> str:
    """Our module path + HF projection name -> the HF weight name."""
    parts = path.split(".")
    if parts[-1] in _FUSED:
        parts[-1] = shard
    return ".".join([*parts, "weight"])


def _to(weight: QuantizedWeight, device: torch.device | str) -> QuantizedWeight:
    return QuantizedWeight(weight.qtype, weight.packed.to(device), weight.in_features)


def _as_segment(weight: QuantizedWeight | torch.Tensor, device: torch.device | str) -> QuantizedWeight:
    """A float shard fused with quantized ones becomes an F32 segment of raw bytes."""
    if isinstance(weight, QuantizedWeight):
        return _to(weight, device)
    from gguf import GGMLQuantizationType

    rows = weight.to(torch.float32).contiguous()  # [out, in]
    return QuantizedWeight(GGMLQuantizationType.F32, rows.view(torch.uint8).to(device), rows.shape[1])


def _swap_in_quantized(
    model: nn.Module, path: str, shards: dict[str, QuantizedWeight | torch.Tensor], device: torch.device | str
) -> None:
    """Replace the `Linear` at `path` with a `QuantizedLinear` of `shards` (kept bias included)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, attr, None)
    if old is None or not hasattr(old, "weight"):
        raise UnsupportedModelError(f"GGUF weights for {path}, which this model does not have")
    order = _FUSED.get(attr, (None,))
    if attr in _FUSED:
        missing = [name for name in order if name not in shards]
        if missing:
            raise UnsupportedModelError(f"GGUF checkpoint is missing {', '.join(f'{path}.{m}' for m in missing)}")
        weights = [_as_segment(shards[name], device) for name in order]
    else:
        weights = [_as_segment(next(iter(shards.values())), device)]
    layer = QuantizedLinear(weights, bias=old.bias, float_out=path == "lm_head")
    if (layer.out_features, layer.in_features) != tuple(old.weight.shape):
        raise UnsupportedModelError(
            f"GGUF weight {path} has shape {(layer.out_features, layer.in_features)}, "
            f"expected {tuple(old.weight.shape)}"
        )
    setattr(parent, attr, layer)
