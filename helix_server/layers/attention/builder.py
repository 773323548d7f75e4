"""Build `AttentionMetadata` from plain per-request descriptions of a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_server.layers.attention.metadata import AttentionMetadata, PrefillChunk, QueryGroup


@dataclass
class SequenceChunk:
    """One request's part of a step: `num_new_tokens` tokens after `context_len` cached ones."""

    context_len: int
    num_new_tokens: int
    block_ids: list[int]

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_new_tokens


# Chunks of at most this many tokens (decodes, verification of drafts, a drafter's catch-up) are
# attended in batched calls with other chunks of the same length; longer ones (prompt chunks) alone.
MAX_BATCHED_QUERY_LEN = 16
# Batch invariance of the padded calls: the last bits of a row that SDPA computes over padded keys
# depend on how many key slots the call has (the CPU flash kernel walks the keys in splits whose
# ends move with the padded length; measured in random batches with keys past 512 slots: 138 of 390
# float32 rows padded to a longer neighbour's length changed, 5 of 317 bfloat16 ones, and a 431-key
# request padded to 512 did too), but not on the batch size. So a request is always
# padded to its own key-length class, a function of its sequence length alone, and only shares a
# call with requests of the same class. Classes are 8 per doubling (padding wastes at most an
# eighth), between `MIN_KEYS_GRANULE` and `MAX_KEYS_GRANULE` slots apart. Against the previous
# rule (pad a group to its longest unless that wastes over 1,024 slots), 12 layers of decode
# attention (12 heads / 4 KV heads of 64) measured 23 ms instead of 24-27 for 16 requests of
# 100-700 tokens (10 calls instead of 2, far less padding), 85 instead of 108-181 for 16 of
# 500-3,000, 2-12% slower for 1-8 requests of 60-500 tokens.
MIN_KEYS_GRANULE = 32
MAX_KEYS_GRANULE = 256


def order_for_attention(chunks: list[SequenceChunk]) -> list[int]:
    """The batch order the attention backend expects: short chunks first, by length then by
    sequence length (so chunks that can share a padded batched call sit together), then the rest.

    Returns indices into `chunks` (stable among equals)."""
    short = [i for i, c in enumerate(chunks) if c.num_new_tokens <= MAX_BATCHED_QUERY_LEN]
    short.sort(key=lambda i: (chunks[i].num_new_tokens, chunks[i].seq_len))
    long = [i for i, c in enumerate(chunks) if c.num_new_tokens > MAX_BATCHED_QUERY_LEN]
    return short + long


def build_attention_metadata(
    chunks: list[SequenceChunk],
    block_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> AttentionMetadata:
    """Metadata for a step whose token rows are `chunks` in `order_for_attention` order.

    Builds the slot mapping on the host and moves everything to `device` once.
    """
    num_short = 0
    for chunk in chunks:
        if chunk.num_new_tokens > MAX_BATCHED_QUERY_LEN:
            break
        num_short += 1
    if any(c.num_new_tokens <= MAX_BATCHED_QUERY_LEN for c in chunks[num_short:]):
        raise ValueError("short chunks must come first (see order_for_attention)")

    slots: list[int] = []
    for chunk in chunks:
        blocks = chunk.block_ids
        for pos in range(chunk.context_len, chunk.seq_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)

    query_groups: list[QueryGroup] = []
    row = 0
    for start, end in _split_groups(chunks[:num_short], block_size):
        group = _query_group(chunks[start:end], row, block_size, device)
        query_groups.append(group)
        row = group.token_end

    prefills: list[PrefillChunk] = []
    for chunk in chunks[num_short:]:
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
        query_groups=query_groups,
        prefills=prefills,
        dtype=dtype,
    )


def padded_key_blocks(seq_len: int, block_size: int) -> int:
    """The key-length class of a batched chunk: the blocks its keys are padded to in any call."""
    slots = -(-seq_len // block_size) * block_size
    granule = min(MAX_KEYS_GRANULE, max(MIN_KEYS_GRANULE, (1 << (slots - 1).bit_length()) // 8))
    granule_blocks = -(-granule // block_size)
    return -(-slots // (granule_blocks * block_size)) * granule_blocks


def _split_groups(chunks: list[SequenceChunk], block_size: int) -> list[tuple[int, int]]:
    """Index ranges of batched groups over short chunks sorted by (length, sequence length): a
    group holds the chunks of one length and one key-length class."""
    groups: list[tuple[int, int]] = []
    start = 0
    for index, chunk in enumerate(chunks):
        if index > start and (
            chunk.num_new_tokens != chunks[start].num_new_tokens
            or padded_key_blocks(chunk.seq_len, block_size) != padded_key_blocks(chunks[start].seq_len, block_size)
        ):
            groups.append((start, index))
            start = index
    if chunks:
        groups.append((start, len(chunks)))
    return groups


def _query_group(
    chunks: list[SequenceChunk], token_start: int, block_size: int, device: torch.device | str
) -> QueryGroup:
    needed = [-(-c.seq_len // block_size) for c in chunks]
    max_blocks = padded_key_blocks(chunks[0].seq_len, block_size)  # one class per group
    tables = [c.block_ids[:n] + [0] * (max_blocks - n) for c, n in zip(chunks, needed)]
    query_len = chunks[0].num_new_tokens
    return QueryGroup(
        token_start=token_start,
        token_end=token_start + query_len * len(chunks),
        query_len=query_len,
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
