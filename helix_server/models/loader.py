"""Load a local Hugging Face model directory (or a GGUF file) into our own module: config,
weights, RoPE table.

Weights come from `model.safetensors` or a sharded `model.safetensors.index.json`, never from
pickle files; a GGUF file's come through `helix_server.models.gguf_loader` (block-quantized
weights stay packed). The module is built on the `meta` device and materialised uninitialised
(`_materialize`), so no time is spent on a random initialisation that the checkpoint overwrites.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helix_server.config import QUANTIZATION_METHODS
from helix_server.errors import ParameterError, UnsupportedModelError
from helix_server.layers.attention.selector import describe_attention_backend, use_device_attention
from helix_server.layers.int8_linear import Int8Linear, quantize_linear_layers
from helix_server.models.cpu_kernel_choice import choose_cpu_kernels, use_cpu_kernels
from helix_server.models.gguf_checkpoint import GGUFCheckpoint, find_gguf_file
from helix_server.models.gguf_loader import load_gguf_weights
from helix_server.models.hf_config import arch_config_from_hf
from helix_server.models.registry import resolve_architecture
from helix_server.platform.huge_pages import move_to_huge_pages

logger = logging.getLogger("helix_server")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ProgressCallback = Callable[[int, int], None]


def open_gguf(model_dir: str | Path) -> GGUFCheckpoint | None:
    """The GGUF file `model_dir` is (or holds), opened: its ~2 s parse serves both its config
    (`.hf_config()`) and its weights (`load_model(..., gguf=...)`). None for a safetensors model."""
    gguf_file = find_gguf_file(Path(model_dir))
    return GGUFCheckpoint(gguf_file) if gguf_file is not None else None


def load_hf_config(model_dir: str | Path) -> Any:
    """The transformers config of a local model directory, or of a GGUF file (or a directory
    holding one) from its metadata (no network, no remote code). A GGUF file's is read without
    importing transformers here (`GGUFCheckpoint.hf_config`)."""
    path = Path(model_dir)
    gguf = open_gguf(path)
    if gguf is not None:
        return gguf.hf_config()
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)


def _materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` built on the meta device, with every tensor uninitialised on `device`: what
    `nn.Module.to_empty` does, without its `empty_like` on meta tensors, whose decomposition
    imports torch's symbolic-shapes machinery (sympy): 37 MB resident for the server's life."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def checkpoint_files(model_dir: str | Path) -> dict[str, list[str]]:
    """Safetensors files of the checkpoint, each with the tensor names it holds.

    Raises `UnsupportedModelError` when the directory has no safetensors checkpoint (for example
    only pickle `.bin` files, which are never loaded).
    """
    path = Path(model_dir)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            files.setdefault(file_name, []).append(name)
        for file_name in files:
            if not (path / file_name).is_file():
                raise UnsupportedModelError(f"{INDEX_FILE} names {file_name}, which is missing from {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open  # here: a GGUF model never needs it

        with safe_open(single, framework="pt") as handle:
            return {SINGLE_FILE: list(handle.keys())}
    present = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    found = f" (found: {', '.join(present)})" if present else ""
    raise UnsupportedModelError(
        f"{path} has no {SINGLE_FILE} or {INDEX_FILE}{found}: helix_server requires safetensors "
        "weights and never loads pickle (.bin/.pt) checkpoints; convert the model to safetensors"
    )


def iter_checkpoint(model_dir: str | Path, files: dict[str, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, cpu tensor) for every tensor, one file open at a time."""
    from safetensors import safe_open

    path = Path(model_dir)
    for file_name, names in files.items():
        with safe_open(path / file_name, framework="pt", device="cpu") as handle:
            for name in names:
                yield name, handle.get_tensor(name)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: ProgressCallback | None = None,
    max_model_len: int | None = None,
    pack_for_cpu: bool = True,
    cpu_kernels: bool = True,
    quantization: str | None = None,
    hf_config: Any | None = None,
    gguf: GGUFCheckpoint | None = None,
) -> nn.Module:
    """Build the registered model for `model_dir` on `device` in `dtype` and load its weights.

    `progress(loaded, total)` is called after each tensor. `max_model_len` (default: the model's
    `max_position_embeddings`) bounds the RoPE table. A GGUF file already opened (`open_gguf`) is
    passed as `gguf`, with its `hf_config`, so it is parsed once. Embeddings are shared with the LM
    head when the config ties them or the checkpoint has no `lm_head.weight`. The model is in eval
    mode with gradients off. `quantization="int8"` turns every projection and the LM head of a
    safetensors model into an `Int8Linear` (see `helix_server.layers.int8_linear`). On the CPU the
    modules are then swapped for the kernels this CPU runs
    (`helix_server.models.cpu_kernel_choice`): the float linear layers for pre-packed ones unless
    `pack_for_cpu` is False (helix's own, with the fused norms, activations, RoPE and attention,
    only with `cpu_kernels`), quantized layers for helix's kernels with `cpu_kernels`, even with
    `pack_for_cpu` False.
    """
    check_quantization(quantization)
    gguf_file = find_gguf_file(model_dir)
    if gguf_file is not None and quantization is not None:
        raise ParameterError(
            f"--quantization {quantization} applies to safetensors models; {gguf_file.name} is a GGUF "
            "file, whose weights load in their own quantized format",
            "quantization",
        )
    if gguf is None and gguf_file is not None:  # callers that opened it already pass it (`open_gguf`)
        gguf = GGUFCheckpoint(gguf_file)
    if hf_config is None:  # callers that read it already pass it: a GGUF file's takes seconds to parse
        hf_config = gguf.hf_config() if gguf is not None else load_hf_config(model_dir)
    spec = resolve_architecture(hf_config)
    arch = arch_config_from_hf(hf_config, spec.flavor)
    if gguf is not None:
        files: dict[str, list[str]] = {}
        total = gguf.num_tensors()
        has_lm_head = gguf.has_tensor("output.weight")
    else:
        files = checkpoint_files(model_dir)
        names = {name for file_names in files.values() for name in file_names}
        total = len(names)
        has_lm_head = "lm_head.weight" in names
    if not arch.tie_word_embeddings and not has_lm_head:
        arch = dataclasses.replace(arch, tie_word_embeddings=True)

    with torch.device("meta"):
        model = spec.model_cls(arch)
    model = _materialize(model.to(dtype=dtype), device)
    model.requires_grad_(False).eval()

    callback = None if progress is None else (lambda loaded: progress(loaded, total))
    if gguf is not None:
        load_gguf_weights(model, gguf, device, progress=callback)
    else:
        model.load_weights(iter_checkpoint(model_dir, files), progress=callback)
    model.build_rope_cache(device, dtype, max_model_len)
    if quantization == "int8":
        _quantize_int8(model)
    choice = choose_cpu_kernels(torch.device(device), dtype, cpu_kernels, pack=pack_for_cpu)
    use_cpu_kernels(model, choice)
    if choice.describe() is not None:
        logger.info("%s on the CPU: %s", Path(model_dir).name, choice.describe())
    if torch.device(device).type != "cpu":
        use_device_attention(model, device)
        logger.info("%s on %s: %s", Path(model_dir).name, device, describe_attention_backend(device))
    else:  # the weights in 2 MiB pages: a decode step streams them all (platform/huge_pages.py)
        move_to_huge_pages(model)
    return model


def check_quantization(quantization: str | None) -> None:
    """Raise `ParameterError` naming `quantization` unless it is None or one of `QUANTIZATION_METHODS`."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ParameterError(
            f"--quantization {quantization!r} is not supported; supported: {', '.join(QUANTIZATION_METHODS)}",
            "quantization",
        )


def _quantize_int8(model: nn.Module) -> None:
    """Every projection and the LM head to `Int8Linear` (a tied LM head gets its own int8 copy of
    the embedding matrix, with float32 logits; the embedding lookup stays float)."""
    quantize_linear_layers(model.model)
    head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    bias = None if model.lm_head is None else model.lm_head.bias
    model.lm_head = Int8Linear(head, bias, float_out=True)
