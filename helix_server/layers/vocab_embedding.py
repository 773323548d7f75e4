"""The token embedding: `nn.Embedding` without the random initialisation the checkpoint overwrites.

Models are built on the `meta` device and filled by the loader, so an init is wasted work, and on
the `meta` device `nn.Embedding`'s (`normal_`) costs more than that: torch computes it through a
reference implementation that imports `torch._dynamo`, which imports triton where it is installed
(whose nanobind objects then print hundreds of "leaked" lines at exit), on the CPU too.
"""

from __future__ import annotations

import torch
from torch import nn


class VocabEmbedding(nn.Embedding):
    """Token ids [T] -> rows of `weight` [vocab, hidden], like `nn.Embedding`; the weight starts
    uninitialised (the loader fills it)."""

    @property
    def dtype(self) -> torch.dtype:
        """The rows' dtype (the model's: see `QuantizedEmbedding` for a packed table)."""
        return self.weight.dtype

    def reset_parameters(self) -> None:
        """No random init (see the module docstring)."""
