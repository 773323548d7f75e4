"""Paged attention and the K/V store as Triton kernels (CUDA; Triton's interpreter on the CPU in tests).

Both read and write the paged cache in place through the block tables: no gather, no padding.

`paged_attention_kernel` runs one program per (query token, KV head). The program holds the g query
heads that share the KV head as the rows of one [G_PAD, D_PAD] tile and walks the token's keys from
key 0 (or the start of its sliding window, rounded down to a tile) up to its own position, in tiles
of `BLOCK_N` keys, with an online softmax in float32. What a token's output is computed from is
therefore a function of its query, its position and the cached keys alone: the tiles, their order
and the reductions are the same whether the token is a decode, one of k + 1 verification rows, a
row of a prompt chunk, alone or in a batch of any size. So a position gets the same bits as a decode
and as a verified draft, which keeps greedy decoding token-identical with and without speculation
(checked bitwise under the interpreter; on a GPU it rests on a tile's rows being computed
independently by `tl.dot`, with one kernel configuration per model: see docs/cuda.md).

Importing this module imports `triton`; use `helix_server.layers.attention.selector` to ask whether
it is there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Keys per tile of the attention loop; the same for every row of a model, never tuned per batch.
BLOCK_N = 32
# Rows of the query tile: the GQA group padded up (tl.dot wants at least 16 rows on a GPU).
MIN_GROUP_ROWS = 16


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [T, num_heads, head_dim]
    q_ptr,  # [T, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache_ptr,  # same shape and strides as k_cache
    block_table_ptr,  # [num_seqs, max_blocks] int32
    token_seq_ptr,  # [T] int32: the block-table row of each token
    token_pos_ptr,  # [T] int32: each token's position (it sees keys 0..pos); -1 for a padding row
    scale,
    window,  # sliding window in tokens, 0 for none
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GQA: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(token_seq_ptr + token)
    pos = tl.load(token_pos_ptr + token)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    head_ok = g < GQA
    dim_ok = d < HEAD_DIM
    heads = kv_head * GQA + g
    q = tl.load(
        q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [G_PAD, D_PAD]
    first = pos - window + 1  # the first key in the window
    start = tl.where((window > 0) & (first > 0), first, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    for tile in range(start, pos + 1, BLOCK_N):
        j = tile + tl.arange(0, BLOCK_N)  # key positions of this tile
        valid = j <= pos
        if window > 0:
            valid = valid & (j > pos - window)
        block = tl.load(block_table_ptr + seq * stride_bt + j // BLOCK_SIZE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_kb + (j % BLOCK_SIZE) * stride_ks + kv_head * stride_kh  # [BLOCK_N]
        kv_mask = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s.to(tl.float32) * scale, float("-inf"))  # [G_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a padding row (pos -1) has no keys: zeros
    tl.store(
        out_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None] & dim_ok[None, :],
    )


@triton.jit
def store_kv_kernel(
    key_ptr,  # [T, kv_heads, head_dim]
    value_ptr,
    k_cache_ptr,  # [num_blocks * block_size, kv_heads * head_dim] viewed flat
    v_cache_ptr,
    slot_ptr,  # [T] int64; a negative slot (padding) writes nothing
    stride_t,
    stride_slot,
    ROW: tl.constexpr,  # kv_heads * head_dim
    ROW_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    offs = tl.arange(0, ROW_PAD)
    mask = offs < tl.where(slot >= 0, ROW, 0)
    k = tl.load(key_ptr + token * stride_t + offs, mask=mask, other=0.0)
    v = tl.load(value_ptr + token * stride_t + offs, mask=mask, other=0.0)
    # Non-finite values are stored as 0, as `portable.write_kv_cache` does.
    k = tl.where(tl.abs(k.to(tl.float32)) < float("inf"), k, 0.0)  # false for NaN too
    v = tl.where(tl.abs(v.to(tl.float32)) < float("inf"), v, 0.0)
    target = slot.to(tl.int64) * stride_slot + offs
    tl.store(k_cache_ptr + target, k, mask=mask)
    tl.store(v_cache_ptr + target, v, mask=mask)


def store_kv(
    key: torch.Tensor,  # [T, kv_heads, head_dim]
    value: torch.Tensor,  # [T, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 for rows that write nowhere
) -> None:
    """Write each token's K/V at its slot (non-finite values as 0); negative slots write nothing."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row = key.shape[1] * key.shape[2]
    if key.stride(1) * key.shape[1] != row or key.stride(2) != 1:  # rows must be packed (a row stride is fine)
        key = key.contiguous()
    if value.stride() != key.stride():
        value = value.contiguous()
        key = key.contiguous()
    store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping, key.stride(0), row,
        ROW=row, ROW_PAD=triton.next_power_of_2(row),
    )


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], this step's K/V stored
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
    token_seq: torch.Tensor,  # [T] int32
    token_pos: torch.Tensor,  # [T] int32
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Causal attention of every token over the cached keys of its sequence up to its position."""
    num_tokens, num_heads, head_dim = query.shape
    if query.stride(2) != 1:
        query = query.contiguous()
    _, block_size, num_kv_heads, _ = key_cache.shape
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    gqa = num_heads // num_kv_heads
    paged_attention_kernel[(num_tokens, num_kv_heads)](
        out, query, key_cache, value_cache, block_table, token_seq, token_pos,
        scale, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_table.stride(0),
        HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        GQA=gqa, G_PAD=max(MIN_GROUP_ROWS, triton.next_power_of_2(gqa)),
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, IEEE=query.dtype == torch.float32,
    )
    return out
