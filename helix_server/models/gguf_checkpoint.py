"""Read a GGUF file (llama.cpp's format) for helix: its config, and its tensors under HF names.

Tensors and metadata come from `gguf.GGUFReader` (ggml's own reader); the model config and (in
`helix_server.engine.tokenizer_spec`) the tokenizer and chat template come from transformers' GGUF
integration, run in a child process unless this one has imported transformers already
(`helix_server.platform.child_process`). The config is `GGUFConfig`, the attributes that
integration reads from the metadata, not transformers' config class: importing `LlamaConfig` in
transformers 5 imports its modeling stack (torch.distributed, sympy) and costs 60-80 MiB resident.
Supported: `general.architecture` llama, mistral, qwen2, qwen3, with tensors in F32, F16, BF16
(loaded as ordinary weights) or in a block type of `helix_server.layers.quantized_linear.QUANTIZED_TYPES`
(kept packed). Anything else is refused by name with the supported list.

llama.cpp's converter permutes the rows of Llama's q/k projections (its RoPE pairs adjacent
dimensions, HF's pairs halves); `GGUFCheckpoint` applies the reverse permutation, as transformers
does, for `general.architecture` llama. It is a permutation of whole rows, so it applies to the
packed blocks of a quantized weight as well.
"""

from __future__ import annotations

import gc
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from helix_server.errors import UnsupportedModelError
from helix_server.layers.quantized_linear import QUANTIZED_TYPES, SUPPORTED_TYPES, QuantizedWeight
from helix_server.platform.child_process import call_keeping_out

GGUF_SUFFIX = ".gguf"

