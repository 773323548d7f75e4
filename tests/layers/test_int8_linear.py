"""Weight-only int8 layers (`helix_server.layers.int8_linear`): the per-channel quantization, the
portable torch path and helix's kernel (`helix::int8_linear`, `cpu_kernels/quant_gemm_int8.cpp`)."""

from __future__ import annotations

import pytest
import torch

from helix_server.layers import int8_linear
from helix_server.layers.cpu_kernels import cpu_kernels_supported, load_cpu_kernels
from helix_server.layers.int8_linear import Int8Linear, quantize_per_channel

needs_kernels = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler"
)
EPS = 2.0**-23


def _layer(out_features: int, in_features: int, seed: int, native: bool, bias: bool = True) -> Int8Linear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    layer = Int8Linear(weight, torch.randn(out_features, generator=gen) if bias else None)
    if native:
        assert load_cpu_kernels()
        layer.use_cpu_kernels()
    return layer


def _run(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return layer(x)


def test_per_channel_quantization_is_symmetric_and_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 200, generator=gen) * torch.logspace(-3, 2, 48)[:, None]  # rows of any scale
    weight[5] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert q.abs().max().item() == 127 and q.min().item() >= -127
    torch.testing.assert_close(scale, weight.abs().amax(dim=1) / 127, rtol=0, atol=0)
    assert scale[5].item() == 0.0 and not q[5].any()
    # Each row's largest weight is exactly +-127 steps; every weight is within half a step.
    assert torch.equal(q.abs().amax(dim=1)[scale > 0], torch.full((47,), 127, dtype=torch.int8))
    error = (weight.double() - scale.double()[:, None] * q.double()).abs()
    assert (error <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_kernels)], ids=["portable", "kernel"])
@pytest.mark.parametrize("shape", [(40, 64), (576, 1536), (37, 100), (5, 7)])
def test_int8_linear_computes_x_times_the_dequantized_weight(native, shape, monkeypatch):
    monkeypatch.setattr(int8_linear, "CHUNK_WEIGHTS", 7 * shape[1])  # portable: 7 rows a chunk, uneven split
    layer = _layer(*shape, seed=1, native=native)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(19, shape[1], generator=gen)
    weight = layer.weight_scale.double()[:, None] * layer.weight.double()  # [out, in] as held
    reference = x.double() @ weight.T + layer.bias.double()
    got = _run(layer, x)
    assert got.shape == (19, shape[0]) and got.dtype == torch.float32
    # float32 sums of exact products, one scale multiply and one bias add: a few ulps of the
    # magnitudes' sum.
    tolerance = 16 * EPS * (x.abs().double() @ weight.abs().T + layer.bias.abs().double())
    assert ((got.double() - reference).abs() <= tolerance).all()


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_kernels)], ids=["portable", "kernel"])
def test_int8_linear_is_within_the_quantization_bound_of_the_float_layer(native):
    """|y_int8 - y_float| <= sum_k |x_k| * scale_n / 2 (each weight is off by at most half a step),
    plus float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(96, 256, generator=gen), torch.randn(96, generator=gen)
    layer = Int8Linear(weight, bias)
    if native:
        assert load_cpu_kernels()
        layer.use_cpu_kernels()
    x = torch.randn(11, 256, generator=gen)
    exact = x.double() @ weight.double().T + bias.double()
    bound = x.abs().double().sum(dim=1, keepdim=True) * layer.weight_scale.double() / 2
    rounding = 16 * EPS * (x.abs().double() @ weight.abs().double().T + bias.abs().double())
    error = (_run(layer, x).double() - exact).abs()
    assert (error <= bound + rounding).all()
    # Not vacuous: the bound is a small fraction of the outputs' spread, and the error is real.
    assert bound.max().item() < 0.25 * exact.std().item() and error.max().item() > 1e-4


def test_bfloat16_inputs_give_bfloat16_outputs_and_float_out_gives_float32():
    layer = _layer(24, 64, seed=4, native=False)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert _run(layer, x).dtype == torch.bfloat16
    layer.float_out = True
    assert _run(layer, x).dtype == torch.float32


def test_weight_bytes_are_a_quarter_of_float32():
    layer = _layer(1536, 576, seed=5, native=False, bias=False)
    held = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert held == 1536 * 576 + 1536 * 4  # one byte a weight, one float32 scale a row
    assert held / (1536 * 576 * 4) < 0.26


@needs_kernels
def test_a_rows_result_is_bitwise_the_same_in_any_batch_tile_and_thread_count():
    layer = _layer(301, 200, seed=6, native=True)  # 301 outputs: a partial group of 4; 200 inputs: a tail of 8
    x = torch.randn(21, 200, generator=torch.Generator().manual_seed(7))
    together = _run(layer, x)
    for rows in (1, 2, 3, 4, 5, 8, 9, 13):
        assert torch.equal(_run(layer, x[:rows]), together[:rows]), rows
        assert torch.equal(_run(layer, x[rows : rows + 1]), together[rows : rows + 1]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_run(layer, x), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_bad_operands_are_refused_with_a_message():
    assert load_cpu_kernels()
    q, scale = torch.zeros(4, 32, dtype=torch.int8), torch.ones(4)
    op = torch.ops.helix.int8_linear
    with pytest.raises(RuntimeError, match=r"weight must be contiguous int8 \[out_features, 33\]"):
        op(torch.zeros(1, 33), q, scale)
    with pytest.raises(RuntimeError, match=r"weight must be contiguous int8"):
        op(torch.zeros(1, 32), q.to(torch.uint8), scale)
    with pytest.raises(RuntimeError, match=r"scale must be contiguous float32 \[4\]"):
        op(torch.zeros(1, 32), q, torch.ones(5))
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.zeros(1, 32, dtype=torch.float64), q, scale)


@needs_kernels
@pytest.mark.parametrize("shape", [(301, 200), (7, 16), (64, 1536), (3, 5)])
def test_the_avx2_kernel_gives_the_avx512_kernels_bits(shape):
    layer = _layer(*shape, seed=8, native=True)
    x = torch.randn(11, shape[1], generator=torch.Generator().manual_seed(9))
    expected = _run(layer, x)
    layer.use_cpu_kernels("avx2")
    assert layer.op_suffix == "_avx2"
    for rows in (11, 1, 4, 5):
        assert torch.equal(_run(layer, x[:rows]).view(torch.int32), expected[:rows].view(torch.int32)), rows


@needs_kernels
def test_the_avx2_kernel_refuses_bad_operands_too():
    assert load_cpu_kernels()
    with pytest.raises(RuntimeError, match=r"int8_linear_avx2: scale must be contiguous float32 \[4\]"):
        torch.ops.helix.int8_linear_avx2(torch.zeros(1, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(3))
