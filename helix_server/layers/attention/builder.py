"""Build `AttentionMetadata` from plain per-request descriptions of a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_server.layers.attention.metadata import AttentionMetadata, ForwardContext, PrefillChunk, QueryGroup
from helix_server.layers.linear import bulk_row_start


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
# An attention backend may take longer ones as short queries (`Attention.max_short_query_len`).
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


def order_for_attention(
    chunks: list[SequenceChunk],
    block_size: int = 0,
    num_blocks: int | None = None,
    max_short_len: int = MAX_BATCHED_QUERY_LEN,
) -> list[int]:
    """The batch order the attention backend expects: short chunks first, by length then by
    sequence length (so chunks that can share a padded batched call sit together), then the rest
    by length (so the longest, which linear layers may compute as bulk rows, sit last; see
    `helix_server.layers.linear.bulk_row_start`).
    Given the pool's `num_blocks` (and `block_size`), the chunks whose keys are read in place (see
    `key_run_start`) come last within their key-length class, so they do not split a batched call.
    Short chunks are those of at most `max_short_len` tokens (the model's attention layers'
    `max_short_query_len`).

    Returns indices into `chunks` (stable among equals)."""

    def key(i: int) -> tuple[int, ...]:
        chunk = chunks[i]
        if num_blocks is None:
            return chunk.num_new_tokens, chunk.seq_len
        in_place = key_run_start(chunk, block_size, num_blocks) is not None
        return chunk.num_new_tokens, padded_key_blocks(chunk.seq_len, block_size), in_place, chunk.seq_len

    short = [i for i, c in enumerate(chunks) if c.num_new_tokens <= max_short_len]
    short.sort(key=key)
    long = [i for i, c in enumerate(chunks) if c.num_new_tokens > max_short_len]
    long.sort(key=lambda i: chunks[i].num_new_tokens)
    return short + long


def key_run_start(chunk: SequenceChunk, block_size: int, num_blocks: int) -> int | None:
    """The pool slot where a short chunk's keys start, when its attention can read them in place:
    the blocks holding its keys have consecutive ids and its padded key window (its key-length
    class) ends inside a pool of `num_blocks`. None when its keys must be gathered.

    Reading in place skips the copy that gathering is (the larger part of decode attention), and
    computes the same bits: a request's keys and values then have the same layout and padded
    length as in a gathered batched call; the padding slots hold other blocks' (finite) contents
    instead of block 0's, masked either way."""
    needed = -(-chunk.seq_len // block_size)
    blocks = chunk.block_ids
    first = blocks[0]
    if first + padded_key_blocks(chunk.seq_len, block_size) > num_blocks or blocks[needed - 1] != first + needed - 1:
        return None
    if blocks[:needed] != list(range(first, first + needed)):
        return None
    return first * block_size


def build_attention_metadata(
    chunks: list[SequenceChunk],
    block_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    num_blocks: int | None = None,
    max_short_len: int = MAX_BATCHED_QUERY_LEN,
) -> AttentionMetadata:
    """Metadata for a step whose token rows are `chunks` in `order_for_attention` order (with the
    same `num_blocks`: the pool's size, or None to gather every request's keys, and the same
    `max_short_len`).

    Builds the slot mapping on the host and moves everything to `device` once.
    """
    num_short = 0
    for chunk in chunks:
        if chunk.num_new_tokens > max_short_len:
            break
        num_short += 1
    if any(c.num_new_tokens <= max_short_len for c in chunks[num_short:]):
        raise ValueError("short chunks must come first (see order_for_attention)")

    slots: list[int] = []
    for chunk in chunks:
        blocks = chunk.block_ids
        for pos in range(chunk.context_len, chunk.seq_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)

    query_groups: list[QueryGroup] = []
    row = 0
    for start, end, key_start in _split_groups(chunks[:num_short], block_size, num_blocks):
        group = _query_group(chunks[start:end], row, block_size, device, key_start)
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


def build_forward_context(
    chunks: list[SequenceChunk],
    block_size: int,
    device: torch.device | str,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    max_short_len: int = MAX_BATCHED_QUERY_LEN,
) -> ForwardContext:
    """The `ForwardContext` of a step whose token rows are `chunks` in `order_for_attention` order
    (called with the pool's size and the same `max_short_len`): attention metadata reading in place
    where it can, the cache tensors, and the first row of the bulk chunks the linear layers may
    batch."""
    key_cache = kv_caches[0][0]  # [num_blocks, block_size, kv_heads, head_dim]
    metadata = build_attention_metadata(
        chunks, block_size, device, key_cache.dtype, key_cache.shape[0], max_short_len
    )
    bulk_start = bulk_row_start([chunk.num_new_tokens for chunk in chunks])
    return ForwardContext(attn_metadata=metadata, kv_caches=kv_caches, bulk_start=bulk_start)


def padded_key_blocks(seq_len: int, block_size: int) -> int:
    """The key-length class of a batched chunk: the blocks its keys are padded to in any call."""
    slots = -(-seq_len // block_size) * block_size
    granule = min(MAX_KEYS_GRANULE, max(MIN_KEYS_GRANULE, (1 << (slots - 1).bit_length()) // 8))
    granule_blocks = -(-granule // block_size)
    return -(-slots // (granule_blocks * block_size)) * granule_blocks


def _split_groups(
    chunks: list[SequenceChunk], block_size: int, num_blocks: int | None
) -> list[tuple[int, int, int | None]]:
    """(start, end, key_start) of the calls over short chunks in `order_for_attention` order: a
    chunk whose keys are read in place (`key_run_start`) is a call of its own; the others are
    batched, a call per query length and key-length class."""
    groups: list[tuple[int, int, int | None]] = []
    start = 0
    start_class = None
    for index, chunk in enumerate(chunks):
        key_start = None if num_blocks is None else key_run_start(chunk, block_size, num_blocks)
        key_class = (chunk.num_new_tokens, padded_key_blocks(chunk.seq_len, block_size))
        if index > start and (key_start is not None or key_class != start_class):
            groups.append((start, index, None))
            start = index
        if key_start is not None:
            groups.append((index, index + 1, key_start))
            start = index + 1
        elif start == index:
            start_class = key_class
    if start < len(chunks):
        groups.append((start, len(chunks), None))
    return groups


def _query_group(
    chunks: list[SequenceChunk], token_start: int, block_size: int, device: torch.device | str, key_start: int | None
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
        key_start=key_start,
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
