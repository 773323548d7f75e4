"""`--quantization int8`: a safetensors model's projections and LM head quantized at load.

References: the same model in float32 with every quantized weight replaced by its dequantized
value (scale * q): the int8 model must match it to float32 rounding, so the only difference from
the float model is the weight quantization; and the float model itself, within the error that
quantization is expected to make (see `test_int8_logits_are_close_to_the_float_model`).
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from helix_server import LLM, SamplingParams
from helix_server.errors import ParameterError
from helix_server.layers.cpu_kernels import cpu_kernels_supported
from helix_server.layers.int8_linear import Int8Linear, quantize_per_channel
from helix_server.models import load_model
from helix_server.settings import build_config
from tests.fixtures.batch_invariance import assert_logprobs_do_not_depend_on_the_batch
from tests.models.test_logits_vs_transformers import SEQ_LENS, _run_engine_like

needs_kernels = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler"
)
SHAPE = {"hidden_size": 128, "intermediate_size": 384}


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir("llama", **SHAPE)


def _token_ids():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=gen) for n in SEQ_LENS]


def _dequantized_reference(model_dir) -> nn.Module:
    """The float32 model (torch's kernels) with every linear weight replaced by scale * q."""
    model = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * model.num_layers + 1  # qkv, o, gate_up, down per layer; the LM head
    with torch.no_grad():
        for linear in linears:
            q, scale = quantize_per_channel(linear.weight)
            linear.weight.copy_(scale[:, None] * q.to(torch.float32))
    return model


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=needs_kernels)], ids=["portable", "cpu-kernels"])
def test_int8_model_matches_the_float_model_on_its_dequantized_weights(model_dir, kernels):
    model = load_model(model_dir, torch.float32, "cpu", quantization="int8", pack_for_cpu=kernels, cpu_kernels=kernels)
    layer = model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj,
                   model.lm_head):
        assert isinstance(linear, Int8Linear) and linear.native == kernels and linear.weight.dtype == torch.int8
    assert model.lm_head.float_out
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    token_ids = _token_ids()
    reference = _dequantized_reference(model_dir)
    for ours, ref in zip(_run_engine_like(model, token_ids, 8, 0), _run_engine_like(reference, token_ids, 8, 0),
                         strict=True):
        assert ref.std(dim=-1).min().item() > 0.5
        assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_int8_logits_are_close_to_the_float_model(model_dir):
    """Tolerance: the centred logits' RMS error at most 10% of their RMS. Why: rounding to 255
    levels over a row's range leaves each weight off by a uniform error of RMS step / sqrt(12), with
    step = max|w| / 127 ~ 3.5 sigma / 127 for these Gaussian rows: ~0.8% of the weights' RMS, and so
    of each product's output. Seven quantized products feed a logit (4 per layer x 2, the last
    layer's after the attention only counts once, plus the LM head), adding ~2% in quadrature, which
    these random models (weights 12x HF's initial spread) amplify a few times: measured 3-5%. A
    wrong scale or a lost sign would be off by 100%; float noise alone is 1e-6."""
    token_ids = _token_ids()
    floats = _run_engine_like(load_model(model_dir, torch.float32, "cpu"), token_ids, 8, 0)
    int8 = _run_engine_like(load_model(model_dir, torch.float32, "cpu", quantization="int8"), token_ids, 8, 0)
    for ours, ref in zip(int8, floats, strict=True):
        ours, ref = ours - ours.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True)
        relative = ((ours - ref).norm() / ref.norm()).item()
        assert 1e-3 < relative <= 0.1, relative


def test_linear_weight_bytes_shrink_about_four_times(model_dir):
    floats = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    int8 = load_model(model_dir, torch.float32, "cpu", quantization="int8", pack_for_cpu=False)

    def linear_bytes(model, kind):
        layers = [m for m in model.modules() if isinstance(m, kind)]
        return len(layers), sum(t.numel() * t.element_size() for m in layers for t in (*m.buffers(), *m.parameters()))

    count, float_bytes = linear_bytes(floats, nn.Linear)
    assert linear_bytes(int8, Int8Linear)[0] == count
    # One byte a weight and one float32 scale a row: (in + 4) / (4 in) = 0.258 for 128 inputs.
    assert linear_bytes(int8, Int8Linear)[1] / float_bytes < 0.26


