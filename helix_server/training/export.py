"""Llama models for training, and saving them as complete Hugging Face directories.

A saved directory holds `config.json`, `generation_config.json`, `model.safetensors`, the tokenizer
files (with the ChatML chat template) and `helix-default-model.json`, the manifest of how the model
was trained and how it scored on held-out files.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from helix_server.default_model.shipped import MANIFEST_FILE
from helix_server.training.presets import MAX_POSITION_EMBEDDINGS, ModelShape

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def new_llama(shape: ModelShape, vocab_size: int, eos_ids: list[int], pad_id: int, seed: int):
    """A freshly initialised `LlamaForCausalLM` (tied embeddings, RoPE theta 1e4), seeded privately."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=list(eos_ids), pad_token_id=pad_id)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_dtype(models: list[torch.nn.Module], max_bytes: int) -> torch.dtype:
    """float32 when the models fit in `max_bytes` that way, else bfloat16."""
    return torch.float32 if sum(4 * count_parameters(m) for m in models) <= max_bytes else torch.bfloat16


def save_model_dir(
    model: torch.nn.Module, out_dir: Path, tokenizer_dir: Path, dtype: torch.dtype, manifest: dict
) -> Path:
    """Write `model` (converted to `dtype`, on the CPU), the tokenizer files and `manifest` to `out_dir`.

    An existing `out_dir` is replaced; the manifest is written last.
    """
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    exported = copy.deepcopy(model).to(device="cpu", dtype=dtype)
    exported.config.dtype = dtype
    exported.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = Path(tokenizer_dir) / name
        if source.is_file():
            shutil.copyfile(source, out / name)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
