"""Build `AttentionMetadata` from plain per-request descriptions of a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_server.layers.attention.metadata import AttentionMetadata, PrefillChunk


@dataclass
class SequenceChunk:
    """One request's part of a step: `num_new_tokens` tokens after `context_len` cached ones."""

    context_len: int
    num_new_tokens: int
    block_ids: list[int]

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_new_tokens


def order_for_attention(chunks: list[SequenceChunk]) -> list[int]:
    """The batch order the attention backend expects: single-token chunks first, then the rest.

    Returns indices into `chunks` (stable within each group)."""
    singles = [i for i, c in enumerate(chunks) if c.num_new_tokens == 1]
    multis = [i for i, c in enumerate(chunks) if c.num_new_tokens != 1]
    return singles + multis


def build_attention_metadata(
    chunks: list[SequenceChunk],
    block_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> AttentionMetadata:
    """Metadata for a step whose token rows are `chunks` in order (single-token chunks first).

    Builds the slot mapping on the host and moves everything to `device` once.
    """
    num_decodes = 0
    for chunk in chunks:
        if chunk.num_new_tokens != 1:
            break
        num_decodes += 1
    if any(c.num_new_tokens == 1 for c in chunks[num_decodes:]):
        raise ValueError("single-token chunks must come first (see order_for_attention)")

    slots: list[int] = []
    for chunk in chunks:
        blocks = chunk.block_ids
        for pos in range(chunk.context_len, chunk.seq_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)

    decodes = chunks[:num_decodes]
    max_blocks = max((len(c.block_ids) for c in decodes), default=0)
    decode_tables = [c.block_ids + [0] * (max_blocks - len(c.block_ids)) for c in decodes]

    prefills: list[PrefillChunk] = []
    row = num_decodes
    for chunk in chunks[num_decodes:]:
        needed = -(-chunk.seq_len // block_size)
        prefills.append(
            PrefillChunk(
                token_start=row,
                token_end=row + chunk.num_new_tokens,
                context_len=chunk.context_len,
                block_table=torch.tensor(chunk.block_ids[:needed], dtype=torch.long, device=device),
            )
        )
        row += chunk.num_new_tokens

    return AttentionMetadata(
        block_size=block_size,
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=num_decodes,
        decode_block_tables=torch.tensor(decode_tables, dtype=torch.long, device=device).view(
            num_decodes, max_blocks
        ),
        decode_seq_lens=torch.tensor([c.seq_len for c in decodes], dtype=torch.long, device=device),
        decode_max_seq_len=max((c.seq_len for c in decodes), default=0),
        prefills=prefills,
        dtype=dtype,
    )


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer a zeroed (key_cache, value_cache), each [num_blocks, block_size, kv_heads, head_dim].

    Zeroed, not empty: padded block-table entries are read (then masked), and masked garbage must
    never be NaN or it would poison the softmax."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block occupies across all layers, keys and values."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size
