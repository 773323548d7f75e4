"""The flat per-token layout of a step's attention: which block-table row and position each row has.

Kernels that attend every row of a step in one launch (the Triton backend) take, instead of the
portable backend's query groups and prompt chunks, one block table with a row per sequence and
per token its sequence's row and its position (it sees keys 0..position). Padding rows of a
captured CUDA graph have position -1: they attend nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from helix_server.layers.attention.metadata import AttentionMetadata


@dataclass
class PagedInputs:
    """Per-token attention inputs of one step, on the device."""

    block_table: torch.Tensor  # [num_seqs, max_blocks] int32 (0-padded)
    token_seq: torch.Tensor  # [num_tokens] int32: the block-table row of each token
    token_pos: torch.Tensor  # [num_tokens] int32: each token's position, -1 for padding rows


def paged_inputs_of(metadata: AttentionMetadata) -> PagedInputs:
    """`metadata.paged`, derived from its query groups and prompt chunks (device ops only, no host
    synchronisation) the first time a layer asks."""
    if metadata.paged is None:
        metadata.paged = _derive(metadata)
    return metadata.paged


def _derive(metadata: AttentionMetadata) -> PagedInputs:
    device = metadata.slot_mapping.device
    widths = [g.block_tables.shape[1] for g in metadata.query_groups]
    widths += [c.block_table.shape[0] for c in metadata.prefills]
    width = max(widths, default=1)
    tables: list[torch.Tensor] = []
    seqs: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    num_seqs = 0
    for group in metadata.query_groups:
        n, q = group.num_requests, group.query_len
        tables.append(F.pad(group.block_tables, (0, width - group.block_tables.shape[1])))  # [n, width]
        seqs.append(torch.arange(num_seqs, num_seqs + n, device=device).repeat_interleave(q))  # [n * q]
        # Token t of a request sits at position seq_len - q + t.
        offsets = torch.arange(q, device=device)[None, :] - q
        positions.append((group.seq_lens[:, None] + offsets).reshape(-1))  # [n * q]
        num_seqs += n
    for chunk in metadata.prefills:
        tables.append(F.pad(chunk.block_table, (0, width - chunk.block_table.shape[0]))[None])  # [1, width]
        seqs.append(torch.full((chunk.num_tokens,), num_seqs, device=device))
        positions.append(torch.arange(chunk.context_len, chunk.seq_len, device=device))
        num_seqs += 1
    if not tables:
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        return PagedInputs(torch.zeros(1, 1, dtype=torch.int32, device=device), empty, empty)
    return PagedInputs(
        block_table=torch.cat(tables).to(torch.int32),
        token_seq=torch.cat(seqs).to(torch.int32),
        token_pos=torch.cat(positions).to(torch.int32),
    )
