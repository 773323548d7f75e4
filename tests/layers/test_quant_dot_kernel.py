"""helix's integer dot-product kernels (`helix::quant_dot_linear`, `cpu_kernels/quant_dot.cpp`, AVX-512
VNNI; `quant_dot_linear_avx2`) over GGUF Q8_0, Q4_0 and Q4_1 weights repacked by `repack_for_dot`.

What they promise: y = (x rounded to int8 per block of 32, as llama.cpp rounds it) times the file's
dequantized weights, up to float32 rounding; the same bits on both instruction sets; a row's result
independent of the other rows and the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helix_server.layers.cpu_kernels import load_quant_kernels, quant_kernel_isa
from helix_server.layers.quant_repack import DOT_TYPE_CODES, file_rows_from_dot_layout, repack_for_dot
from helix_server.layers.quantized_linear import (
    QuantizedLinear,
    QuantizedWeight,
    dequantize_rows,
    dot_kernel_suffix,
)
from tests.fixtures.activation_rounding import two_term_rounded
from tests.fixtures.gguf_files import random_k_blocks

gguf = pytest.importorskip("gguf", reason="the gguf package (a dependency) writes and reads the blocks")

pytestmark = pytest.mark.skipif(quant_kernel_isa() is None, reason="helix's quantized-weight kernels need AVX2 or AVX-512")

TYPES = [qtype.name for qtype in DOT_TYPE_CODES]
# The AVX-512 op where this CPU runs it (`dot_kernel_suffix`: it needs VNNI); forced AVX2 anywhere.
SUFFIXES = ["_avx2", ""] if quant_kernel_isa() is not None and dot_kernel_suffix() == "" else ["_avx2"]


def file_rows(shape: tuple[int, int], name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the file's rows uint8 [N, bytes], gguf's dequantized float32 [N, K]) of random weights."""
    qtype = getattr(gguf.GGMLQuantizationType, name)
    raw = gguf.quants.quantize(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05, qtype)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(gguf.quants.dequantize(raw, qtype))


def dot_linear(x: torch.Tensor, raw: torch.Tensor, name: str, suffix: str) -> torch.Tensor:
    qtype = getattr(gguf.GGMLQuantizationType, name)
    return getattr(torch.ops.helix, "quant_dot_linear" + suffix)(x, repack_for_dot(raw, qtype), DOT_TYPE_CODES[qtype], raw.shape[0])


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", [(37, 64), (576, 576), (100, 1536)])
def test_the_result_is_the_rounded_input_times_the_dequantized_weights(name, suffix, shape):
    assert load_quant_kernels()
    raw, weights = file_rows(shape, name)
    x = torch.randn(7, shape[1], generator=torch.Generator().manual_seed(1)) * 3  # 7 rows: tiles of 4 (or 2) and the rest
    got = dot_linear(x, raw, name, suffix)
    expected = two_term_rounded(x) @ weights.double().T
    assert got.shape == (7, shape[0]) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()
    # ... and not the unrounded input times the weights: the rounding is what differs.
    assert (got.double() - x.double() @ weights.double().T).abs().max().item() > 5e-6 * expected.abs().max().item()


@pytest.mark.parametrize("name", TYPES)
def test_both_instruction_sets_give_the_same_bits(name):
    if len(SUFFIXES) < 2:
        pytest.skip("this CPU has no AVX-512 VNNI: only the AVX2 kernel runs here")
    assert load_quant_kernels()
    raw, _ = file_rows((75, 768), name, seed=3)
    x = torch.randn(13, 768, generator=torch.Generator().manual_seed(2))
    assert torch.equal(dot_linear(x, raw, name, "").view(torch.int32), dot_linear(x, raw, name, "_avx2").view(torch.int32))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", TYPES)
def test_a_rows_result_does_not_depend_on_the_batch_or_the_threads(name, suffix):
    assert load_quant_kernels()
    raw, _ = file_rows((200, 576), name, seed=5)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(3))
    together = dot_linear(x, raw, name, suffix)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for row in range(9):
            assert torch.equal(dot_linear(x[row : row + 1], raw, name, suffix)[0], together[row])
        assert torch.equal(dot_linear(x[3:8], raw, name, suffix), together[3:8])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", TYPES)
