"""helix's AVX-512 kernel over GGUF's packed blocks (`helix::quant_linear`, `cpu_kernels/quant_gemm.cpp`)
against gguf's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helix_server.layers.cpu_kernels import cpu_kernels_supported, load_cpu_kernels

gguf = pytest.importorskip("gguf", reason="the gguf package (a dependency) writes and reads the blocks")

pytestmark = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler"
)

# The op's quantization type codes.
TYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2}


def packed(weight: np.ndarray, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [N, K] -> (raw blocks uint8 [N, bytes per row], gguf's dequantized float32 [N, K])."""
    qtype = getattr(gguf.GGMLQuantizationType, name)
    raw = gguf.quants.quantize(weight, qtype)  # uint8 [N, bytes per row]
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(gguf.quants.dequantize(raw, qtype))


def quant_linear(x: torch.Tensor, raw: torch.Tensor, name: str) -> torch.Tensor:
    with torch.inference_mode():
        return torch.ops.helix.quant_linear(x, raw, TYPES[name], raw.shape[0])


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("shape", [(40, 64), (576, 1536), (37, 96)])
def test_quant_linear_matches_gguf_dequantization(name, shape):
    assert load_cpu_kernels()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)
    raw, dequantized = packed(weight, name)
    x = torch.from_numpy(rng.standard_normal((19, shape[1])).astype(np.float32))
    got = quant_linear(x, raw, name)
    reference = x.double() @ dequantized.double().T
    # float32 sums of exact products of the dequantized weights: a few ulps of the magnitudes' sum.
    tolerance = 16 * 2**-23 * (x.abs().double() @ dequantized.abs().double().T)
    assert got.shape == (19, shape[0]) and got.dtype == torch.float32
    assert ((got.double() - reference).abs() <= tolerance + 1e-30).all()


@pytest.mark.parametrize("name", list(TYPES))
def test_a_rows_result_is_bitwise_the_same_in_any_batch_and_thread_count(name):
    assert load_cpu_kernels()
    rng = np.random.default_rng(1)
    raw, _ = packed(rng.standard_normal((300, 256)).astype(np.float32), name)
    x = torch.from_numpy(rng.standard_normal((21, 256)).astype(np.float32))
    together = quant_linear(x, raw, name)
    for rows in (1, 2, 5, 8, 9, 16):
        assert torch.equal(quant_linear(x[:rows], raw, name), together[:rows]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(quant_linear(x, raw, name), together)
    finally:
        torch.set_num_threads(threads)


def test_bad_operands_are_refused_with_a_message():
    assert load_cpu_kernels()
    raw = torch.zeros(4, 18, dtype=torch.uint8)  # one Q4_0 block per row: 32 inputs
    with pytest.raises(RuntimeError, match="not a multiple of 32"):
        quant_linear(torch.zeros(1, 33), raw, "Q4_0")
    with pytest.raises(RuntimeError, match=r"weight must be contiguous uint8 \[4, 20\]"):
        quant_linear(torch.zeros(1, 32), raw, "Q4_1")  # Q4_1 blocks are 20 bytes
    with pytest.raises(RuntimeError, match="unknown quantization type"):
        torch.ops.helix.quant_linear(torch.zeros(1, 32), raw, 7, 4)
    with pytest.raises(RuntimeError, match="float32"):
        quant_linear(torch.zeros(1, 32, dtype=torch.float64), raw, "Q4_0")


# ---------------------------------------------------------------- int8 activations (VNNI)

needs_vnni = pytest.mark.skipif(
    "avx512_vnni" not in __import__("helix_server.platform.device", fromlist=["cpu_flags"]).cpu_flags(),
    reason="quant_linear_q8 needs AVX512-VNNI",
)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's Q8 blocks of a float32 [M, K]: int8 q [M, K] and dx [M, K / 32], dx = max|x| / 127,
    q = x * (127 / max|x|) rounded to nearest even (what the kernel computes, in float32)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    return q.reshape(x.shape).astype(np.float64), (amax[..., 0] / np.float32(127)).astype(np.float32)


@needs_vnni
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("shape", [(40, 64), (576, 1536), (37, 96)])  # 96: an odd number of blocks
def test_quant_linear_q8_matches_the_same_product_done_in_float64(name, shape):
    """The kernel's product: x quantized per block of 32, weights as gguf dequantizes them."""
    assert load_cpu_kernels()
    rng = np.random.default_rng(2)
    weight = rng.standard_normal(shape).astype(np.float32)
    raw, dequantized = packed(weight, name)
    x = rng.standard_normal((11, shape[1])).astype(np.float32)
    xq, dx = quantize_activations(x)
    x_hat = (xq.reshape(11, -1, 32) * dx[..., None].astype(np.float64)).reshape(x.shape)  # [M, K]
    reference = x_hat @ dequantized.double().numpy().T
    with torch.inference_mode():
        got = torch.ops.helix.quant_linear_q8(torch.from_numpy(x), raw, TYPES[name], shape[0]).double().numpy()
    # float32 scaling and accumulation of exact integer block sums.
    tolerance = 64 * 2**-23 * (np.abs(x_hat) @ np.abs(dequantized.double().numpy()).T)
    assert (np.abs(got - reference) <= tolerance + 1e-30).all()
    # And close to the float path's product (the activations' 8 bits cost ~1% here).
    exact = (torch.from_numpy(x).double() @ dequantized.double().T).numpy()
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()


@needs_vnni
@pytest.mark.parametrize("name", list(TYPES))
def test_quant_linear_q8_rows_are_bitwise_the_same_in_any_batch(name):
    assert load_cpu_kernels()
    rng = np.random.default_rng(3)
    raw, _ = packed(rng.standard_normal((200, 320)).astype(np.float32), name)
    x = torch.from_numpy(rng.standard_normal((19, 320)).astype(np.float32))
    with torch.inference_mode():
        together = torch.ops.helix.quant_linear_q8(x, raw, TYPES[name], 200)
        for rows in (1, 3, 8, 9, 17):
            assert torch.equal(torch.ops.helix.quant_linear_q8(x[:rows], raw, TYPES[name], 200), together[:rows])
