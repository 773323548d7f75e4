"""helix's float-activation kernels over GGUF's packed K-quant super-blocks (`helix::quant_linear_k`,
`cpu_kernels/quant_gemm_k.cpp`: Q4_K, Q5_K, Q6_K; Q8_0, Q4_0 and Q4_1 run on integer dot products,
`test_quant_dot_kernel.py`) against
gguf's own dequantization and the portable path's (`dequantize_rows`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helix_server.layers.cpu_kernels import cpu_kernels_supported, load_cpu_kernels
from helix_server.layers.quantized_linear import NATIVE_KERNELS, dequantize_rows, kernel_op_suffix
from tests.fixtures.gguf_files import random_k_blocks

gguf = pytest.importorskip("gguf", reason="the gguf package (a dependency) writes and reads the blocks")

pytestmark = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler"
)

TYPES = [qtype.name for qtype in NATIVE_KERNELS]
ISAS = ["avx512", "avx2"]  # AVX2's kernels, forced here (this CPU runs either)
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # super-blocks of 256 weights


def packed(weight: np.ndarray, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [N, K] -> (raw blocks uint8 [N, bytes per row], gguf's dequantized float32 [N, K]).
    K-quant blocks (which gguf's Python package does not quantize) are random, with small scales."""
    qtype = getattr(gguf.GGMLQuantizationType, name)
    if name in K_TYPES:
        raw = random_k_blocks(weight.shape, qtype, seed=int(weight.shape[0]))
    else:
        raw = gguf.quants.quantize(weight, qtype)  # uint8 [N, bytes per row]
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(gguf.quants.dequantize(raw, qtype))


