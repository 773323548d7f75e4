"""The Triton paged-attention and K/V-store kernels on the CPU, through Triton's interpreter.

Against the dense float64 reference of the portable tests, on shuffled block tables with decodes,
verification rows, fresh prompts and prompt chunks after a cached prefix in one step; GQA ratios
1, 3 and 4; sliding windows; two block sizes; float32, bfloat16 and float16. And bitwise: a
position's output is the same as a decode, as one of k + 1 verification rows, and in any batch.
Shapes are tiny: the interpreter runs every kernel op as numpy.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its own jit functions read it then
pytest.importorskip("triton")

from helix_server.layers.attention.builder import SequenceChunk, build_attention_metadata, order_for_attention
from helix_server.layers.attention.metadata import ForwardContext
from helix_server.layers.attention.paged_inputs import paged_inputs_of
from helix_server.layers.attention.portable import write_kv_cache
from helix_server.layers.attention.triton_backend import TritonAttention
from helix_server.layers.attention.triton_kernels import BLOCK_N, store_kv
from tests.layers.test_paged_attention import _dense_reference

HEAD_DIM = 16


@pytest.fixture(autouse=True)
def bfloat16_dot_in_the_interpreter(monkeypatch):
    """Triton 3.9's interpreter keeps bfloat16 as raw uint16 and its `tl.dot` multiplies those
    integers; widen bfloat16 operands to float32 first, as a GPU's MMA does (bfloat16 products are
    exact in float32, the accumulator is float32)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    dot = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return dot(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)
NUM_BLOCKS = 64
# (context_len, num_new_tokens): decodes (one past a tile of BLOCK_N keys), a fresh one-token
# request, verification rows (4 = 3 drafts + 1), a fresh prompt, a prompt chunk on a cached prefix.
SEQUENCES = [(9, 1), (0, 1), (BLOCK_N + 3, 1), (5, 4), (BLOCK_N - 2, 4), (0, 11), (14, 20)]


