"""The token embedding of a GGUF file kept in its packed blocks.

A lookup reads a few rows a step, so dequantizing only those rows costs nothing measurable, and the
table stays at its file size: SmolLM2-135M's Q8_0 embedding is 30 MB packed against 113 MB as
float32 (where it was dequantized at load). The rows are dequantized by `dequantize_rows`, gguf's
own bits, so the values are the ones a load-time dequantization gave.
"""

from __future__ import annotations

import torch
from torch import nn

from helix_server.layers.quantized_linear import QuantizedWeight, dequantize_rows


class QuantizedEmbedding(nn.Module):
    """Token ids [T] -> rows [T, hidden] in `dtype`, from packed rows uint8 [vocab, bytes_per_row]."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("packed", weight.packed.contiguous())
        self.qtype = weight.qtype
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.dtype = dtype  # what the model computes in (float32 rows are cast to it)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return dequantize_rows(self.packed[input_ids], self.qtype).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}, dtype={self.dtype}"
