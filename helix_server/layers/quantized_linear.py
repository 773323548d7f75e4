"""Linear layers whose weights stay in a GGUF file's packed blocks (portable torch path).

Packed layout (what `QuantizedWeight.packed` holds, and what a native kernel reads): the tensor's
raw bytes as they are in the GGUF file, one row per output feature: a uint8 tensor
[out_features, bytes_per_row] with bytes_per_row = in_features / block_size * type_size
(`gguf.GGML_QUANT_SIZES[qtype]` gives (block_size, type_size)). Row r holds the blocks of weight
row r, input features in order, each block in ggml's own struct layout, little-endian:

- Q8_0 (32 weights, 34 bytes): f16 d, 32 x int8 q; w = d * q.
- Q4_0 (32 weights, 18 bytes): f16 d, 16 bytes of nibbles (low nibbles: weights 0-15, high
  nibbles: 16-31); w = d * (q - 8).
- Q4_1 (32 weights, 20 bytes): f16 d, f16 m, 16 bytes of nibbles as Q4_0; w = d * q + m.
- Q4_K (256 weights, 144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins (8 sub-blocks
  of 32), 128 bytes of nibbles; w = d * sc * q - dmin * m.
- Q5_K (256 weights, 176 bytes): as Q4_K plus 32 bytes of high bits (qh) before the nibbles.
- Q6_K (256 weights, 210 bytes): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 x int8
  scales (sub-blocks of 16), f16 d; w = d * scale * (q - 32).
- F32, F16, BF16: plain little-endian values (4 or 2 bytes each).

Dequantization here matches `gguf.quants.dequantize` bitwise (same float32 operations in the same
order). `QuantizedLinear` computes y = x W^T on the CPU, after `use_cpu_kernels()`, with helix's
kernels for every block type (`cpu_kernels/quant_dot.cpp`: Q8_0, Q4_0, Q4_1, repacked by
`quant_repack`, integer dot products on activations split into two int8 terms a block;
`cpu_kernels/quant_gemm_k.cpp`: Q4_K, Q5_K, Q6_K, read in the file's blocks, each weight dequantized
to the same float32 bits as here; either way a row's result never depends on the other rows of the
batch); float segments (F32/F16/BF16 shards fused with quantized ones), and other devices,
take the portable path:
dequantizing a chunk of output rows at a time (never the whole float weight at once) and
multiplying in float32 with torch, whose rows' last bits can change with the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from helix_server.layers.cpu_kernels import quant_kernel_isa
from helix_server.layers.quant_repack import DOT_TYPE_CODES, repack_for_dot
from helix_server.platform.device import cpu_flags

QK_K = 256
# Output rows dequantized per step of the portable matmul: at most this many float32 weights
# (1 MiB, within a core's L2 for its matmul). Measured on SmolLM2-135M's Q4_1 projections, one
# row through all of them: 0.28 s at 256K weights against 0.35 s at 64K and at 1M (one thread);
# with two threads on busy cores, 1.05 s against 12.6 s at 64K (fewer, larger ops to synchronise).
CHUNK_WEIGHTS = 1 << 18


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:  # [n, bytes] -> [n, 1] float32
    """The float16 at byte `start` of each block (a strided view of the bytes, no copy; every
    block type's size and f16 offsets are even)."""
    return blocks.view(torch.float16)[:, start // 2 : start // 2 + 1].to(torch.float32)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[n, k*group] packed bytes -> [n, k, 2*group] uint8: per group of `group` bytes, the low
    nibbles then the high nibbles (ggml's order)."""
    qs = qs.reshape(qs.shape[0], -1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = blocks.view(torch.int8)[:, 2:].to(torch.float32)
    return q.mul_(d)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], -1).to(torch.float32).sub_(8.0)
    return q.mul_(d)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], -1).to(torch.float32)
    return q.mul_(d).add_(m)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block: [n, 12] uint8 -> two [n, 8] uint8."""
    n = scales.shape[0]
    scales = scales.reshape(n, 3, 4)
    d, m, m_d = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mins


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mins = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mins.to(torch.float32)).reshape(n, -1, 1)
    q = _nibbles(blocks[:, 16:], 32).reshape(n, -1, 32).to(torch.float32)  # [n, 8, 32]
    return (d * q - dm).reshape(n, QK_K)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mins = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mins.to(torch.float32)).reshape(n, -1, 1)
    qh = blocks[:, 16:48].reshape(n, 1, 1, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 1, 8, 1)
    qh = ((qh >> shifts) & 0x01).reshape(n, -1, 32)  # [n, 8, 32]
    ql = _nibbles(blocks[:, 48:], 32).reshape(n, -1, 32)  # [n, 8, 32]
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128], 64).reshape(n, -1, 32)  # [n, 8, 32]
    qh = blocks[:, 128:192].reshape(n, -1, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    qh = ((qh >> shifts) & 0x03).reshape(n, -1, 32)  # [n, 8, 32]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(blocks, 208) * scales).reshape(n, QK_K // 16, 1)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    q = q.reshape(n, QK_K // 16, -1).to(torch.float32)
    return (d * q).reshape(n, QK_K)


def _dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def _dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


# The block types helix's float-activation CPU kernel reads in the file's layout (`quant_gemm_k.cpp`'s
# `quant_linear_k`, 256-weight super-blocks): the op and its code for each. (The 32-weight types run
# `quant_dot_linear` once repacked: `DOT_TYPE_CODES`.)
NATIVE_KERNELS = {
    GGMLQuantizationType.Q4_K: ("quant_linear_k", 0),
    GGMLQuantizationType.Q5_K: ("quant_linear_k", 1),
    GGMLQuantizationType.Q6_K: ("quant_linear_k", 2),
}

_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q4_K: _dequant_q4_k,
    GGMLQuantizationType.Q5_K: _dequant_q5_k,
    GGMLQuantizationType.Q6_K: _dequant_q6_k,
    GGMLQuantizationType.F32: _dequant_f32,
    GGMLQuantizationType.F16: _dequant_f16,
    GGMLQuantizationType.BF16: _dequant_bf16,
}

# Block-quantized types helix keeps packed (the float types load as ordinary weights).
QUANTIZED_TYPES = tuple(t for t in _DEQUANT if t not in (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16
))
SUPPORTED_TYPES = tuple(_DEQUANT)


def kernel_op_suffix(isa: str | None = None) -> str:
    """The suffix of the quantized-weight ops for `isa` ("avx512": none, "avx2": "_avx2"; None: this
    CPU's, `quant_kernel_isa()`)."""
    isa = quant_kernel_isa() if isa is None else isa
    if isa not in ("avx512", "avx2"):
        raise ValueError(f"no quantized-weight kernels for {isa!r} (avx512 or avx2)")
    return "_avx2" if isa == "avx2" else ""


def dot_kernel_suffix(isa: str | None = None) -> str:
    """The suffix of `quant_dot_linear` for `isa` (see `kernel_op_suffix`): its AVX-512 form needs
    VNNI (and BW, VL) too; AVX-512 CPUs without them run the AVX2 twin, which gives the same bits."""
    suffix = kernel_op_suffix(isa)
    if suffix == "" and not {"avx512bw", "avx512vl", "avx512_vnni"} <= cpu_flags():
        return "_avx2"
    return suffix


def dequantize_rows(packed: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Float32 weights of packed rows: uint8 [rows, bytes_per_row] -> float32 [rows, in_features]."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    rows = packed.shape[0]
    blocks = packed.reshape(-1, type_size)  # [rows * blocks_per_row, type_size]
    return _DEQUANT[qtype](blocks).reshape(rows, -1)


@dataclass
class QuantizedWeight:
    """One weight tensor in a GGUF file's packed form: uint8 `packed` [out_features,
    bytes_per_row] in `qtype` (see the module docstring for the layout)."""

    qtype: GGMLQuantizationType
    packed: torch.Tensor  # [out_features, bytes_per_row] uint8
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def dequantize(self) -> torch.Tensor:  # [out, in] float32
        return dequantize_rows(self.packed, self.qtype)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W kept in GGUF's packed blocks (inference only, 2-D inputs).

    W is the row-wise concatenation of `weights` (fused projections such as q/k/v may mix block
    types, one segment each; consecutive segments of one type are merged into one packed tensor).
    Each segment's packed rows are a buffer named `packed{i}`, uint8 [rows_i, bytes_per_row_i].
    The portable `_matmul` dequantizes up to `CHUNK_WEIGHTS` weights of rows at a time and sums in
    float32; the result is returned in the input's dtype, or in float32 with `float_out`.
    """

    def __init__(
        self, weights: list[QuantizedWeight], bias: torch.Tensor | None = None, float_out: bool = False
    ) -> None:
        super().__init__()
        in_features = {w.in_features for w in weights}
        if len(in_features) != 1:
            raise ValueError(f"segments of one linear layer disagree on in_features: {sorted(in_features)}")
        self.in_features = in_features.pop()
        merged: list[QuantizedWeight] = []
        for weight in weights:
            if merged and merged[-1].qtype == weight.qtype:
                last = merged[-1]
                merged[-1] = QuantizedWeight(last.qtype, torch.cat([last.packed, weight.packed]), self.in_features)
            else:
                merged.append(weight)
        self.qtypes = [w.qtype for w in merged]
        for i, weight in enumerate(merged):
            self.register_buffer(f"packed{i}", weight.packed.contiguous())
        self.out_features = sum(w.out_features for w in merged)
        self._segment_rows = [w.out_features for w in merged]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.float_out = float_out
        self.native = False  # `use_cpu_kernels`: native-kernel segments run helix's ops
        self.op_suffix = ""  # "_avx2": the AVX2 twins of the ops
        self.dot_op = ""  # `use_cpu_kernels`: the integer dot-product op of repacked segments
        self.repacked: list[bool] = [False] * len(merged)  # segment i in `repack_for_dot`'s layout
        self._direct_op = None  # see `use_cpu_kernels`

    def use_cpu_kernels(self, isa: str | None = None) -> None:
        """Run the segments helix's CPU kernels read on them (CPU tensors, after
        `load_quant_kernels()` returned True), in `isa` ("avx512" or "avx2"; default:
        `quant_kernel_isa()`, this CPU's; both give the same bits).

        32-weight block types (Q8_0, Q4_0, Q4_1) are repacked in place (`repack_for_dot`) for
        `quant_dot_linear`, which quantizes activations to int8 per block as llama.cpp does; the
        K-quants run `quant_linear_k` on the file's blocks, on float32 activations."""
        self.op_suffix = kernel_op_suffix(isa)
        self.dot_op = "quant_dot_linear" + dot_kernel_suffix(isa)
        for i, qtype in enumerate(self.qtypes):
            if qtype in DOT_TYPE_CODES and not self.repacked[i]:
                setattr(self, f"packed{i}", repack_for_dot(getattr(self, f"packed{i}"), qtype))
                self.repacked[i] = True
        self.native = True
        # One repacked segment and no bias (every projection of a one-type file): forward calls the
        # op directly, its overload resolved once (a decode step makes ~120 such calls).
        single = len(self.qtypes) == 1 and self.repacked[0] and self.bias is None
        self._direct_op = getattr(torch.ops.helix, self.dot_op).default if single else None

    def segments(self) -> list[tuple[GGMLQuantizationType, torch.Tensor]]:
        """(qtype, packed rows) of each segment, in output-row order (a repacked segment's tensor is
        in `repack_for_dot`'s layout)."""
        return [(qtype, getattr(self, f"packed{i}")) for i, qtype in enumerate(self.qtypes)]

    def forward(self, x: torch.Tensor, bulk_start: int | None = None) -> torch.Tensor:
        """[T, in] -> [T, out]; `bulk_start` is accepted for the projections' common call."""
        if self._direct_op is not None and x.dtype == torch.float32:
            return self._direct_op(x, self.packed0, DOT_TYPE_CODES[self.qtypes[0]], self.out_features)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        x32 = x.to(torch.float32).contiguous()
        chunk_rows = max(1, CHUNK_WEIGHTS // self.in_features)
        parts: list[torch.Tensor] = []
        for i, (qtype, packed) in enumerate(self.segments()):
            if self.repacked[i]:
                rows = self._segment_rows[i]
                parts.append(getattr(torch.ops.helix, self.dot_op)(x32, packed, DOT_TYPE_CODES[qtype], rows))  # [T, rows]
                continue
            kernel = NATIVE_KERNELS.get(qtype) if self.native else None
            if kernel is not None:
                op, code = kernel
                parts.append(getattr(torch.ops.helix, op + self.op_suffix)(x32, packed, code, packed.shape[0]))  # [T, rows]
                continue
            for start in range(0, packed.shape[0], chunk_rows):
                weight = dequantize_rows(packed[start : start + chunk_rows], qtype)  # [rows, in] f32
                parts.append(x32 @ weight.t())  # [T, rows]
        out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # [T, out] float32
        if self.bias is not None:
            out = out + self.bias.to(torch.float32)
        return out if self.float_out else out.to(x.dtype)

    def extra_repr(self) -> str:
        types = ",".join(t.name for t in self.qtypes)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtypes={types}, "
            f"native={self.native}{self.op_suffix}"
        )