def _step(sequences, block_size, num_heads, num_kv_heads, dtype, gen, sliding_window=None):
    """A step over random shuffled block tables: the layer's output rows per request, the
    reference inputs, and the caches."""
    key_cache = torch.randn(NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)  # finite garbage
    value_cache = torch.randn(NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    chunks, full_k, full_v, queries = [], [], [], []
    for context_len, num_new in sequences:
        seq_len = context_len + num_new
        block_ids = [free_blocks.pop() for _ in range(-(-seq_len // block_size))]
        chunks.append(SequenceChunk(context_len, num_new, block_ids))
        full_k.append(torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype))
        full_v.append(torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype))
        queries.append(torch.randn(num_new, num_heads, HEAD_DIM, generator=gen).to(dtype))
        slots = torch.tensor([block_ids[p // block_size] * block_size + p % block_size for p in range(context_len)])
        write_kv_cache(full_k[-1][:context_len], full_v[-1][:context_len], key_cache, value_cache, slots.long())
    out = _attend(chunks, queries, full_k, full_v, key_cache, value_cache, block_size, sliding_window)
    return out, chunks, queries, full_k, full_v, key_cache


def _attend(chunks, queries, full_k, full_v, key_cache, value_cache, block_size, sliding_window=None):
    """Run `TritonAttention` over `chunks` (in the order the runner uses); per request its output rows."""
    order = order_for_attention(chunks, block_size, key_cache.shape[0])
    metadata = build_attention_metadata(
        [chunks[i] for i in order], block_size, "cpu", key_cache.dtype, key_cache.shape[0]
    )
    num_heads, num_kv_heads = queries[0].shape[1], key_cache.shape[2]
    query = torch.cat([queries[i] for i in order]).flatten(1)  # [T, H * d]
    key = torch.cat([full_k[i][chunks[i].context_len : chunks[i].seq_len] for i in order]).flatten(1)  # [T, kvH * d]
    value = torch.cat([full_v[i][chunks[i].context_len : chunks[i].seq_len] for i in order]).flatten(1)
    layer = TritonAttention(num_heads, num_kv_heads, HEAD_DIM, 0, HEAD_DIM**-0.5, sliding_window)
    ctx = ForwardContext(attn_metadata=metadata, kv_caches=[(key_cache, value_cache)])
    with torch.inference_mode():
        out = layer(query, key, value, ctx).view(-1, num_heads, HEAD_DIM)
    rows = {}
    start = 0
    for i in order:
        rows[i] = out[start : start + chunks[i].num_new_tokens]
        start += chunks[i].num_new_tokens
    return rows


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (4, 1)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("sliding_window", [None, 7])
def test_triton_paged_attention_matches_dense(block_size, num_heads, num_kv_heads, sliding_window):
    gen = torch.Generator().manual_seed(block_size * 10 + num_heads)
    out, chunks, queries, full_k, full_v, key_cache = _step(
        SEQUENCES, block_size, num_heads, num_kv_heads, torch.float32, gen, sliding_window
    )
    for i, chunk in enumerate(chunks):
        positions = torch.arange(chunk.context_len, chunk.seq_len)
        expected = _dense_reference(queries[i], full_k[i], full_v[i], positions, HEAD_DIM**-0.5, sliding_window)
        torch.testing.assert_close(out[i].double(), expected, atol=2e-6, rtol=2e-6)
        # The step's K/V landed in the request's blocks.
        stored = key_cache[torch.tensor(chunk.block_ids)].flatten(0, 1)[: chunk.seq_len]
        assert torch.equal(stored, full_k[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_paged_attention_half_precision(dtype):
    gen = torch.Generator().manual_seed(3)
    out, chunks, queries, full_k, full_v, _ = _step(SEQUENCES, 8, 6, 2, dtype, gen, sliding_window=None)
    for i, chunk in enumerate(chunks):
        assert out[i].dtype == dtype
        positions = torch.arange(chunk.context_len, chunk.seq_len)
        expected = _dense_reference(queries[i], full_k[i], full_v[i], positions, HEAD_DIM**-0.5, None)
        torch.testing.assert_close(out[i].double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_positions_bits_are_the_same_as_a_decode_as_verification_rows_and_in_any_batch(dtype):
    """Greedy with and without speculation stays token-identical only if a position's attention
    output does not depend on how many query rows its request has in the step, nor on its batch."""
    gen = torch.Generator().manual_seed(5)
    block_size, num_heads, num_kv_heads = 8, 8, 2
    seq_len = BLOCK_N + 6
    key_cache = torch.randn(NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    value_cache = torch.randn(NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    blocks = torch.randperm(48, generator=gen)[: -(-seq_len // block_size)].tolist()  # mates use 55-63
    full_k = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    full_v = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    full_q = torch.randn(seq_len, num_heads, HEAD_DIM, generator=gen).to(dtype)
    # Other requests in the batch: their own blocks, lengths and query counts.
    mates = [SequenceChunk(3, 1, [60]), SequenceChunk(20, 5, [61, 62, 63, 55]), SequenceChunk(0, 17, [56, 57, 58])]
    mate_q = [torch.randn(c.num_new_tokens, num_heads, HEAD_DIM, generator=gen).to(dtype) for c in mates]
    mate_k = [torch.randn(c.seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for c in mates]
    mate_v = [torch.randn(c.seq_len, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for c in mates]

    # Earlier steps wrote every position's K/V (each run below rewrites its own rows, the same).
    slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)])
    write_kv_cache(full_k, full_v, key_cache, value_cache, slots)
    for chunk, k, v in zip(mates, mate_k, mate_v):
        slots = torch.tensor([chunk.block_ids[p // block_size] * block_size + p % block_size for p in range(chunk.seq_len)])
        write_kv_cache(k, v, key_cache, value_cache, slots)

    def run(context_len, num_new, with_mates):
        chunk = SequenceChunk(context_len, num_new, blocks)
        chunks = [chunk, *mates] if with_mates else [chunk]
        queries = [full_q[context_len : context_len + num_new], *mate_q]
        return _attend(chunks, queries, [full_k, *mate_k], [full_v, *mate_v], key_cache, value_cache, block_size)[0]

    last = seq_len - 1
    decode = run(last, 1, with_mates=False)  # [1, H, d]
    assert torch.equal(run(last, 1, with_mates=True), decode), "a decode changed with its batch"
    # Verification of 1 and 3 drafts, alone and in a batch; a prompt chunk.
    for num_new, with_mates in ((2, False), (4, False), (4, True), (13, True)):
        rows = run(seq_len - num_new, num_new, with_mates)
        assert torch.equal(rows[-1:], decode), f"{num_new} query rows, batch mates {with_mates}"
    # Positions of a whole prompt (on both sides of a key tile's end) equal them decoded alone.
    prompt = run(0, seq_len, with_mates=True)
    for position in (0, BLOCK_N - 1, BLOCK_N):
        assert torch.equal(prompt[position], run(position, 1, with_mates=False)[0]), position


def test_store_kv_skips_padding_slots_and_zeroes_non_finite_values():
    gen = torch.Generator().manual_seed(9)
    key_cache = torch.randn(4, 4, 2, HEAD_DIM, generator=gen)
    value_cache = torch.randn(4, 4, 2, HEAD_DIM, generator=gen)
    key = torch.randn(3, 2, HEAD_DIM, generator=gen)
    value = torch.randn(3, 2, HEAD_DIM, generator=gen)
    key[1, 0, 3] = float("inf")
    value[1, 1, 0] = float("nan")
    slots = torch.tensor([5, 10, -1])
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    write_kv_cache(key[:2], value[:2], expected_k, expected_v, slots[:2])
    store_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k)
    assert torch.equal(value_cache, expected_v)
    assert key_cache.view(-1, 2, HEAD_DIM)[10, 0, 3] == 0


def test_padding_rows_attend_nothing_and_real_rows_are_unchanged():
    """A CUDA-graph batch padded with rows at position -1 (slot -1): the real rows' outputs are the
    unpadded ones, bitwise, and the padding rows are zeros."""
    gen = torch.Generator().manual_seed(13)
    block_size = 8
    key_cache = torch.randn(NUM_BLOCKS, block_size, 2, HEAD_DIM, generator=gen)
    value_cache = torch.randn(NUM_BLOCKS, block_size, 2, HEAD_DIM, generator=gen)
    chunks = [SequenceChunk(10, 1, [3, 7]), SequenceChunk(20, 1, [1, 9, 4])]
    metadata = build_attention_metadata(chunks, block_size, "cpu", num_blocks=NUM_BLOCKS)
    inputs = paged_inputs_of(metadata)
    query = torch.randn(2, 4, HEAD_DIM, generator=gen)
    from helix_server.layers.attention.triton_kernels import paged_attention

    real = paged_attention(query, key_cache, value_cache, inputs.block_table, inputs.token_seq, inputs.token_pos, 0.25)
    pad = torch.tensor([-1, -1], dtype=torch.int32)
    padded = paged_attention(
        torch.cat([query, torch.randn(2, 4, HEAD_DIM, generator=gen)]), key_cache, value_cache,
        inputs.block_table, torch.cat([inputs.token_seq, torch.zeros(2, dtype=torch.int32)]),
        torch.cat([inputs.token_pos, pad]), 0.25,
    )
    assert torch.equal(padded[:2], real)
    assert torch.equal(padded[2:], torch.zeros(2, 4, HEAD_DIM))
    assert math.isfinite(real.abs().sum().item())