# general.architecture -> the HF architecture name helix's registry knows.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Architectures whose q/k rows llama.cpp's converter permutes (transformers reverses it for these).
_PERMUTED_QK = ("llama",)
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def find_gguf_file(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` file of a directory
    (None when `path` is neither; `UnsupportedModelError` for a directory with several)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise UnsupportedModelError(
            f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
            "pass --model the path of the one to load"
        )
    return found[0] if found else None


def gguf_hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor name (None for names helix does not know)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def reverse_permute_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows [n_head, dim, 2] -> [n_head, 2, dim] (any
    trailing dims, so packed block rows too)."""
    rows = tensor.shape[0]
    dim = rows // num_heads // 2
    return tensor.reshape(num_heads, dim, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


class _TensorRecord(NamedTuple):
    """Where one tensor of the file is, and what it holds."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # HF order: [out, in] for matrices
    offset: int  # in the file
    num_bytes: int


class GGUFConfig(SimpleNamespace):
    """A GGUF file's model config, read like a transformers config: the keys transformers' GGUF
    integration maps from the metadata (`hidden_size`, `num_hidden_layers`, `rope_theta`,
    `tie_word_embeddings`, ...) as attributes. What the file does not say is absent (readers use
    `getattr` defaults): no `dtype` (block types have none; `--dtype auto` gives float32) and no
    sliding window unless the metadata has one (llama.cpp runs the file without one too)."""


def _kept_apart(read: Callable[..., Any], *args: Any) -> Any:
    """`read(*args)`, for a read that parses a whole GGUF file to keep a few values, rebuilt once
    everything the parse made is collected.

    `GGUFReader` parses every field, the vocabulary and merges too: ~100k small numpy objects, ~150
    MB at their peak, spread over Python's allocator arenas. An arena goes back to the OS only when
    all of it is free, so the few objects a checkpoint keeps, if built while the parse's objects
    lived, would be scattered over those arenas and hold ~11 MiB of them for the process's life
    (measured on SmolLM2-135M's GGUF). Pickled, collected (part of the parse is in cycles), then
    unpickled, they land elsewhere: a parse then leaves ~2.5 MiB, and a second ~0."""
    values = _pickled(read, args)
    gc.collect()
    return pickle.loads(values)


def _pickled(read: Callable[..., Any], args: tuple) -> bytes:
    return pickle.dumps(read(*args), protocol=pickle.HIGHEST_PROTOCOL)  # what read made dies here


def _read_tables(path: Path) -> tuple[list[_TensorRecord], dict[str, Any]]:
    """The tensor table and the scalar metadata of the GGUF file `path`."""
    reader = GGUFReader(path)
    tensors = [
        # ggml's ne is innermost first; HF order is outermost first
        _TensorRecord(t.name, t.tensor_type, tuple(int(n) for n in reversed(t.shape.tolist())),
                      int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    ]
    metadata = {key: f.contents() for key, f in reader.fields.items() if f.types[:1] != [GGUFValueType.ARRAY]}
    return tensors, metadata


def _transformers_config(path: Path) -> dict[str, Any]:
    """The config values transformers' GGUF integration reads from `path`'s metadata (its own parse
    of the whole file)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path), return_tensors=False)["config"]


def transformers_config_values(path: str) -> dict[str, Any]:
    """`_transformers_config`, its values rebuilt apart from the parse (`_kept_apart`). Run through
    `call_keeping_out`: in a child process unless this one has imported transformers already."""
    return _kept_apart(_transformers_config, Path(path))


class GGUFCheckpoint:
    """A GGUF file opened for loading: metadata checks, HF config, tensors under HF names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tensors, self._metadata = _kept_apart(_read_tables, self.path)
        self._file = np.memmap(self.path, dtype=np.uint8, mode="r")  # the whole file, uint8
        self.architecture = self._field("general.architecture")
        if self.architecture not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {self.architecture!r} ({self.path.name}) is not supported; supported "
                "GGUF architectures: " + ", ".join(GGUF_ARCHITECTURES)
            )
        unsupported = sorted({t.qtype.name for t in self._tensors if t.qtype not in SUPPORTED_TYPES})
        if unsupported:
            raise UnsupportedModelError(
                f"{self.path.name} has tensors of GGUF type(s) {', '.join(unsupported)}, which helix does not "
                "support; supported types: " + ", ".join(t.name for t in SUPPORTED_TYPES)
            )
        names = {t.name for t in self._tensors}
        if "rope_freqs.weight" in names:
            raise UnsupportedModelError(
                f"{self.path.name} carries per-dimension RoPE frequency factors (rope_freqs.weight, "
                "Llama 3.1-style RoPE scaling), which helix does not read from GGUF files yet"
            )
        unknown = sorted(n for n in names if gguf_hf_name(n) is None)
        if unknown:
            raise UnsupportedModelError(
                f"{self.path.name} has tensor(s) a {self.architecture} model does not use: " + ", ".join(unknown[:20])
            )

    def _field(self, key: str, default: Any = None) -> Any:
        return self._metadata.get(key, default)

    def has_tensor(self, gguf_name: str) -> bool:
        """Whether the file holds the tensor `gguf_name`."""
        return any(t.name == gguf_name for t in self._tensors)

    def hf_config(self, values: dict[str, Any] | None = None) -> GGUFConfig:
        """The model config from the GGUF metadata (via transformers' GGUF integration), with
        `architectures` set, `head_dim` taken from `attention.key_length` when present and the
        bias switches from the tensors present. `values`: transformers' config values for this
        file when they were read already (`transformers_config_values`)."""
        if values is None:
            values = call_keeping_out("transformers", __name__, "transformers_config_values", str(self.path))
        config = GGUFConfig(**values)
        config.architectures = [GGUF_ARCHITECTURES[self.architecture]]
        key_length = self._field(f"{self.architecture}.attention.key_length")
        if key_length is not None:
            config.head_dim = int(key_length)
        # The metadata does not say which projections have biases; the tensors do.
        config.attention_bias = self.has_tensor("blk.0.attn_output.bias")
        config.mlp_bias = self.has_tensor("blk.0.ffn_up.bias")
        return config

    def num_tensors(self) -> int:
        """How many tensors the file holds."""
        return len(self._tensors)

    def tensors(self, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Yield (hf_name, tensor) for every tensor: float types as torch tensors in their own
        dtype ([out, in] for matrices), block types as `QuantizedWeight` (packed rows), with
        Llama's q/k rows un-permuted."""
        permute = self.architecture in _PERMUTED_QK
        for tensor in self._tensors:
            hf_name = gguf_hf_name(tensor.name)
            qtype, shape = tensor.qtype, tensor.shape
            raw = np.array(self._file[tensor.offset : tensor.offset + tensor.num_bytes])  # a copy off the map
            data = torch.from_numpy(raw).reshape(shape[0], -1)  # uint8 [rows, bytes per row]
            if permute and ".self_attn.q_proj." in hf_name:
                data = reverse_permute_rows(data, num_heads)
            elif permute and ".self_attn.k_proj." in hf_name:
                data = reverse_permute_rows(data, num_kv_heads)
            if qtype in QUANTIZED_TYPES:
                yield hf_name, QuantizedWeight(qtype, data, in_features=shape[-1])
            else:
                yield hf_name, data.view(_FLOAT_TYPES[qtype]).reshape(shape)
