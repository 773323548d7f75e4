"""Portable paged attention: plain torch ops that exist in torch 2.4 (CPU, DirectML, CUDA fallback).

Each layer first writes the step's new K/V into the paged cache through `slot_mapping`, then reads
the keys each query may see through the block tables and runs `scaled_dot_product_attention`:

* short queries (decodes, verification of drafts) go in batched calls, one per group of requests
  with the same query length and key-length class (each padded to its class, so its result does
  not depend on the rest of the batch; see `builder.padded_key_blocks`). GQA
  without copying K/V: the g query heads that share a KV head (times the request's q tokens) are
  stacked as query rows of that head, q [n, kv_heads, g * q, d] against k [n, kv_heads, S, d].
  A request whose blocks form one run of the pool (`QueryGroup.key_start`) is a call of its own
  on views of the pool instead: no copy, and the same layout and padding, so the same bits, which
  `in_place_matches_gathered` checks once per shape, dtype and thread count on this machine (torch's
  CPU kernel has been seen to give other bits for a view of the pool at 2 threads on some CPUs);
  where it does not hold, that request's keys are gathered for its call of its own;
* each long chunk (a prompt chunk) gets its own call with a causal mask offset by the tokens already cached
  (or plain `is_causal` when the chunk is the whole sequence so far). Here K/V are expanded to all
  query heads (a view plus one copy) so the fast causal kernel applies.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from helix_server.layers.attention.metadata import AttentionMetadata


def write_kv_cache(
    key: torch.Tensor,  # [T, kv_heads, head_dim]
    value: torch.Tensor,  # [T, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Store each new token's K/V at its physical slot, non-finite values as 0.

    Padded attention calls read slots past a request's own keys (other requests' blocks) and mask
    them: a masked slot's weight is exactly 0, which leaves the result bitwise unchanged only if
    the slot is finite (inf - inf and 0 * NaN are NaN). So a request whose K/V overflowed must not
    leave inf or NaN in the pool, or it would poison its neighbours' outputs; its own are garbage
    either way. Finite values are stored unchanged."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key = torch.nan_to_num(key, nan=0.0, posinf=0.0, neginf=0.0)
    value = torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key: torch.Tensor,  # [T, kv_heads, head_dim]
    value: torch.Tensor,  # [T, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Causal attention of this step's queries over their cached and new keys."""
    write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
    parts = query_group_attention(query, key_cache, value_cache, metadata, scale, sliding_window)
    parts += prefill_attention(query, key, value, key_cache, value_cache, metadata, scale, sliding_window)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def query_group_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], this step's K/V stored
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> list[torch.Tensor]:  # per query group, [its rows, num_heads, head_dim]
    """The short queries' outputs, one batched SDPA call per query group, in row order."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    # The pool as [slots, kv_heads, d]: requests whose keys are read in place take slices of it.
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    parts = []
    for index, query_group in enumerate(metadata.query_groups):
        rows = query[query_group.token_start : query_group.token_end]
        mask = metadata.group_mask(index, sliding_window, group)  # [n, 1, g * q or 1, S]
        if query_group.key_start is None:
            # [n * max_blocks, block_size, kv_heads, d] -> [n, S, kv_heads, d] -> [n, kv_heads, S, d]
            gathered_shape = (query_group.num_requests, -1, num_kv_heads, head_dim)
            k = gather_blocks(key_cache, query_group.block_tables.view(-1)).view(gathered_shape).transpose(1, 2)
            v = gather_blocks(value_cache, query_group.block_tables.view(-1)).view(gathered_shape).transpose(1, 2)
        elif _in_place_exact(query, key_cache, query_group.query_len):
            # One request whose keys lie in one run of the pool: views, the layout gathering gives.
            slots = slice(query_group.key_start, query_group.key_start + mask.shape[-1])  # S padded slots
            k = flat_keys[slots].transpose(0, 1)[None]  # [1, kv_heads, S, d]
            v = flat_values[slots].transpose(0, 1)[None]
        else:  # the same call of its own, on a gathered copy of the same padded slots
            slots = torch.arange(query_group.key_start, query_group.key_start + mask.shape[-1], device=query.device)
            k = flat_keys.index_select(0, slots).transpose(0, 1)[None]  # [1, kv_heads, S, d]
            v = flat_values.index_select(0, slots).transpose(0, 1)[None]
        parts.append(_grouped_query_attention(rows, k, v, mask, query_group.query_len, scale))
    return parts


def _in_place_exact(query: torch.Tensor, key_cache: torch.Tensor, query_len: int) -> bool:
    num_heads, num_kv_heads, head_dim = query.shape[1], key_cache.shape[2], key_cache.shape[3]
    return in_place_matches_gathered(
        key_cache.dtype, key_cache.device.type, num_heads, num_kv_heads, head_dim, query_len, torch.get_num_threads()
    )


# Key lengths the check covers: short, around and past the CPU kernel's 512-key split, long.
_CHECK_KEY_LENGTHS = (96, 500, 520, 700, 1300)


@functools.cache
def in_place_matches_gathered(
    dtype: torch.dtype, device_type: str, num_heads: int, num_kv_heads: int, head_dim: int, query_len: int,
    num_threads: int,
) -> bool:
    """Whether SDPA on this machine gives a request's rows the same bits for keys read in place
    (views of the pool, at several offsets) as for the same keys gathered into a copy, for this
    attention shape, dtype, query length and thread count (torch's kernel is ours to observe, not
    to control). Checked once on seeded random data; a few SDPA calls."""
    generator = torch.Generator().manual_seed(0)
    group = num_heads // num_kv_heads
    num_slots = 2 * max(_CHECK_KEY_LENGTHS) + 64
    pool = torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype=dtype, device=device_type)
    values = torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype=dtype, device=device_type)
    with torch.inference_mode():
        for length, offset in zip(_CHECK_KEY_LENGTHS, (0, 16, 48, 200, 336)):
            query = torch.randn(query_len, num_heads, head_dim, generator=generator).to(dtype=dtype, device=device_type)
            allowed = torch.ones(1, 1, group * query_len, length, dtype=torch.bool, device=device_type)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device_type).masked_fill_(~allowed, float("-inf"))
            window = slice(offset, offset + length)
            in_place = _grouped_query_attention(
                query, pool[window].transpose(0, 1)[None], values[window].transpose(0, 1)[None], mask, query_len, 1.0
            )
            gathered = _grouped_query_attention(
                query, pool[window].clone().transpose(0, 1)[None], values[window].clone().transpose(0, 1)[None],
                mask, query_len, 1.0,
            )
            if not torch.equal(in_place, gathered):
                return False
    return True


def prefill_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key: torch.Tensor,  # [T, kv_heads, head_dim]
    value: torch.Tensor,  # [T, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], this step's K/V stored
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> list[torch.Tensor]:  # per prompt chunk, [its rows, num_heads, head_dim]
    """The long chunks' outputs, one SDPA call each, in row order."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    group = query.shape[1] // num_kv_heads
    parts = []
    for index, chunk in enumerate(metadata.prefills):
        rows = slice(chunk.token_start, chunk.token_end)
        if chunk.context_len == 0:
            k, v = key[rows], value[rows]  # [n, kv_heads, d]
        else:
            kv_shape = (-1, num_kv_heads, head_dim)
            k = gather_blocks(key_cache, chunk.block_table).view(kv_shape)[: chunk.seq_len]  # [seq_len, kv_heads, d]
            v = gather_blocks(value_cache, chunk.block_table).view(kv_shape)[: chunk.seq_len]
        # 4-D [1, heads, len, d] operands: the CPU flash kernel only takes the 4-D form.
        k = _expand_kv_heads(k, group).transpose(0, 1)[None]  # [1, num_heads, seq_len, d]
        v = _expand_kv_heads(v, group).transpose(0, 1)[None]
        q = query[rows].transpose(0, 1)[None]  # [1, num_heads, n, d]
        mask = metadata.prefill_mask(index, sliding_window)  # [n, seq_len] additive, or None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        parts.append(o[0].transpose(0, 1))  # [n, num_heads, d]
    return parts


