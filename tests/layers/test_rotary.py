"""RoPE, RMSNorm and SiluAndMul against transformers' own functions (bit-exact where the math allows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from helix_server.errors import UnsupportedModelError
from helix_server.layers.activation import SiluAndMul
from helix_server.layers.norm import RMSNorm
from helix_server.layers.rotary import RopeConfig, RotaryEmbedding, rope_inverse_frequencies
from helix_server.models.hf_config import read_rope_config

HEAD_DIM = 32
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": LLAMA3,
}


def _hf_config(rope_parameters):
    return LlamaConfig(
        hidden_size=HEAD_DIM * 2,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        rope_parameters=dict(rope_parameters),
    )


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inverse_frequencies_equal_transformers(case):
    config = _hf_config(ROPE_CASES[case])
    if case == "default":
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[case](config, "cpu")
    ours = rope_inverse_frequencies(read_rope_config(config), HEAD_DIM)
    assert torch.equal(ours, expected.float())


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_matches_transformers(case, dtype):
    config = _hf_config(ROPE_CASES[case])
    hf_rope = LlamaRotaryEmbedding(config)
    rope = RotaryEmbedding(read_rope_config(config), HEAD_DIM, config.max_position_embeddings)
    rope.build_cache("cpu", dtype)

    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 5, 1, 300, 511, 64, 127, 128])  # shuffled, as in a mixed batch
    q = torch.randn(len(positions), 4, HEAD_DIM, generator=gen).to(dtype)  # [T, H, d]
    k = torch.randn(len(positions), 2, HEAD_DIM, generator=gen).to(dtype)  # [T, kvH, d]
    cos, sin = hf_rope(q, positions[None])  # [1, T, d]
    # transformers' layout is [B, H, T, d]; put the heads first and back.
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)

    ours_q, ours_k = rope.apply(positions, q.clone(), k.clone())
    assert torch.equal(ours_q, hf_q[0].transpose(0, 1))
    assert torch.equal(ours_k, hf_k[0].transpose(0, 1))


def test_cos_sin_cache_can_be_capped_and_is_float32_math():
    rope = RotaryEmbedding(RopeConfig(), HEAD_DIM, 4096)
    rope.build_cache("cpu", torch.bfloat16, max_positions=100)
    assert rope.cos_sin_cache.shape == (100, 2 * HEAD_DIM)
    angle = 99 * rope.inv_freq[0].item()
    assert rope.cos_sin_cache[99, 0].item() == torch.tensor(angle).cos().to(torch.bfloat16).item()


def test_unsupported_rope_type_lists_supported_ones():
    with pytest.raises(UnsupportedModelError, match="default, linear, llama3"):
        read_rope_config(_hf_config({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}))


def test_v4_style_rope_attributes():
    """transformers v4 configs: `rope_theta` attribute plus `rope_scaling` with the old `type` key."""

    class V4Config:
        rope_theta = 5000.0
        rope_scaling = {"type": "linear", "factor": 2.0}
        max_position_embeddings = 64

    rope = read_rope_config(V4Config())
    assert rope == RopeConfig(rope_type="linear", theta=5000.0, factor=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_transformers_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    hf = LlamaRMSNorm(64, eps=1e-5)
    ours = RMSNorm(64, eps=1e-5)
    weight = 1 + 0.2 * torch.randn(64, generator=gen)
    hf.weight.data.copy_(weight)
    ours.weight.data.copy_(weight)
    hf.to(dtype)
    ours.to(dtype)
    x = (3 * torch.randn(7, 64, generator=gen)).to(dtype)
    with torch.inference_mode():
        assert torch.equal(ours(x), hf(x))
        residual = torch.randn(7, 64, generator=gen).to(dtype)
        expected_residual = residual + x
        normed, new_residual = ours(x, residual.clone())
        assert torch.equal(new_residual, expected_residual)
        assert torch.equal(normed, hf(expected_residual))


def test_silu_and_mul():
    x = torch.randn(5, 2 * 24)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :24]) * x[:, 24:], atol=0, rtol=0)
