"""The token embedding of a GGUF file kept in its packed blocks.

A lookup reads a few rows a step, so dequantizing only those rows costs nothing measurable, and the
table stays at its file size: SmolLM2-135M's Q8_0 embedding is 30 MB packed against 113 MB as
float32 (where it was dequantized at load). The rows are dequantized by `dequantize_rows`, gguf's
own bits, so the values are the ones a load-time dequantization gave.

When the LM head is tied to the embedding and helix's CPU kernels repack the head's table
(`quant_repack.repack_for_dot`), the embedding reads its rows from that repacked table
(`share_dot_layout`) rather than keeping the file's copy: the table is held once (30 MB less for
SmolLM2-135M), and the rows are the same bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from helix_server.layers.quant_repack import file_rows_from_dot_layout
from helix_server.layers.quantized_linear import QuantizedWeight, dequantize_rows


class QuantizedEmbedding(nn.Module):
    """Token ids [T] -> rows [T, hidden] in `dtype`, from packed rows uint8 [vocab, bytes_per_row]."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("packed", weight.packed.contiguous())
        self.qtype = weight.qtype
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.dtype = dtype  # what the model computes in (float32 rows are cast to it)
        self.dot_layout = False  # `packed` is a tied head's repacked table (`share_dot_layout`)

    def share_dot_layout(self, repacked: torch.Tensor) -> None:
        """Read rows from `repacked`, the `repack_for_dot` form of this very table (a tied LM head's,
        uint8 [ceil(vocab / 16), blocks, group bytes]), and drop the file-order copy."""
        self.packed = repacked
        self.dot_layout = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.dot_layout:
            rows = file_rows_from_dot_layout(self.packed, self.qtype, input_ids)  # [T, bytes_per_row]
        else:
            rows = self.packed[input_ids]
        return dequantize_rows(rows, self.qtype).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}, dtype={self.dtype}"
