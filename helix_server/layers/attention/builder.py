"""Build `AttentionMetadata` from plain per-request descriptions of a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_server.layers.attention.metadata import AttentionMetadata, DecodeGroup, PrefillChunk


@dataclass
class SequenceChunk:
    """One request's part of a step: `num_new_tokens` tokens after `context_len` cached ones."""

    context_len: int
    num_new_tokens: int
    block_ids: list[int]

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_new_tokens


# Gathering and attending over one padded key slot costs about this fraction of an extra batched
# attention call's fixed overhead: a decode group is split where padding would waste more slots.
DECODE_GROUP_OVERHEAD_SLOTS = 1024


def order_for_attention(chunks: list[SequenceChunk]) -> list[int]:
    """The batch order the attention backend expects: single-token chunks first, shortest first (so
    similar lengths sit together and can share a padded attention call), then the rest.

    Returns indices into `chunks` (stable within equal lengths)."""
    singles = sorted((i for i, c in enumerate(chunks) if c.num_new_tokens == 1), key=lambda i: chunks[i].seq_len)
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

    decode_groups = [
        _decode_group(chunks[start:end], start, end, block_size, device)
        for start, end in _split_decodes(chunks[:num_decodes], block_size)
    ]

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
        decode_groups=decode_groups,
        prefills=prefills,
        dtype=dtype,
    )


def _split_decodes(decodes: list[SequenceChunk], block_size: int) -> list[tuple[int, int]]:
    """Row ranges of decode groups. Rows should be sorted by length (see `order_for_attention`); a
    new group starts where padding the current one up to the next row would cost more key slots
    than a separate call's overhead."""
    groups: list[tuple[int, int]] = []
    start = 0
    group_blocks = 0
    for row, chunk in enumerate(decodes):
        blocks = -(-chunk.seq_len // block_size)
        extra = (row - start) * max(0, blocks - group_blocks) * block_size
        if row > start and extra > DECODE_GROUP_OVERHEAD_SLOTS:
            groups.append((start, row))
            start = row
        group_blocks = blocks if row == start else max(group_blocks, blocks)
    if decodes:
        groups.append((start, len(decodes)))
    return groups


def _decode_group(
    chunks: list[SequenceChunk], start: int, end: int, block_size: int, device: torch.device | str
) -> DecodeGroup:
    needed = [-(-c.seq_len // block_size) for c in chunks]
    max_blocks = max(needed)
    tables = [c.block_ids[:n] + [0] * (max_blocks - n) for c, n in zip(chunks, needed)]
    return DecodeGroup(
        token_start=start,
        token_end=end,
        block_tables=torch.tensor(tables, dtype=torch.long, device=device),
        seq_lens=torch.tensor([c.seq_len for c in chunks], dtype=torch.long, device=device),
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
