"""The CPU fast path for linear layers (pre-packed oneDNN weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helix_server.layers.linear import PackedLinear, cpu_packing_supported, pack_linear_layers
from helix_server.models import load_model
from tests.fixtures.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(
    not cpu_packing_supported(torch.device("cpu"), torch.float32),
    reason="this torch build has no oneDNN linear (the fast path is then simply not used)",
)


def test_packed_linear_matches_f_linear_with_and_without_bias():
    generator = torch.Generator().manual_seed(0)
    for bias in (None, torch.randn(48, generator=generator)):
        weight = torch.randn(48, 96, generator=generator)
        x = torch.randn(7, 96, generator=generator)
        torch.testing.assert_close(PackedLinear(weight, bias)(x), nn.functional.linear(x, weight, bias))


# (out, in): 2048 and 4096 input features are where oneDNN (torch 2.13, this CPU) computes a lone
# row with a different kernel than a batch (float32; bfloat16 too, where rounding does not hide
# it); the layer has to hide that.
@pytest.mark.parametrize("shape", [(512, 256), (768, 2048), (256, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_rest_of_the_batch(shape, dtype):
    if not cpu_packing_supported(torch.device("cpu"), dtype):
        pytest.skip(f"no packed oneDNN linear for {dtype} in this torch build")
    generator = torch.Generator().manual_seed(1)
    layer = PackedLinear(torch.randn(*shape, generator=generator).to(dtype), None)
    x = torch.randn(32, shape[1], generator=generator).to(dtype)
    with torch.inference_mode():
        batched = layer(x)
        for row in range(4):
            assert torch.equal(layer(x[row : row + 1]), batched[row : row + 1])
        for rows in (2, 3, 4, 8, 16):
            assert torch.equal(layer(x[:rows]), batched[:rows])


def test_pack_linear_layers_swaps_every_linear_and_keeps_the_function():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    x = torch.randn(5, 8)
    expected = model(x)
    assert pack_linear_layers(model) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("arch", ["llama", "llama3_rope"])  # untied and tied LM heads
def test_packed_model_computes_the_same_logits(tmp_path, arch):
    model_dir = make_tiny_model(tmp_path, arch)
    packed = load_model(model_dir, torch.float32, "cpu")
    plain = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    assert isinstance(packed.lm_head, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    hidden = torch.randn(4, 64)
    torch.testing.assert_close(packed.compute_logits(hidden), plain.compute_logits(hidden), atol=1e-5, rtol=1e-5)
