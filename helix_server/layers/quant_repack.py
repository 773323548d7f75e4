"""GGUF 32-weight blocks (Q8_0, Q4_0, Q4_1) repacked for helix's integer dot-product kernels.

`helix::quant_dot_linear` (`cpu_kernels/quant_dot.cpp`, AVX-512 VNNI; `quant_dot_linear_avx2`, AVX2)
reads weights 16 outputs at a time: one 64-byte load holds 4 consecutive weights of each of 16 output
rows, which one `vpdpbusd` multiplies by 4 broadcast activation bytes into 16 output lanes. This module
builds that layout once, at load, from the file's rows (`cpu_kernels/quant_common.h` documents it):

    file rows  uint8 [N, K / 32 * type_size]
    repacked   uint8 [ceil(N / 16), K / 32, quants + 16 d (+ 16 m)]

The bytes are the same ones, reordered (plus zero rows up to a multiple of 16): no dequantization, no
rounding, and about the same memory.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

BLOCK = 32  # weights a block
GROUP = 16  # outputs a repacked group

# Block type -> the kernels' type code (quant_common.h's `QuantType`).
DOT_TYPE_CODES = {
    GGMLQuantizationType.Q8_0: 0,
    GGMLQuantizationType.Q4_0: 1,
    GGMLQuantizationType.Q4_1: 2,
}

# Byte ranges in a file block: (scales: d, and m for Q4_1), quants.
_FIELDS = {
    GGMLQuantizationType.Q8_0: ((slice(0, 2),), slice(2, 34)),
    GGMLQuantizationType.Q4_0: ((slice(0, 2),), slice(2, 18)),
    GGMLQuantizationType.Q4_1: ((slice(0, 2), slice(2, 4)), slice(4, 20)),
}


def repack_for_dot(packed: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """File rows uint8 [N, K / 32 * type_size] -> repacked uint8 [ceil(N / 16), K / 32, group bytes].

    A group's block is its 16 outputs' quants in 4-byte runs, output after output, chunk after chunk
    (Q4: byte j of chunk t is file byte 4t + j: weights 4t + j and 16 + 4t + j in its two nibbles;
    Q8_0: chunk t holds weights 4t .. 4t + 3), then the 16 float16 d, then (Q4_1) the 16 float16 m."""
    if qtype not in DOT_TYPE_CODES:
        raise ValueError(f"{qtype.name} has no integer dot-product layout (only {', '.join(t.name for t in DOT_TYPE_CODES)})")
    _, type_size = GGML_QUANT_SIZES[qtype]
    rows, row_bytes = packed.shape
    blocks = row_bytes // type_size
    groups = -(-rows // GROUP)
    padded = torch.zeros(groups * GROUP, blocks, type_size, dtype=torch.uint8)
    padded[:rows] = packed.reshape(rows, blocks, type_size)
    by_group = padded.reshape(groups, GROUP, blocks, type_size)  # [G, 16, B, type_size]
    scales, quant_bytes = _FIELDS[qtype]
    quants = by_group[..., quant_bytes]  # [G, 16, B, 16 or 32]
    chunks = quants.shape[-1] // 4
    quants = quants.reshape(groups, GROUP, blocks, chunks, 4).permute(0, 2, 3, 1, 4)  # [G, B, chunk, 16, 4]
    parts = [quants.reshape(groups, blocks, -1)]
    for field in scales:
        parts.append(by_group[..., field].permute(0, 2, 1, 3).reshape(groups, blocks, 2 * GROUP))  # [G, B, 32]
    return torch.cat(parts, dim=-1).contiguous()


def file_rows_from_dot_layout(repacked: torch.Tensor, qtype: GGMLQuantizationType, rows: torch.Tensor) -> torch.Tensor:
    """The file rows `rows` (int64 [T]) of a `repack_for_dot` tensor: repacked uint8 [G, B, group
    bytes] -> uint8 [T, B * type_size], byte for byte the rows the file held. A tied LM head's
    repacked table serves the token embedding's lookups this way, so the table is held once."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = repacked.shape[1]
    scales, quant_bytes = _FIELDS[qtype]
    quant_size = quant_bytes.stop - quant_bytes.start
    chunks = quant_size // 4
    group, lane = rows // GROUP, rows % GROUP  # [T] each
    picked = repacked[group]  # [T, B, group bytes]
    quants = picked[..., : chunks * GROUP * 4].reshape(-1, blocks, chunks, GROUP, 4)  # [T, B, chunk, 16, 4]
    lanes = lane.view(-1, 1, 1, 1, 1).expand(-1, blocks, chunks, 1, 4)
    quants = quants.gather(3, lanes).reshape(-1, blocks, quant_size)  # [T, B, 16 or 32]
    block = torch.empty(rows.shape[0], blocks, type_size, dtype=torch.uint8, device=repacked.device)
    block[..., quant_bytes] = quants
    offset = chunks * GROUP * 4
    for field in scales:  # each: [T, B, 16 lanes x 2 bytes] -> the row's 2 bytes
        values = picked[..., offset : offset + 2 * GROUP].reshape(-1, blocks, GROUP, 2)
        block[..., field] = values.gather(2, lane.view(-1, 1, 1, 1).expand(-1, blocks, 1, 2)).reshape(-1, blocks, 2)
        offset += 2 * GROUP
    return block.reshape(rows.shape[0], blocks * type_size)