def test_prompt_sized_inputs_quantize_in_buffers_of_their_own(name, suffix):
    """Over 64 rows (kKeptActivationRows) an input's quantized activations live in buffers of its call,
    freed when it returns; up to 64 in the thread's kept ones. Both give each row its bits alone, in
    any order of large and small calls."""
    assert load_quant_kernels()
    raw, _ = file_rows((48, 576), name, seed=7)
    x = torch.randn(150, 576, generator=torch.Generator().manual_seed(4))
    together = dot_linear(x, raw, name, suffix)
    rows = [dot_linear(x[row : row + 1], raw, name, suffix)[0] for row in range(150)]
    assert all(torch.equal(got, together[row]) for row, got in enumerate(rows))
    assert torch.equal(dot_linear(x[:64], raw, name, suffix), together[:64])
    assert torch.equal(dot_linear(x[10:], raw, name, suffix), together[10:])
    assert torch.equal(dot_linear(x[:3], raw, name, suffix), together[:3])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_block_of_zeros_contributes_nothing(suffix):
    """amax 0: the block's scale is 0 and its quants 0 (no division by zero, no NaN)."""
    assert load_quant_kernels()
    raw, weights = file_rows((16, 96), "Q4_1")
    x = torch.randn(2, 96)
    x[:, 32:64] = 0.0
    got = dot_linear(x, raw, "Q4_1", suffix)
    assert torch.isfinite(got).all()
    expected = two_term_rounded(x) @ weights.double().T
    assert (got.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


def test_repacking_reorders_the_files_bytes_and_pads_the_outputs_to_16():
    raw, _ = file_rows((20, 64), "Q4_1")
    repacked = repack_for_dot(raw, gguf.GGMLQuantizationType.Q4_1)
    assert repacked.shape == (2, 2, 320) and repacked.dtype == torch.uint8
    assert sorted(repacked[0].flatten().tolist()) == sorted(raw[:16].flatten().tolist())
    assert sorted(repacked[1].flatten().tolist()) == sorted(raw[16:].flatten().tolist() + [0] * (12 * 40))
    with pytest.raises(ValueError, match="Q4_K has no integer dot-product layout"):
        repack_for_dot(raw, gguf.GGMLQuantizationType.Q4_K)


@pytest.mark.parametrize("name", TYPES)
def test_file_rows_come_back_from_the_repacked_layout_byte_for_byte(name):
    qtype = getattr(gguf.GGMLQuantizationType, name)
    raw, _ = file_rows((37, 96), name)  # 37 rows: the last group is padded
    rows = torch.tensor([0, 36, 5, 16, 15, 17, 5, 32])
    assert torch.equal(file_rows_from_dot_layout(repack_for_dot(raw, qtype), qtype, rows), raw[rows])


def test_bad_operands_are_refused_with_a_message():
    assert load_quant_kernels()
    raw, _ = file_rows((16, 64), "Q4_0")
    repacked = repack_for_dot(raw, gguf.GGMLQuantizationType.Q4_0)
    for suffix in SUFFIXES:
        op = getattr(torch.ops.helix, "quant_dot_linear" + suffix)
        with pytest.raises(RuntimeError, match="not a multiple of 32"):
            op(torch.zeros(1, 65), repacked, 1, 16)
        with pytest.raises(RuntimeError, match=r"weight must be contiguous uint8 \[1, 2, 320\]"):
            op(torch.zeros(1, 64), repacked, 2, 16)  # Q4_1 groups are 320 bytes a block
        with pytest.raises(RuntimeError, match="unknown quantization type"):
            op(torch.zeros(1, 64), repacked, 5, 16)
        with pytest.raises(RuntimeError, match="float32"):
            op(torch.zeros(1, 64, dtype=torch.float64), repacked, 1, 16)


@pytest.mark.parametrize("name", TYPES)
def test_a_quantized_linear_layer_repacks_and_runs_the_dot_kernel(name):
    """`use_cpu_kernels` repacks the 32-weight block segments in place; a fused layer with a K-quant
    segment keeps that one on its float kernel."""
    assert load_quant_kernels()
    qtype = getattr(gguf.GGMLQuantizationType, name)
    raw, weights = file_rows((48, 256), name)
    k_raw = torch.from_numpy(np.ascontiguousarray(random_k_blocks((32, 256), gguf.GGMLQuantizationType.Q4_K, seed=1)))
    layer = QuantizedLinear([QuantizedWeight(qtype, raw, 256), QuantizedWeight(gguf.GGMLQuantizationType.Q4_K, k_raw, 256)])
    layer.use_cpu_kernels()
    assert layer.repacked == [True, False] and layer.packed0.shape == (3, 8, repack_for_dot(raw, qtype).shape[2])
    x = torch.randn(3, 256)
    got = layer(x)
    k_weights = dequantize_rows(k_raw, gguf.GGMLQuantizationType.Q4_K).double()
    expected = torch.cat([two_term_rounded(x) @ weights.double().T, x.double() @ k_weights.T], dim=-1)
    assert (got.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()
