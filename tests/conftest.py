"""Shared fixtures: tiny seeded random models saved as real Hugging Face directories.

Each model directory has config.json, safetensors weights and a small byte-level BPE tokenizer
(with a chat template), so every test runs the real loading code. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Triton's kernels run through its interpreter on this CPU-only suite. Triton reads the variable when
# its jit functions are first decorated, so it is set before anything (torch, helix) imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

from helix_server.default_model import build_bpe_tokenizer, default_corpus
from tests.fixtures.tiny_models import make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VOCAB = 512
EOS_ID = 0  # the tokenizer's <|endoftext|>


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with 512 tokens trained on a slice of the standard library."""
    return build_bpe_tokenizer(
        tmp_path_factory.mktemp("tokenizer"), vocab_size=TINY_VOCAB, corpus=default_corpus(max_chars=200_000)
    )


@pytest.fixture(scope="session")
def reference_tokenizer(tokenizer_dir):
    """transformers' own loading of `tokenizer_dir`: the reference helix's tokenizer is checked against."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, tokenizer_dir):
    """`make_model_dir(arch="llama", **config_overrides) -> Path`, cached per arguments."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"model-{arch}")
            overrides.setdefault("eos_token_id", EOS_ID)
            overrides.setdefault("bos_token_id", None)
            overrides.setdefault("pad_token_id", EOS_ID)
            make_tiny_model(out, arch, vocab_size=TINY_VOCAB, **overrides)
            for item in tokenizer_dir.iterdir():
                shutil.copy(item, out / item.name)
            cache[key] = out
        return cache[key]

    return make


# SmolLM2-135M's widths: hidden 576, 9 query / 3 KV heads of 64, MLP 1,536, a tied 49,152-token
# vocabulary; 4 of its 30 layers, to keep the tests short.
SMOLLM2_SHAPE = {
    "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "num_hidden_layers": 4, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 2048,
}


@pytest.fixture(scope="session")
def smollm2_shaped_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A seeded random model of SmolLM2-135M's shape (`SMOLLM2_SHAPE`) with the tests' small
    tokenizer: prompts and outputs are compared as token ids (ids past its vocabulary decode to
    nothing)."""
    out = make_tiny_model(tmp_path_factory.mktemp("smollm2-shaped"), "llama", **SMOLLM2_SHAPE)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(make_model_dir) -> Path:
    """The default tiny test model: Llama, 2 layers, hidden 64, GQA 4/2, vocab 512."""
    return make_model_dir("llama")
