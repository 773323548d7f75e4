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

