"""Seeded random-weight models for the benchmarks, built once into a cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

BENCH_VOCAB = 32000


def cache_root() -> Path:
    return Path(os.environ.get("HELIX_CACHE_DIR", Path.home() / ".cache" / "helix_server")) / "bench"


def bench_model_dir(name: str = "llama-100m", seed: int = 0) -> Path:
    """A ~100M-parameter Llama (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32000)
    with seeded random weights and a byte-level BPE tokenizer of the same vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helix_server.default_model import build_bpe_tokenizer, default_corpus

    out = cache_root() / name
    if (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer_dir = build_bpe_tokenizer(tmp, vocab_size=BENCH_VOCAB, corpus=default_corpus(max_chars=12_000_000))
    config = LlamaConfig(
        vocab_size=BENCH_VOCAB,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tokenizer_dir, safe_serialization=True)
    tmp.rename(out)
    return out
