"""Our models against transformers' own classes, run the way the engine runs them.

Several sequences go through the paged KV cache on shuffled block tables: full prefills, a prompt
split into chunks over several steps (chunked prefill), then single-token decodes batched together
(and mixed with a chunk). The logits at every position must match transformers' full-sequence
forward in float32.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config

from helix_server.errors import UnsupportedModelError
from helix_server.layers.attention import ForwardContext
from helix_server.layers.attention.builder import (
    SequenceChunk,
    allocate_kv_caches,
    build_attention_metadata,
    order_for_attention,
)
from helix_server.models import MODEL_REGISTRY, load_hf_config, load_model
from tests.fixtures.tiny_models import ARCH_PRESETS, make_tiny_model

ATOL = 1e-4
SEQ_LENS = (21, 31, 12)
# Per step: {sequence index: tokens scheduled}. Seq 0 and 2 are whole prompts in one step, seq 1
# is a 27-token prompt in three chunks; afterwards decodes run batched, mixed with seq 1's chunks.
SCHEDULE = [
    {0: 17, 1: 12, 2: 9},
    {0: 1, 2: 1, 1: 11},
    {0: 1, 2: 1, 1: 4},
    {0: 1, 1: 1, 2: 1},
    {0: 1, 1: 1},
    {1: 1},
    {1: 1},
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One saved tiny model directory per arch preset (built lazily, shared by the module)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_tiny_model(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return get


def _hf_reference(model_dir, token_ids):
    """transformers' logits [L, vocab] for each full sequence (float32, eager attention)."""
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        return [hf(ids[None]).logits[0] for ids in token_ids], hf


def _run_engine_like(model, token_ids, block_size, seed):
    """Feed `token_ids` through `model` per SCHEDULE; returns the logits of every position per sequence."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-len(ids) // block_size) for ids in token_ids) + 5
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    kv_caches = allocate_kv_caches(
        model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim, torch.float32, "cpu"
    )
    block_tables = [[] for _ in token_ids]
    computed = [0] * len(token_ids)
    logits = [[] for _ in token_ids]

    for step in SCHEDULE:
        seq_ids = list(step)
        chunks = []
        for s in seq_ids:
            needed = -(-(computed[s] + step[s]) // block_size)
            while len(block_tables[s]) < needed:  # allocate blocks as the sequence grows
                block_tables[s].append(free_blocks.pop())
            chunks.append(SequenceChunk(computed[s], step[s], list(block_tables[s])))
        order = order_for_attention(chunks)
        ordered = [seq_ids[i] for i in order]
        metadata = build_attention_metadata([chunks[i] for i in order], block_size, "cpu")
        input_ids = torch.cat([token_ids[s][computed[s] : computed[s] + step[s]] for s in ordered])
        positions = torch.cat([torch.arange(computed[s], computed[s] + step[s]) for s in ordered])
        with torch.inference_mode():
            hidden = model(input_ids, positions, ForwardContext(metadata, kv_caches))  # [T, hidden]
            step_logits = model.compute_logits(hidden)  # [T, vocab]
        row = 0
        for s in ordered:
            logits[s].append(step_logits[row : row + step[s]])
            row += step[s]
            computed[s] += step[s]
    assert computed == [len(ids) for ids in token_ids]
    return [torch.cat(chunks) for chunks in logits]


@pytest.fixture(scope="module")
def references(model_dirs):
    """Per arch: (model_dir, token ids of SEQ_LENS, transformers' logits), computed once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            gen = torch.Generator().manual_seed(1)
            token_ids = [torch.randint(0, 512, (n,), generator=gen) for n in SEQ_LENS]
            expected, _ = _hf_reference(model_dirs(arch), token_ids)
            cache[arch] = (model_dirs(arch), token_ids, expected)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", list(ARCH_PRESETS))
@pytest.mark.parametrize("block_size", [8, 16])
def test_logits_match_transformers(references, arch, block_size):
    model_dir, token_ids, expected = references(arch)
    model = load_model(model_dir, torch.float32, "cpu")
    ours = _run_engine_like(model, token_ids, block_size, seed=block_size)

    for seq_ours, seq_expected in zip(ours, expected, strict=True):
        assert seq_ours.dtype == torch.float32
        assert (seq_ours - seq_expected).abs().max().item() <= ATOL
        # The model must tell tokens apart, or the comparison above proves little.
        assert seq_expected.std(dim=-1).min().item() > 0.5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_num_layers_runs_a_prefix_then_the_final_norm(model_dirs, arch):
    """Layer-skip drafting: the first N layers, the final norm and the LM head."""
    model_dir = model_dirs(arch)
    ids = torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(3))
    _, hf = _hf_reference(model_dir, [])
    with torch.inference_mode():
        hidden_states = hf(ids[None], output_hidden_states=True).hidden_states
        expected = hf.lm_head(hf.model.norm(hidden_states[1]))[0]  # after decoder layer 0

    model = load_model(model_dir, torch.float32, "cpu")
    kv_caches = allocate_kv_caches(1, 4, 8, model.num_kv_heads, model.head_dim, torch.float32, "cpu")
    metadata = build_attention_metadata([SequenceChunk(0, 11, [2, 0])], 8, "cpu")
    with torch.inference_mode():
        hidden = model(ids, torch.arange(11), ForwardContext(metadata, kv_caches), num_layers=1)
        logits = model.compute_logits(hidden)
    assert (logits - expected).abs().max().item() <= ATOL


