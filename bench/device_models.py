"""Random-weight Llama model directories for `device_check.py`, written straight as safetensors.

Building a 1.1B-parameter model through transformers' initialisers takes minutes on a CPU; here the
tensors are drawn with torch (on the device when it has one) and saved under the names transformers
uses, with a small BPE tokenizer copied in (ids past its vocabulary decode to nothing: the checks
feed and compare token ids).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# TinyLlama-1.1B's shape.
TINYLLAMA_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
# The same kinds of layers, small enough for a CPU run of the whole script (--tiny).
TINY_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
}


def llama_tensor_shapes(shape: dict, num_layers: int) -> dict[str, tuple[int, ...]]:
    """transformers' Llama parameter names -> shapes, for the first `num_layers` layers."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (shape["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (shape["vocab_size"], hidden),
    }
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def random_llama_pair(
    root: Path, shape: dict, dtype: torch.dtype, device: str, tokenizer_dir: Path, draft_layers: int = 2,
    epsilon: float = 0.02, seed: int = 0,
) -> tuple[Path, Path]:
    """(target dir, draft dir): a random Llama of `shape`, and a draft made of its first
    `draft_layers` layers (embeddings and head shared). The target's later layers write into the
    residual stream scaled by `epsilon`, so the draft agrees with it often but not always."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, size in llama_tensor_shapes(shape, shape["num_hidden_layers"]).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(size, dtype=dtype)
            continue
        scale = 0.05
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if layer >= draft_layers and name.endswith(("o_proj.weight", "down_proj.weight")):
            scale *= epsilon
        tensors[name] = (torch.randn(size, generator=generator, device=device) * scale).to(dtype).cpu()
    target, draft = root / "target", root / "draft"
    for out, layers in ((target, shape["num_hidden_layers"]), (draft, draft_layers)):
        out.mkdir(parents=True, exist_ok=True)
        names = llama_tensor_shapes(shape, layers)
        save_file({n: tensors[n] for n in names}, out / "model.safetensors", metadata={"format": "pt"})
        config = LlamaConfig(
            **{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
            bos_token_id=None, eos_token_id=None, torch_dtype=str(dtype).removeprefix("torch."),
        )
        config.save_pretrained(out)
        for item in tokenizer_dir.iterdir():
            if item.is_file() and item.name != "config.json":
                shutil.copy(item, out / item.name)
    return target, draft


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's tensors (what a decode step streams, besides the KV cache)."""
    from safetensors import safe_open

    total = 0
    with safe_open(model_dir / "model.safetensors", framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = handle.get_slice(name)
            count = 1
            for dim in tensor.get_shape():
                count *= dim
            total += count * json_dtype_size(tensor.get_dtype())
    return total


def json_dtype_size(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return {"BF16": 2, "F16": 2, "F32": 4}[name]