def quant_linear(x: torch.Tensor, raw: torch.Tensor, name: str, isa: str = "avx512") -> torch.Tensor:
    op, code = NATIVE_KERNELS[getattr(gguf.GGMLQuantizationType, name)]
    with torch.inference_mode():
        return getattr(torch.ops.helix, op + kernel_op_suffix(isa))(x, raw, code, raw.shape[0])


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", [(40, 256), (576, 1536), (37, 512)])
@pytest.mark.parametrize("isa", ISAS)
def test_quant_linear_matches_gguf_dequantization(name, isa, shape):
    assert load_cpu_kernels()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)
    raw, dequantized = packed(weight, name)
    x = torch.from_numpy(rng.standard_normal((19, shape[1])).astype(np.float32))
    got = quant_linear(x, raw, name, isa)
    reference = x.double() @ dequantized.double().T
    # float32 sums of exact products of the dequantized weights: a few ulps of the magnitudes' sum.
    tolerance = 16 * 2**-23 * (x.abs().double() @ dequantized.abs().double().T)
    assert got.shape == (19, shape[0]) and got.dtype == torch.float32
    assert ((got.double() - reference).abs() <= tolerance + 1e-30).all()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_the_kernel_dequantizes_every_weight_to_the_portable_paths_bits(name, isa):
    """x = the identity: each output is one weight times 1 plus zeros, so y = W^T exactly, as the
    kernel dequantized it; it must be `dequantize_rows`' float32 (and gguf's) bit for bit, but for
    the sign of zero weights (a sum of zeros is +0)."""
    assert load_cpu_kernels()
    raw, from_gguf = packed(np.random.default_rng(2).standard_normal((24, 512)).astype(np.float32), name)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    portable = dequantize_rows(raw, qtype)  # [24, 512]
    assert torch.equal(portable, from_gguf) and portable.abs().max().item() > 0
    got = quant_linear(torch.eye(512), raw, name, isa)  # [512, 24]
    nonzero = portable != 0
    assert torch.equal(got.T[nonzero].view(torch.int32), portable[nonzero].view(torch.int32))
    assert not got.T[~nonzero].any()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_a_rows_result_is_bitwise_the_same_in_any_batch_and_thread_count(name, isa):
    assert load_cpu_kernels()
    rng = np.random.default_rng(1)
    raw, _ = packed(rng.standard_normal((300, 512)).astype(np.float32), name)
    x = torch.from_numpy(rng.standard_normal((21, 512)).astype(np.float32))
    together = quant_linear(x, raw, name, isa)
    for rows in (1, 2, 5, 8, 9, 16):
        assert torch.equal(quant_linear(x[:rows], raw, name, isa), together[:rows]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(quant_linear(x, raw, name, isa), together)
    finally:
        torch.set_num_threads(threads)


def test_bad_k_quant_operands_are_refused_with_a_message():
    assert load_cpu_kernels()
    raw = torch.zeros(4, 144, dtype=torch.uint8)  # one Q4_K super-block per row: 256 inputs
    with pytest.raises(RuntimeError, match="not a multiple of 256"):
        quant_linear(torch.zeros(1, 128), raw, "Q4_K")
    with pytest.raises(RuntimeError, match=r"weight must be contiguous uint8 \[4, 210\]"):
        quant_linear(torch.zeros(1, 256), raw, "Q6_K")  # Q6_K super-blocks are 210 bytes
    with pytest.raises(RuntimeError, match="unknown quantization type"):
        torch.ops.helix.quant_linear_k(torch.zeros(1, 256), raw, 3, 4)


@pytest.mark.parametrize("name", TYPES)
def test_avx2_kernels_give_the_avx512_kernels_bits(name):
    assert load_cpu_kernels()
    rng = np.random.default_rng(3)
    raw, _ = packed(rng.standard_normal((75, 768)).astype(np.float32), name)
    x = torch.from_numpy(rng.standard_normal((13, 768)).astype(np.float32))
    expected = quant_linear(x, raw, name, "avx512")
    assert torch.equal(quant_linear(x, raw, name, "avx2").view(torch.int32), expected.view(torch.int32))


def test_bad_operands_are_refused_by_the_avx2_kernels_too():
    assert load_cpu_kernels()
    with pytest.raises(RuntimeError, match="quant_linear_k_avx2: 128 input features are not a multiple of 256"):
        quant_linear(torch.zeros(1, 128), torch.zeros(4, 144, dtype=torch.uint8), "Q4_K", "avx2")
    with pytest.raises(RuntimeError, match="unknown quantization type"):
        torch.ops.helix.quant_linear_k_avx2(torch.zeros(1, 256), torch.zeros(4, 144, dtype=torch.uint8), 3, 4)


def test_the_kernels_instruction_set_follows_the_cpus_flags(monkeypatch):
    from helix_server.layers import cpu_kernels

    cases = {
        frozenset({"avx512f", "avx2", "fma", "f16c"}): "avx512",
        frozenset({"avx2", "fma", "f16c"}): "avx2",
        frozenset({"avx2", "fma"}): None,
        frozenset({"sse4_2"}): None,
    }
    for flags, isa in cases.items():
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda flags=flags: flags)
        assert cpu_kernels.quant_kernel_isa() == isa
        assert cpu_kernels.cpu_kernels_supported() == (isa == "avx512")
        assert cpu_kernels.load_quant_kernels() == (isa is not None)
        assert cpu_kernels.load_cpu_kernels() == (isa == "avx512")
        if isa is not None:
            assert kernel_op_suffix() == ("_avx2" if isa == "avx2" else "")
    with pytest.raises(ValueError, match="no quantized-weight kernels for 'neon'"):
        kernel_op_suffix("neon")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_subnormal_and_extreme_half_scales_are_read_exactly(name, isa):
    """The kernels read a block's float16 scales (d, and min/dmin) with their own conversion in
    places: subnormal, largest and signed-zero halves must come out as gguf's."""
    assert load_cpu_kernels()
    raw, _ = packed(np.random.default_rng(4).standard_normal((16, 256)).astype(np.float32), name)
    halves = np.array([0x0001, 0x03FF, 0x0200, 0x8001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x0000, 0x8000, 0x3C00],
                      dtype=np.uint16)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.numpy().reshape(-1, size)
    offsets = {"Q4_K": (0, 2), "Q6_K": (208,)}[name]
    for i, offset in enumerate(offsets):
        chosen = halves[(np.arange(len(blocks)) + 5 * i) % len(halves)]
        blocks[:, offset : offset + 2] = chosen.view(np.uint8).reshape(-1, 2)
    portable = dequantize_rows(raw, qtype)  # [16, 256]
    assert torch.equal(portable, torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype)))
    got = quant_linear(torch.eye(256), raw, name, isa).T
    nonzero = portable != 0
    assert torch.equal(got[nonzero].view(torch.int32), portable[nonzero].view(torch.int32))
    assert not got[~nonzero].any()