def _prefill_logits(model, ids):
    kv_caches = allocate_kv_caches(
        model.num_layers, 4, 16, model.num_kv_heads, model.head_dim, model.dtype, "cpu"
    )
    metadata = build_attention_metadata([SequenceChunk(0, len(ids), [3, 1])], 16, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(len(ids)), ForwardContext(metadata, kv_caches)))


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, model_dirs):
    sharded = make_tiny_model(tmp_path / "sharded", "llama", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()

    calls = []
    model = load_model(
        sharded, torch.float32, "cpu", progress=lambda done, total: calls.append((done, total))
    )
    total = len(index["weight_map"])
    assert calls[-1] == (total, total) and len(calls) == total

    single = load_model(model_dirs("llama"), torch.float32, "cpu")
    ids = torch.randint(0, 512, (9,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_prefill_logits(model, ids), _prefill_logits(single, ids))


def test_missing_lm_head_ties_to_the_embedding(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    model = load_model(model_dir, torch.float32, "cpu")
    assert model.arch.tie_word_embeddings
    hidden = torch.randn(3, 64)
    expected = hidden @ tensors["model.embed_tokens.weight"].T
    torch.testing.assert_close(model.compute_logits(hidden), expected)


def test_missing_weight_is_an_error_naming_it(tmp_path):
    model_dir = make_tiny_model(tmp_path, "qwen2")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="missing 2 weight") as info:
        load_model(model_dir, torch.float32, "cpu")
    assert "model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert "model.layers.0.self_attn.k_proj.bias" in str(info.value)


def test_unexpected_or_misshapen_weight_is_an_error(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="model.layers.0.self_attn.extra.weight"):
        load_model(model_dir, torch.float32, "cpu")

    del tensors["model.layers.0.self_attn.extra.weight"]
    tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="v_proj.weight has shape"):
        load_model(model_dir, torch.float32, "cpu")


def test_rotary_inv_freq_buffer_in_checkpoint_is_ignored(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    load_model(model_dir, torch.float32, "cpu")


def test_bin_only_directory_requires_safetensors(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UnsupportedModelError, match="requires safetensors") as info:
        load_model(model_dir, torch.float32, "cpu")
    assert "pytorch_model.bin" in str(info.value)


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    assert load_hf_config(tmp_path).architectures == ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedModelError) as info:
        load_model(tmp_path, torch.float32, "cpu")
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for name in MODEL_REGISTRY:
        assert name in message


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(tmp_path)


def test_load_casts_to_the_requested_dtype(model_dirs):
    model = load_model(model_dirs("qwen3"), torch.bfloat16, "cpu", max_model_len=64)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert model.rotary.cos_sin_cache.shape == (64, 2 * model.head_dim)
    assert model.rotary.cos_sin_cache.dtype == torch.bfloat16
    assert model.kv_cache_shape(10, 16) == (10, 16, model.num_kv_heads, model.head_dim)
