"""RMSNorm against transformers' Llama RMSNorm: bitwise the same, with and without the fused residual add."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from helix_server.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 768])
def test_rms_norm_is_bitwise_transformers(dtype, hidden):
    generator = torch.Generator().manual_seed(hidden)
    weight = torch.randn(hidden, generator=generator).to(dtype)
    ours, theirs = RMSNorm(hidden, eps=1e-5).to(dtype), LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    x = (3 * torch.randn(37, hidden, generator=generator)).to(dtype)
    residual = torch.randn(37, hidden, generator=generator).to(dtype)
    with torch.inference_mode():
        assert torch.equal(ours(x), theirs(x))
        assert torch.equal(ours(x[5:6]), ours(x)[5:6]), "a row's result must not depend on the others"
        summed = residual + x
        normed, new_residual = ours(x, residual.clone())
        assert torch.equal(new_residual, summed)
        assert torch.equal(normed, theirs(summed))