def _grouped_query_attention(
    query: torch.Tensor,  # [n * q, num_heads, head_dim]: q consecutive rows per request
    key: torch.Tensor,  # [n, kv_heads, S, head_dim]
    value: torch.Tensor,  # [n, kv_heads, S, head_dim]
    mask: torch.Tensor,  # [n, 1, g * q or 1, S] additive
    query_len: int,
    scale: float,
) -> torch.Tensor:  # [n * q, num_heads, head_dim]
    """One call for n requests with q query tokens each, over their (padded) keys.

    GQA without copying K/V: the g query heads that share a KV head, and the q query tokens of a
    request, become g * q query rows of that KV head: q [n, kv_heads, g * q, d] against
    k [n, kv_heads, S, d], with a mask that is causal within the request's q tokens.
    """
    num_rows, num_heads, head_dim = query.shape
    n, num_kv_heads = key.shape[0], key.shape[1]
    gqa_group = num_heads // num_kv_heads
    q = query_len
    if q == 1:
        rows = query.view(n, num_kv_heads, gqa_group, head_dim)
    else:  # [n, q, kv_heads, g, d] -> [n, kv_heads, g, q, d] -> [n, kv_heads, g * q, d]
        rows = query.view(n, q, num_kv_heads, gqa_group, head_dim).permute(0, 2, 3, 1, 4)
        rows = rows.reshape(n, num_kv_heads, gqa_group * q, head_dim)
    o = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scale)  # [n, kv_heads, g * q, d]
    if q == 1:
        return o.reshape(num_rows, num_heads, head_dim)
    o = o.view(n, num_kv_heads, gqa_group, q, head_dim).permute(0, 3, 1, 2, 4)  # [n, q, kv_heads, g, d]
    return o.reshape(num_rows, num_heads, head_dim)


def gather_blocks(
    cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    block_ids: torch.Tensor,  # [m] int64
) -> torch.Tensor:  # [m, block_size * kv_heads * head_dim]
    """Copy the listed blocks out of a cache, in order.

    `index_select` over blocks seen as flat rows: on CPU a memcpy per block. Over the 4-D cache it
    walks elements with strides instead: the same speed when the blocks come from memory, 2.2x
    slower when they are in cache (512 blocks of 16 x 4 x 64 float32: 718 us vs 324 us)."""
    return cache.view(cache.shape[0], -1).index_select(0, block_ids)


def _expand_kv_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[seq, kv_heads, d] -> [seq, kv_heads * group, d], each KV head repeated for its query heads."""
    if group == 1:
        return x
    seq, num_kv_heads, head_dim = x.shape
    return x[:, :, None, :].expand(seq, num_kv_heads, group, head_dim).reshape(seq, num_kv_heads * group, head_dim)
