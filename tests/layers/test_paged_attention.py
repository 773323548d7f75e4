"""The portable paged attention against a dense reference, on shuffled (non-contiguous) block tables
and on tables of consecutive blocks (whose keys attention reads in place).

One step mixes decodes of different lengths, a one-token fresh request, short multi-token chunks
(like drafts being verified) attended in batched groups, fresh prefills and prefill chunks with
context (chunked prefill). The cache starts filled with finite garbage, so any
masked slot that leaks into a softmax shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

from helix_server.layers.attention import portable
from helix_server.layers.attention.builder import (
    MAX_BATCHED_QUERY_LEN,
    SequenceChunk,
    build_attention_metadata,
    key_run_start,
    order_for_attention,
    padded_key_blocks,
)
from helix_server.layers.attention.metadata import ForwardContext
from helix_server.layers.attention.portable import paged_attention, write_kv_cache
from helix_server.layers.cpu_kernels import cpu_kernels_supported, load_cpu_kernels
from helix_server.layers.fused_cpu import FusedAttention

HEAD_DIM = 16
NUM_BLOCKS = 840
# (context_len, num_new_tokens): decodes over several lengths (block boundaries included),
# a one-token fresh request, a fresh prefill, and a prefill chunk after cached context.
# Chunks of up to 16 tokens are attended in batched groups of equal length (decodes, drafts being
# verified), longer ones alone.
SEQUENCES = [(0, 13), (16, 1), (0, 1), (8, 1), (40, 1), (20, 7), (31, 1), (5, 4), (33, 4), (0, 40), (24, 20)]
# Decodes of very different lengths: attended in several groups, each padded to its longest.
WIDE_SEQUENCES = [(0, 13), (16, 1), (600, 1), (8, 1), (400, 1), (20, 7), (700, 1), (3, 1), (590, 1), (500, 4), (9, 4)]


def _dense_reference(q, k, v, q_positions, scale, sliding_window):
    """q [n, H, d] at `q_positions`; k, v [L, kvH, d] for positions 0..L-1. float64 softmax attention."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    k_full = k.double()[:, torch.arange(num_heads) // group]  # [L, H, d]: query head h reads kv head h // g
    v_full = v.double()[:, torch.arange(num_heads) // group]
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k_full) * scale  # [H, n, L]
    k_pos = torch.arange(k.shape[0])[None, :]
    allowed = k_pos <= q_positions[:, None]
    if sliding_window is not None:
        allowed &= k_pos > q_positions[:, None] - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v_full)  # [n, H, d]


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (8, 2), (4, 4)], ids=["gqa2", "gqa4", "mha"])
@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("sequences", [SEQUENCES, WIDE_SEQUENCES], ids=["close", "wide"])
@pytest.mark.parametrize("in_place", [False, True, "gather"], ids=["shuffled", "runs", "runs-gathered"])
@pytest.mark.parametrize("backend", ["portable", "fused_cpu"])
def test_paged_attention_matches_dense(
    block_size, num_heads, num_kv_heads, sliding_window, sequences, in_place, backend, monkeypatch
):
    """With `in_place`, every other request's blocks are one run of consecutive ids (the pool size
    is passed, so short queries over such runs read their keys in place); the rest shuffled.
    "runs-gathered": as if this machine's SDPA gave views other bits than copies
    (`in_place_matches_gathered` False), so such a request's call gathers its keys instead.
    `fused_cpu`: the same step through `FusedAttention` (helix's CPU kernels)."""
    if backend == "fused_cpu" and not cpu_kernels_supported():
        pytest.skip("helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler")
    if in_place == "gather":
        monkeypatch.setattr(portable, "in_place_matches_gathered", lambda *args: False)
    gen = torch.Generator().manual_seed(block_size * 100 + num_heads * 10 + num_kv_heads)
    scale = 1 / math.sqrt(HEAD_DIM)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    key_cache = rand(NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM)  # finite garbage everywhere
    value_cache = rand(NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()

    next_run = 0  # runs are cut from the pool's start, shuffled blocks from the rest
    if in_place:
        free_blocks = [b for b in free_blocks if b >= NUM_BLOCKS // 2]
    chunks, full_k, full_v = [], [], []
    for index, (context_len, num_new) in enumerate(sequences):
        seq_len = context_len + num_new
        num_seq_blocks = -(-seq_len // block_size)
        if in_place and index % 2:
            block_ids = list(range(next_run, next_run + num_seq_blocks))
            next_run += num_seq_blocks + 1
        else:
            block_ids = [free_blocks.pop() for _ in range(num_seq_blocks)]
        chunks.append(SequenceChunk(context_len, num_new, block_ids))
        full_k.append(rand(seq_len, num_kv_heads, HEAD_DIM))
        full_v.append(rand(seq_len, num_kv_heads, HEAD_DIM))
        # Earlier steps wrote the context K/V.
        slots = torch.tensor(
            [block_ids[p // block_size] * block_size + p % block_size for p in range(context_len)],
            dtype=torch.long,
        )
        write_kv_cache(full_k[-1][:context_len], full_v[-1][:context_len], key_cache, value_cache, slots)

    assert next_run <= NUM_BLOCKS // 2
    num_blocks = NUM_BLOCKS if in_place else None
    # Each backend's own short queries: helix's CPU kernels take chunks of up to 64 tokens as short
    # queries (the 40-token prompt and the 20-token chunk after context too).
    max_short = MAX_BATCHED_QUERY_LEN if backend == "portable" else FusedAttention.max_short_query_len
    order = order_for_attention(chunks, block_size, num_blocks, max_short)
    metadata = build_attention_metadata(
        [chunks[i] for i in order], block_size, "cpu", num_blocks=num_blocks, max_short_len=max_short
    )
    query_lens = [g.query_len for g in metadata.query_groups]
    assert {1, 4} <= set(query_lens)
    if sequences is SEQUENCES:
        assert (40 in query_lens and 20 in query_lens) == (backend == "fused_cpu")
    assert any(g.key_start is not None for g in metadata.query_groups) == bool(in_place)
    if sequences is WIDE_SEQUENCES:  # decodes too far apart in length for one padded call
        assert query_lens.count(1) > 1
    queries = {i: rand(chunks[i].num_new_tokens, num_heads, HEAD_DIM) for i in order}
    query = torch.cat([queries[i] for i in order])  # [T, H, d]
    key = torch.cat([full_k[i][chunks[i].context_len :] for i in order])  # [T, kvH, d]
    value = torch.cat([full_v[i][chunks[i].context_len :] for i in order])

    if backend == "portable":
        out = paged_attention(query, key, value, key_cache, value_cache, metadata, scale, sliding_window)
    else:
        out = fused_attention(query, key, value, key_cache, value_cache, metadata, scale, sliding_window)

    assert out.shape == query.shape
    row = 0
    for i in order:
        chunk = chunks[i]
        rows = slice(row, row + chunk.num_new_tokens)
        row += chunk.num_new_tokens
        q_positions = torch.arange(chunk.context_len, chunk.seq_len)
        expected = _dense_reference(queries[i], full_k[i], full_v[i], q_positions, scale, sliding_window)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)
        # The step's K/V landed in the request's blocks.
        gathered = key_cache[torch.tensor(chunk.block_ids)].flatten(0, 1)[: chunk.seq_len]
        torch.testing.assert_close(gathered, full_k[i], atol=0, rtol=0)


def fused_attention(query, key, value, key_cache, value_cache, metadata, scale, sliding_window):
    """`paged_attention`'s arguments through `FusedAttention` (layer 0 of a one-layer cache)."""
    assert load_cpu_kernels()
    num_tokens, num_heads, head_dim = query.shape
    layer = FusedAttention(num_heads, key.shape[1], head_dim, 0, scale, sliding_window)
    ctx = ForwardContext(attn_metadata=metadata, kv_caches=[(key_cache, value_cache)])
    with torch.inference_mode():
        out = layer(query.reshape(num_tokens, -1), key.reshape(num_tokens, -1), value.reshape(num_tokens, -1), ctx)
    return out.view(num_tokens, num_heads, head_dim)


def test_decode_only_and_prefill_only_steps():
    """Steps with no prefill rows, and with no decode rows, take the other path alone."""
    gen = torch.Generator().manual_seed(7)
    block_size, num_heads, num_kv_heads = 8, 4, 2
    key_cache = torch.randn(8, block_size, num_kv_heads, HEAD_DIM, generator=gen)
    value_cache = torch.randn(8, block_size, num_kv_heads, HEAD_DIM, generator=gen)
    seq_k = torch.randn(10, num_kv_heads, HEAD_DIM, generator=gen)
    seq_v = torch.randn(10, num_kv_heads, HEAD_DIM, generator=gen)
    q = torch.randn(10, num_heads, HEAD_DIM, generator=gen)
    block_ids = [5, 2]

    prefill = build_attention_metadata([SequenceChunk(0, 9, block_ids)], block_size, "cpu")
    out = paged_attention(q[:9], seq_k[:9], seq_v[:9], key_cache, value_cache, prefill, 0.25)
    expected = _dense_reference(q[:9], seq_k[:9], seq_v[:9], torch.arange(9), 0.25, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)

    decode = build_attention_metadata([SequenceChunk(9, 1, block_ids)], block_size, "cpu")
    out = paged_attention(q[9:], seq_k[9:], seq_v[9:], key_cache, value_cache, decode, 0.25)
    expected = _dense_reference(q[9:], seq_k, seq_v, torch.tensor([9]), 0.25, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# (context_len, num_new_tokens) of short queries on both sides of the CPU kernel's 512-key split.
BATCH_MATES = [(100, 1), (430, 1), (505, 1), (520, 1), (610, 1), (700, 1), (900, 1), (1300, 1), (1500, 1),
               (90, 4), (600, 4), (780, 4), (1020, 4)]


@pytest.mark.parametrize("in_place_exact", [None, False], ids=["as-measured", "views-differ"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_requests_attention_is_bitwise_the_same_alone_and_in_any_batch(dtype, in_place_exact, monkeypatch):
    """Greedy batch invariance at the attention: a request's rows must not change with the other
    requests sharing its padded batched call (lengths past the 512-key split included), nor with
    whether its keys lie in one run of the pool. "as-measured": whatever this machine's check
    (`in_place_matches_gathered`) says at this thread count; "views-differ": as on a machine where
    torch's kernel gives views of the pool other bits than copies (seen at 2 threads on some CPUs)."""
    if in_place_exact is not None:
        monkeypatch.setattr(portable, "in_place_matches_gathered", lambda *args: in_place_exact)
    gen = torch.Generator().manual_seed(11)
    block_size, num_heads, num_kv_heads, head_dim = 16, 12, 4, 64
    # Every other request's blocks are a run of consecutive ids, read in place when the pool size
    # is passed (and gathered like the others when not); runs first, shuffled blocks after them.
    runs = [-(-(c + n) // block_size) for c, n in BATCH_MATES[1::2]]
    first_shuffled = sum(runs) + 1
    num_blocks = first_shuffled + sum(-(-(c + n) // block_size) for c, n in BATCH_MATES[::2]) + 64

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    key_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    free_blocks = torch.randperm(num_blocks - first_shuffled, generator=gen).add(first_shuffled).tolist()
    next_run = 1
    chunks, queries, keys, values = [], [], [], []
    for index, (context_len, num_new) in enumerate(BATCH_MATES):
        needed = -(-(context_len + num_new) // block_size)
        if index % 2:
            blocks = list(range(next_run, next_run + needed))
            next_run += needed
        else:
            blocks = [free_blocks.pop() for _ in range(needed)]
        chunks.append(SequenceChunk(context_len, num_new, blocks))
        queries.append(rand(num_new, num_heads, head_dim))
        keys.append(rand(num_new, num_kv_heads, head_dim))
        values.append(rand(num_new, num_kv_heads, head_dim))

    def attend(indices, in_place=True):
        pool = num_blocks if in_place else None
        order = [indices[i] for i in order_for_attention([chunks[i] for i in indices], block_size, pool)]
        metadata = build_attention_metadata([chunks[i] for i in order], block_size, "cpu", dtype, pool)
        assert any(g.key_start is not None for g in metadata.query_groups) == (in_place and any(i % 2 for i in indices))
        out = paged_attention(
            torch.cat([queries[i] for i in order]), torch.cat([keys[i] for i in order]),
            torch.cat([values[i] for i in order]), key_cache, value_cache, metadata, head_dim**-0.5,
        )
        rows = torch.tensor([chunks[i].num_new_tokens for i in order]).cumsum(0).tolist()
        return {i: out[end - chunks[i].num_new_tokens : end] for i, end in zip(order, rows)}

    together = attend(list(range(len(chunks))))
    for i in range(len(chunks)):
        assert torch.equal(attend([i])[i], together[i]), f"request {BATCH_MATES[i]} changed with its batch"
    # And in a smaller mix (different groups, different padding around it).
    mix = [1, 3, 4, 7, 10, 11]
    for i, rows in attend(mix).items():
        assert torch.equal(rows, together[i])
    # Keys read in place give the bits that gathering them gives.
    for i, rows in attend(list(range(len(chunks))), in_place=False).items():
        assert torch.equal(rows, together[i]), f"request {BATCH_MATES[i]} changed when its keys were gathered"


def test_order_puts_short_chunks_first_then_long_ones_by_length():
    # (context_len, num_new_tokens): two prompt chunks (longest first in scheduler order), decodes
    # of two lengths, a 16-token draft verification (short) and a 17-token chunk (long).
    chunks = [SequenceChunk(c, n, list(range(64))) for c, n in [(0, 600), (90, 1), (0, 300), (10, 1), (40, 16), (0, 17)]]
    order = order_for_attention(chunks)
    assert order == [3, 1, 4, 5, 2, 0]
    # Long chunks sorted by length keep the longest (linear layers' bulk rows) at the end.
    assert [chunks[i].num_new_tokens for i in order[3:]] == [17, 300, 600]


def test_key_run_start_needs_consecutive_blocks_and_a_padded_window_inside_the_pool():
    block_size = 16
    # 40 keys: 3 blocks, padded to its key-length class.
    padded = padded_key_blocks(40, block_size)
    assert key_run_start(SequenceChunk(39, 1, [7, 8, 9]), block_size, num_blocks=100) == 7 * block_size
    # Lookahead blocks past the keys do not matter; neither does a gap among them.
    assert key_run_start(SequenceChunk(39, 1, [7, 8, 9, 30]), block_size, num_blocks=100) == 7 * block_size
    assert key_run_start(SequenceChunk(39, 1, [7, 9, 8]), block_size, num_blocks=100) is None
    assert key_run_start(SequenceChunk(39, 1, [7, 30, 9]), block_size, num_blocks=100) is None
    # The padded window must end inside the pool (its slots past the keys are read, then masked).
    assert key_run_start(SequenceChunk(39, 1, [7, 8, 9]), block_size, num_blocks=7 + padded) == 7 * block_size
    assert key_run_start(SequenceChunk(39, 1, [7, 8, 9]), block_size, num_blocks=7 + padded - 1) is None


@pytest.mark.parametrize("in_place", [False, True], ids=["gathered", "in-place"])
def test_a_request_whose_kv_overflowed_does_not_poison_its_neighbours(in_place):
    """A decode's padded key window covers the next request's blocks (read in place) or block 0
    (gathered); that request's K/V held inf and NaN. The decode's output must not change."""
    gen = torch.Generator().manual_seed(3)
    block_size, num_heads, num_kv_heads = 16, 4, 2
    key_cache = torch.randn(64, block_size, num_kv_heads, HEAD_DIM, generator=gen)
    value_cache = torch.randn(64, block_size, num_kv_heads, HEAD_DIM, generator=gen)
    # 40 keys in blocks 1-3, padded to a 64-key class: the window is blocks 1-4 (or 1-3 and 0).
    decode = SequenceChunk(39, 1, [1, 2, 3])
    assert padded_key_blocks(40, block_size) == 4
    q = torch.randn(1, num_heads, HEAD_DIM, generator=gen)
    k_new = torch.randn(1, num_kv_heads, HEAD_DIM, generator=gen)
    v_new = torch.randn(1, num_kv_heads, HEAD_DIM, generator=gen)

    def decode_output() -> torch.Tensor:
        num_blocks = 64 if in_place else None
        metadata = build_attention_metadata([decode], block_size, "cpu", num_blocks=num_blocks)
        assert (metadata.query_groups[0].key_start is not None) == in_place
        return paged_attention(q, k_new, v_new, key_cache, value_cache, metadata, HEAD_DIM**-0.5)

    clean = decode_output()
    # Another request's prompt overflowed; its K/V go into the blocks the window pads with.
    poison = torch.full((2 * block_size, num_kv_heads, HEAD_DIM), float("inf"))
    poison[::3] = float("nan")
    poison[1::3] = float("-inf")
    slots = torch.cat([torch.arange(4 * block_size, 5 * block_size), torch.arange(block_size)])
    write_kv_cache(poison, poison, key_cache, value_cache, slots)
    after = decode_output()
    assert torch.isfinite(after).all()
    assert torch.equal(after, clean)
