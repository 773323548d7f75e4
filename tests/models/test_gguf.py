"""GGUF files: packed-block dequantization, loading (config, weights, tokenizer), refusals.

The GGUF files are written here from tiny random transformers models with the `gguf` writer and
quantizers (`tests/fixtures/gguf_files.py`). References: the safetensors model (F32 files), and
for every type transformers running the file's tensors dequantized by `gguf.quants.dequantize`
(un-permuted by transformers' own GGUF tensor processor; its `from_pretrained(gguf_file=...)`
itself needs `accelerate`, which helix does not depend on).
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from helix_server.engine.tokenizer import load_tokenizer
from helix_server.errors import UnsupportedModelError
from helix_server.layers import quantized_linear
from helix_server.layers.cpu_kernels import cpu_kernels_supported
from helix_server.layers.quant_repack import DOT_TYPE_CODES, repack_for_dot
from helix_server.layers.quantized_linear import QuantizedLinear, QuantizedWeight, dequantize_rows
from helix_server.models import load_hf_config, load_model
from helix_server.models.hf_config import arch_config_from_hf
from helix_server.models.registry import resolve_architecture
from tests.fixtures.activation_rounding import two_term_rounded
from tests.fixtures.batch_invariance import assert_logprobs_do_not_depend_on_the_batch
from tests.fixtures.gguf_files import gguf_name, random_k_blocks, write_gguf
from tests.fixtures.tiny_models import make_tiny_model, tiny_hf_model
from tests.models.test_logits_vs_transformers import SEQ_LENS, _run_engine_like

ATOL = 1e-4
ACTIVATION_QUANT_ATOL = 5e-2
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# F32 files: arch preset, overrides (GGUF carries no sliding window or RoPE scaling), and the
# general.architecture written (None: llama.cpp's choice for the HF class).
F32_CASES = {
    "llama": ("llama", {}, None),
    "llama_tied_biased": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}, None),
    "mistral": ("mistral", {"sliding_window": None}, "mistral"),
    "qwen2": ("qwen2", {"use_sliding_window": False}, None),
    "qwen3_head_dim_32": ("qwen3", {"head_dim": 32}, None),
}


def _packed(qtype, rows, cols, seed):
    if qtype in K_TYPES:
        return random_k_blocks((rows, cols), qtype, seed)
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(weights, qtype)


def _token_ids():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=gen) for n in SEQ_LENS]


def _hf_logits(model, token_ids):
    with torch.inference_mode():
        return [model(ids[None]).logits[0] for ids in token_ids]


def _gguf_reference(path, hf_model):
    """`hf_model` (a transformers model of the file's shape) with every weight replaced by the
    file's tensor dequantized by `gguf.quants.dequantize`, Llama q/k rows un-permuted by
    transformers' own GGUF tensor processor, float32."""
    config = hf_model.config
    reader = gguf.GGUFReader(path)
    processor = LlamaTensorProcessor(
        {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    )
    by_gguf_name = {gguf_name(name): name for name in hf_model.state_dict()}
    state = {}
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if reader.get_field("general.architecture").contents() == "llama":
            weights = processor.process(weights, tensor.name).weights
        state[by_gguf_name[tensor.name]] = torch.from_numpy(np.array(weights, dtype=np.float32))
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference = copy.deepcopy(hf_model)
    reference.load_state_dict(state, strict=True)
    return reference


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_bitwise(qtype):
    packed = _packed(qtype, 24, 512, seed=int(qtype))
    expected = gguf.quants.dequantize(packed, qtype)
    ours = dequantize_rows(torch.from_numpy(packed), qtype).numpy()
    assert ours.shape == expected.shape == (24, 512)
    assert np.isfinite(expected).all() and expected.std() > 0
    assert np.array_equal(ours.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_quantized_linear_computes_x_times_dequantized_weight_in_row_chunks(qtype, monkeypatch):
    monkeypatch.setattr(quantized_linear, "CHUNK_WEIGHTS", 7 * 512)  # 7 rows a chunk: uneven split
    q = torch.from_numpy(_packed(qtype, 40, 512, seed=1))
    other = Q.Q4_0 if qtype == Q.Q8_0 else Q.Q8_0
    k = torch.from_numpy(_packed(other, 16, 512, seed=2))  # a second segment of another type
    bias = torch.randn(56)
    layer = QuantizedLinear([QuantizedWeight(qtype, q, 512), QuantizedWeight(other, k, 512)], bias=bias)
    assert [(t, p.dtype) for t, p in layer.segments()] == [(qtype, torch.uint8), (other, torch.uint8)]
    assert torch.equal(layer.segments()[0][1], q) and torch.equal(layer.segments()[1][1], k)
    x = torch.randn(5, 512)
    weight = torch.cat([dequantize_rows(q, qtype), dequantize_rows(k, other)])  # [56, 512]
    expected = x.double() @ weight.double().T + bias.double()
    out = layer(x)
    assert out.shape == (5, 56) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("case", list(F32_CASES))
def test_f32_gguf_logits_match_the_safetensors_model(tmp_path, tokenizer_dir, case):
    arch, overrides, gguf_arch = F32_CASES[case]
    hf = tiny_hf_model(arch, **overrides)
    path = write_gguf(hf, tokenizer_dir, tmp_path / "model.gguf", architecture=gguf_arch)
    model = load_model(path, torch.float32, "cpu")
    # The config read from the metadata (GGUFConfig, not transformers' config class) describes the
    # model the file came from: every shape, switch and RoPE parameter (eps as a float32).
    expected_arch = arch_config_from_hf(hf.config, resolve_architecture(hf.config).flavor)
    assert model.arch.rms_norm_eps == pytest.approx(expected_arch.rms_norm_eps, rel=1e-7)
    assert dataclasses.replace(model.arch, rms_norm_eps=expected_arch.rms_norm_eps) == expected_arch
    token_ids = _token_ids()
    expected = _hf_logits(hf, token_ids)
    for ours, ref in zip(_run_engine_like(model, token_ids, 8, seed=0), expected, strict=True):
        assert (ours - ref).abs().max().item() <= ATOL
        assert ref.std(dim=-1).min().item() > 0.5
    # The file read back by `gguf` and transformers' un-permutation is the same model.
    for ours, ref in zip(_hf_logits(_gguf_reference(path, hf), token_ids), expected, strict=True):
        assert (ours - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("qtype", (Q.F16, *BLOCK_TYPES), ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kernels", [False, True], ids=["portable", "cpu-kernels"])
def test_quantized_gguf_logits_match_transformers_on_the_dequantized_file(
    tmp_path, tokenizer_dir, qtype, tied, kernels
):
    """`cpu-kernels`: the model packed for the CPU, every block type on helix's own kernels."""
    if kernels and not cpu_kernels_supported():
        pytest.skip("helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler")
    # K-quants need rows of 256 weights; their blocks are random with small scales.
    shape = {"hidden_size": 256, "intermediate_size": 512} if qtype in K_TYPES else {}
    hf = tiny_hf_model("llama", tie_word_embeddings=tied, **shape)
    path = write_gguf(hf, tokenizer_dir, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    model = load_model(path, torch.float32, "cpu", pack_for_cpu=kernels, cpu_kernels=kernels)
    assert {m.native for m in model.modules() if isinstance(m, QuantizedLinear)} == ({kernels} if qtype != Q.F16 else set())

    layers = model.model.layers[0]
    if qtype != Q.F16:  # block types stay packed: the file's bytes, not float weights
        for layer in (layers.self_attn.qkv_proj, layers.self_attn.o_proj, layers.mlp.gate_up_proj,
                      layers.mlp.down_proj, model.lm_head):
            assert isinstance(layer, QuantizedLinear) and layer.qtypes == [qtype]
        reader = gguf.GGUFReader(path)
        down = torch.from_numpy(np.array(next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight").data))
        if kernels and qtype in DOT_TYPE_CODES:  # the same bytes, reordered for the dot-product kernel
            down = repack_for_dot(down, qtype)
        assert torch.equal(layers.mlp.down_proj.packed0, down)
        embedding = model.model.embed_tokens
        # A tied head's table is held once: with the dot kernel the embedding reads the head's
        # repacked copy (and gives the file's rows, dequantized).
        shared = tied and kernels and qtype in DOT_TYPE_CODES
        assert embedding.dot_layout == shared
        assert (embedding.packed.data_ptr() == model.lm_head.packed0.data_ptr()) == tied
        file_embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
        ids = torch.tensor([0, 7, 100, 3, 7])
        expected = torch.from_numpy(gguf.quants.dequantize(file_embedding.data, qtype))[ids]
        assert torch.equal(embedding(ids), expected)
    else:
        assert not any(isinstance(m, QuantizedLinear) for m in model.modules())

    token_ids = _token_ids()
    reference = _gguf_reference(path, hf)
    atol = ATOL
    if kernels and qtype in DOT_TYPE_CODES:
        # The dot-product kernels round each linear layer's input to 8 bits a block of 32, as llama.cpp
        # does. Every such layer's output, on the inputs it got in this run, is the rounded input times
        # the dequantized weights; against transformers (its inputs rounded alike) the logits are then
        # close, not equal: a last-bit difference upstream can move an activation across a rounding
        # boundary, and this tiny random model amplifies that.
        _assert_layers_compute_rounded_inputs_times_weights(model, path)
        _quantize_linear_inputs(reference)
        atol = ACTIVATION_QUANT_ATOL
    expected = _hf_logits(reference, token_ids)
    for ours, ref in zip(_run_engine_like(model, token_ids, 16, seed=3), expected, strict=True):
        assert ref.std(dim=-1).min().item() > 0.05
        assert (ours - ref).abs().max().item() <= atol * max(1.0, ref.abs().max().item())


def _assert_layers_compute_rounded_inputs_times_weights(model, path) -> None:
    """Run the model; each `QuantizedLinear`'s output equals its input (rounded, for the segments of
    32-weight block types) times the file's dequantized weights (float64 reference, up to float32
    summation; biases added)."""
    portable = load_model(path, torch.float32, "cpu", pack_for_cpu=False, cpu_kernels=False)
    modules = {name: module for name, module in portable.named_modules() if isinstance(module, QuantizedLinear)}
    weights = {name: [(qtype in DOT_TYPE_CODES, dequantize_rows(packed, qtype).double()) for qtype, packed in module.segments()]
               for name, module in modules.items()}
    checked = []

    def reference(name, x):  # [T, in] -> [T, out] float64
        x = x.float()
        out = torch.cat([(two_term_rounded(x) if rounded else x).double() @ w.t() for rounded, w in weights[name]], -1)
        return out if modules[name].bias is None else out + modules[name].bias.double()

    def checking(name, forward):  # the model's blocks call their projections' `forward` directly
        def checked_forward(x, *args, **kwargs):
            out = forward(x, *args, **kwargs)
            expected = reference(name, x)
            assert (out.double() - expected).abs().max().item() <= 3e-6 * expected.abs().max().item(), name
            checked.append(name)
            return out
        return checked_forward

    layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    for name, module in layers.items():
        module.forward = checking(name, module.forward)
    try:
        _run_engine_like(model, _token_ids(), 16, seed=3)
    finally:
        for module in layers.values():
            del module.forward
    assert set(checked) == set(weights)


def _quantize_linear_inputs(model: torch.nn.Module, path=None) -> None:
    """The `nn.Linear`s of `model` see their input rounded as `quant_dot_linear` rounds it: all of
    them, or with `path`, those whose tensor in that GGUF file has a 32-weight block type."""
    types = None if path is None else {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (types is None or types.get(gguf_name(f"{name}.weight")) in DOT_TYPE_CODES):
            module.register_forward_pre_hook(lambda module, args: (two_term_rounded(args[0]).to(args[0].dtype), *args[1:]))


def test_mixed_type_file_fuses_shards_of_different_types(tmp_path, tokenizer_dir):
    """Like llama.cpp's mixed files (Q4_K_M: some tensors in another type), q/k/v of one layer in
    different types, v even as float: the fused projection keeps one segment per type."""
    hf = tiny_hf_model("qwen2", use_sliding_window=False)  # q/k/v biases ride along
    types = {"attn_v": Q.F16, "attn_k": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F32}
    path = write_gguf(hf, tokenizer_dir, tmp_path / "mixed.gguf", Q.Q4_0, tensor_types=types)
    model = load_model(path, torch.float32, "cpu")
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.qtypes == [Q.Q4_0, Q.Q8_0, Q.F32]
    assert layer.mlp.gate_up_proj.qtypes == [Q.Q4_0, Q.Q4_1]
    assert not isinstance(layer.mlp.down_proj, QuantizedLinear)
    token_ids = _token_ids()
    _assert_layers_compute_rounded_inputs_times_weights(model, path)
    reference = _gguf_reference(path, hf)
    _quantize_linear_inputs(reference, path)
    expected = _hf_logits(reference, token_ids)
    for ours, ref in zip(_run_engine_like(model, token_ids, 8, seed=5), expected, strict=True):
        assert (ours - ref).abs().max().item() <= ACTIVATION_QUANT_ATOL * max(1.0, ref.abs().max().item())


def test_gguf_tokenizer_and_chat_template_match_the_hf_tokenizer(tmp_path, tokenizer_dir):
    path = write_gguf(tiny_hf_model("llama"), tokenizer_dir, tmp_path / "model.gguf", Q.Q8_0)
    ours, hf = load_tokenizer(path), load_tokenizer(tokenizer_dir)
    assert ours.vocab_size == hf.vocab_size and ours.eos_token_ids == {0}
    for text in ("def f(x):\n    return x  # café ☕", "  two  spaces<|im_end|>\tand tabs", "import os"):
        assert ours.encode(text) == hf.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_start|>"}]
    assert ours.encode_chat(messages) == hf.encode_chat(messages)
    assert "<|im_start|>" in ours.render_chat_template(messages)


def test_a_directory_with_one_gguf_loads_and_one_with_two_is_refused(tmp_path, tokenizer_dir):
    path = write_gguf(tiny_hf_model("qwen3"), tokenizer_dir, tmp_path / "a.gguf", Q.Q4_0)
    config = load_hf_config(tmp_path)
    assert config.architectures == ["Qwen3ForCausalLM"] and config.num_hidden_layers == 2
    assert isinstance(load_model(tmp_path, torch.float32, "cpu").model.layers[1].mlp.down_proj, QuantizedLinear)
    assert load_tokenizer(tmp_path).encode("x = 1") == load_tokenizer(path).encode("x = 1")
    (tmp_path / "b.gguf").write_bytes(path.read_bytes())
    with pytest.raises(UnsupportedModelError, match="2 GGUF files"):
        load_model(tmp_path, torch.float32, "cpu")


def test_unsupported_architecture_is_refused_by_name(tmp_path, tokenizer_dir):
    path = write_gguf(tiny_hf_model("llama"), tokenizer_dir, tmp_path / "m.gguf", architecture="phi3")
    with pytest.raises(UnsupportedModelError, match="'phi3'.*supported GGUF architectures: llama, mistral, qwen2, qwen3"):
        load_model(path, torch.float32, "cpu")


def test_unsupported_quantization_type_is_refused_by_name(tmp_path, tokenizer_dir):
    path = write_gguf(tiny_hf_model("llama"), tokenizer_dir, tmp_path / "m.gguf", Q.Q5_0)
    with pytest.raises(UnsupportedModelError, match=r"Q5_0.*supported types: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K"):
        load_model(path, torch.float32, "cpu")
    result = subprocess.run(
        [sys.executable, "-m", "helix_server", "generate", "--model", str(path), "--prompt", "x"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0
    assert "Q5_0" in result.stderr and "Q4_1" in result.stderr


def test_serving_a_gguf_file_imports_neither_transformers_config_classes_nor_sympy(tmp_path, tokenizer_dir):
    """transformers 5's config classes import its modeling stack (torch.distributed, sympy), and
    `to_empty` imports torch's symbolic shapes (sympy): together ~100 MB resident in a server."""
    path = write_gguf(tiny_hf_model("llama"), tokenizer_dir, tmp_path / "m.gguf", Q.Q8_0)
    code = (
        "import sys\n"
        "from helix_server import LLM, SamplingParams\n"
        f"llm = LLM({str(path)!r}, num_kv_blocks=16)\n"
        "llm.generate(['x = 1'], SamplingParams(max_tokens=2))\n"
        "print(sorted(m for m in ('sympy', 'torch.distributed.tensor', 'transformers.models.llama.configuration_llama') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_engine_parses_its_gguf_file_once(tmp_path, tokenizer_dir, monkeypatch):
    """The config and the weights come from one parse (`open_gguf`): a parse takes ~2 s on
    SmolLM2-135M's file, and the engine used to make two."""
    from helix_server import LLM, SamplingParams
    from helix_server.models import gguf_checkpoint

    path = write_gguf(tiny_hf_model("llama"), tokenizer_dir, tmp_path / "m.gguf", Q.Q8_0)
    parses = []
    read_tables = gguf_checkpoint._read_tables
    monkeypatch.setattr(gguf_checkpoint, "_read_tables", lambda p: parses.append(p) or read_tables(p))
    llm = LLM(str(path), num_kv_blocks=16)
    assert parses == [path]
    assert llm.generate(["x = 1"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_safetensors_directories_still_load(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    assert not any(isinstance(m, QuantizedLinear) for m in load_model(model_dir, torch.float32, "cpu").modules())


@pytest.mark.skipif(not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler")
@pytest.mark.parametrize("qtype", (Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q6_K), ids=lambda q: q.name)
def test_a_requests_output_on_the_quantized_kernel_does_not_depend_on_its_batch(tmp_path, tokenizer_dir, qtype):
    """Every sampled token's logprob, bitwise, alone and among other requests (helix's kernel:
    rows independent of the batch by construction; the portable torch path is not)."""
    from helix_server import LLM

    # K-quants need rows of 256 weights.
    shape = {"hidden_size": 256, "intermediate_size": 512} if qtype in K_TYPES else {"hidden_size": 128, "intermediate_size": 384}
    hf = tiny_hf_model("llama", **shape)
    path = write_gguf(hf, tokenizer_dir, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    # Without prefix caching: a cache hit computes a prompt's tail as a chunk after cached context,
    # another attention path with other last bits (the same tokens, not the same logprob bits).
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=256, enable_prefix_caching=False)
    assert all(m.native for m in llm.engine.runner.model.modules() if isinstance(m, QuantizedLinear))
    assert_logprobs_do_not_depend_on_the_batch(llm)