def test_a_tied_lm_head_gets_its_own_int8_copy_and_the_embedding_stays_float(make_model_dir):
    model = load_model(make_model_dir("llama3_rope"), torch.float32, "cpu", quantization="int8")
    assert model.arch.tie_word_embeddings
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.float_out
    q, scale = quantize_per_channel(model.model.embed_tokens.weight)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, q) and torch.equal(model.lm_head.weight_scale, scale)


def test_bad_values_are_refused_naming_the_setting(model_dir, tmp_path, tokenizer_dir):
    with pytest.raises(ParameterError, match="--quantization 'int4' is not supported; supported: int8") as info:
        LLM(model=str(model_dir), quantization="int4")
    assert info.value.param == "quantization"
    with pytest.raises(ParameterError, match="HELIX_QUANTIZATION") as info:
        build_config(env={"HELIX_QUANTIZATION": "fp4"})
    assert info.value.param == "quantization"
    assert build_config(env={"HELIX_QUANTIZATION": "None"}).engine.model.quantization is None
    assert build_config(flags={"quantization": "int8"}).engine.model.quantization == "int8"

    from gguf import GGMLQuantizationType

    from tests.fixtures.gguf_files import write_gguf
    from tests.fixtures.tiny_models import tiny_hf_model

    gguf_path = write_gguf(tiny_hf_model("llama"), tokenizer_dir, tmp_path / "m.gguf", GGMLQuantizationType.Q8_0)
    with pytest.raises(ParameterError, match="applies to safetensors models; m.gguf is a GGUF file") as info:
        load_model(gguf_path, torch.float32, "cpu", quantization="int8")
    assert info.value.param == "quantization"

    result = subprocess.run(
        [sys.executable, "-m", "helix_server", "generate", "--model", str(model_dir), "--quantization", "q3",
         "--prompt", "x"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0 and "--quantization" in result.stderr and "'q3'" in result.stderr


@needs_kernels
def test_a_requests_output_does_not_depend_on_its_batch(model_dir):
    """Every sampled token's logprob, bitwise, alone and among other requests (the int8 kernel's
    rows are independent of the batch; the portable path's are not)."""
    llm = LLM(model=str(model_dir), dtype="float32", quantization="int8", num_kv_blocks=256,
              enable_prefix_caching=False)
    assert all(m.native for m in llm.engine.runner.model.modules() if isinstance(m, Int8Linear))
    assert_logprobs_do_not_depend_on_the_batch(llm)


@needs_kernels
def test_greedy_is_identical_with_and_without_ngram_speculation(model_dir):
    plain = LLM(model=str(model_dir), dtype="float32", quantization="int8", num_kv_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    rng = random.Random(3)
    # Repeated chunks give prompt lookup (n-gram) something to find.
    chunks = [[rng.randrange(3, 500) for _ in range(rng.randint(2, 12))] for _ in range(12)]
    prompts = [(chunk * rng.randint(2, 4))[:60] for chunk in chunks]
    expected = [r.outputs[0].token_ids for r in plain.generate(prompts, params)]
    spec = LLM(model=str(model_dir), dtype="float32", quantization="int8", num_kv_blocks=256,
               speculative_method="ngram", num_speculative_tokens=3)
    assert [r.outputs[0].token_ids for r in spec.generate(prompts, params)] == expected
    stats = spec.engine.stats()
    assert stats.spec_num_draft_tokens_total > 0 and stats.spec_num_accepted_tokens_total > 0


@needs_kernels
def test_on_a_cpu_with_avx2_only_the_int8_layers_run_the_avx2_kernel(model_dir, monkeypatch):
    """The CPU's flags as an AVX2 machine reports them: no AVX-512 kernels (panels, fused ops), the
    quantized layers on the AVX2 kernel, the same logits as the dequantized float model."""
    from helix_server.layers import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    model = load_model(model_dir, torch.float32, "cpu", quantization="int8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 4 * model.num_layers + 1 and all(m.native and m.op_suffix == "_avx2" for m in layers)
    token_ids = _token_ids()
    reference = _dequantized_reference(model_dir)
    for ours, ref in zip(_run_engine_like(model, token_ids, 8, 0), _run_engine_like(reference, token_ids, 8, 0),
                         strict=True):
        assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
