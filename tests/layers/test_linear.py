"""The CPU fast path for linear layers (pre-packed oneDNN weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helix_server.layers.linear import (
    BULK_CHUNK_TOKENS,
    Linear,
    PackedLinear,
    bulk_float32_supported,
    bulk_row_start,
    cpu_packing_supported,
    pack_linear_layers,
)
from helix_server.layers.panel_linear import PanelLinear, panel_linear_supported
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
    # float32: helix's own kernel where it builds, else oneDNN's.
    kind = PanelLinear if panel_linear_supported(torch.device("cpu"), torch.float32) else PackedLinear
    assert isinstance(packed.lm_head, kind)
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    assert not any(isinstance(m, (PackedLinear, PanelLinear)) for m in plain.modules())
    hidden = torch.randn(4, 64)
    torch.testing.assert_close(packed.compute_logits(hidden), plain.compute_logits(hidden), atol=1e-5, rtol=1e-5)


def test_bulk_row_start_is_the_first_row_of_the_long_chunks_at_the_end():
    long = BULK_CHUNK_TOKENS
    assert bulk_row_start([]) is None
    assert bulk_row_start([1, 1, 3, long - 1]) is None
    assert bulk_row_start([1, 1, 20, long, long + 500]) == 22
    assert bulk_row_start([long]) == 0
    with pytest.raises(ValueError, match="last"):
        bulk_row_start([1, long, 20])


def test_plain_linear_takes_and_ignores_bulk_start():
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x, 1), nn.functional.linear(x, layer.weight, layer.bias))


needs_bulk_route = pytest.mark.skipif(
    not cpu_packing_supported(torch.device("cpu"), torch.bfloat16) or not bulk_float32_supported(),
    reason="no packed bfloat16 oneDNN linear with a float32 route in this torch build",
)


@needs_bulk_route
@pytest.mark.parametrize("shape", [(1280, 768), (768, 2048)])  # 2,048 inputs: where kernels vary most
@pytest.mark.parametrize("bias", [False, True])
def test_bulk_rows_are_computed_in_float32_and_the_other_rows_keep_their_bits(shape, bias):
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(*shape, generator=generator) * 0.05).to(torch.bfloat16)
    b = (torch.randn(shape[0], generator=generator) * 0.05).to(torch.bfloat16) if bias else None
    routed = PackedLinear(weight, b, bulk_in_float32=True)
    plain = PackedLinear(weight, b)
    x = torch.randn(900, shape[1], generator=generator).to(torch.bfloat16)
    start = 20
    with torch.inference_mode():
        out = routed(x, bulk_start=start)
        # The head rows: exactly what the bfloat16 kernel gives (as if there were no bulk rows).
        assert torch.equal(out[:start], plain(x[:start]))
        # The bulk rows: float32 sums rounded once to bfloat16 (within half an ulp, 2^-8 relative,
        # of the float32 result, up to summation order near 0), other bits than the bf16 kernel's.
        reference = nn.functional.linear(x[start:].float(), weight.float(), None if b is None else b.float())
        torch.testing.assert_close(out[start:].float(), reference, atol=1e-5, rtol=2**-8)
        assert not torch.equal(out[start:], plain(x[start:])), "the float32 route was not taken"
        # A bulk row's bits do not depend on the other rows of the call (chunks sharing the step).
        for rows in (slice(start, start + BULK_CHUNK_TOKENS), slice(400, 900), slice(start + 1, 700)):
            assert torch.equal(routed(x[rows], bulk_start=0), out[rows])
        # Without a bulk start every row takes the bfloat16 kernel.
        assert torch.equal(routed(x), plain(x))


@needs_bulk_route
def test_float32_weights_never_take_the_bulk_route():
    weight = torch.randn(16, 32)
    layer = PackedLinear(weight, None, bulk_in_float32=True)
    assert not layer.bulk_in_float32
    x = torch.randn(300, 32)
    with torch.inference_mode():
        assert torch.equal(layer(x, bulk_start=0), PackedLinear(weight, None)(x))


@needs_bulk_route
def test_a_bfloat16_model_takes_the_bulk_route_on_cpus_without_amx(tmp_path):
    from helix_server.platform import cpu_has_amx

    model_dir = make_tiny_model(tmp_path, "llama")
    # oneDNN's layers: where helix's kernels do not build (or are turned off).
    model = load_model(model_dir, torch.bfloat16, "cpu", cpu_kernels=False)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(layer.bulk_in_float32 == (not cpu_has_amx()) for layer in layers)
    # helix's bfloat16 panels have no route: every row is summed in float32 already.
    model = load_model(model_dir, torch.bfloat16, "cpu")
    assert not any(isinstance(m, PackedLinear) and m.bulk_in_float32 for m in model.modules())
    # float32 weights: no route (on oneDNN's kernel, or helix's own, which has none).
    model = load_model(model_dir, torch.float32, "cpu")
    assert not any(isinstance(m, PackedLinear) and m.bulk_in_float32 for m in model.modules())
