"""`AttentionMetadata.merged_query_groups`: one kernel call per query length, the same bits."""

from __future__ import annotations

import pytest
import torch

from helix_server.layers.attention.builder import SequenceChunk, build_attention_metadata
from helix_server.layers.cpu_kernels import cpu_kernels_supported, load_cpu_kernels
from helix_server.layers.fused_cpu import FusedAttention

BLOCK = 16


def chunks(seq_lens: list[int], query_len: int, first_block: int) -> list[SequenceChunk]:
    out, block = [], first_block
    for seq_len in seq_lens:
        blocks = -(-seq_len // BLOCK)
        out.append(SequenceChunk(block_ids=list(range(block, block + blocks)), context_len=seq_len - query_len,
                                 num_new_tokens=query_len))
        block += blocks
    return out


def metadata_of(batch: list[SequenceChunk]):
    return build_attention_metadata(batch, BLOCK, "cpu")


def test_groups_of_one_query_length_merge_and_others_stay_apart():
    # Decodes in three key-length classes (40, 300 and 700 keys), then verifications of 3 drafts.
    batch = chunks([40, 41, 300, 700], 1, 0) + chunks([90, 500], 4, 200)
    metadata = metadata_of(batch)
    assert len(metadata.query_groups) > 2  # classes split the decodes for the padded SDPA path
    merged = metadata.merged_query_groups()
    assert [g.query_len for g in merged] == [1, 4]
    decodes, verifies = merged
    assert (decodes.token_start, decodes.token_end, verifies.token_start, verifies.token_end) == (0, 4, 4, 12)
    assert decodes.seq_lens.tolist() == [40, 41, 300, 700]
    widest = -(-700 // BLOCK)
    assert decodes.block_tables.shape == (4, max(widest, decodes.block_tables.shape[1]))
    for row, chunk in enumerate(batch[:4]):
        blocks = -(-chunk.seq_len // BLOCK)
        assert decodes.block_tables[row, :blocks].tolist() == chunk.block_ids[:blocks]
    assert metadata.merged_query_groups() is merged  # built once per step


@pytest.mark.skipif(not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux and AVX-512F")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_merged_call_gives_every_row_the_bits_of_its_own_groups_call(dtype):
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(5)
    batch = chunks([40, 41, 300, 700], 1, 0) + chunks([90, 500], 4, 200)
    metadata = metadata_of(batch)
    num_blocks, kv_heads, heads, dim = 260, 2, 6, 64
    key_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=generator).to(dtype)
    rows = metadata.query_groups[-1].token_end
    query = torch.randn(rows, heads, dim, generator=generator).to(dtype)
    key = torch.randn(rows, kv_heads, dim, generator=generator).to(dtype)
    value = torch.randn(rows, kv_heads, dim, generator=generator).to(dtype)
    layer = FusedAttention(heads, kv_heads, dim, layer_idx=0)
    with torch.inference_mode():
        got = layer.attend(query, key, value, key_cache, value_cache, metadata)
        for group in metadata.query_groups:  # the per-class calls the merge replaces
            alone = torch.ops.helix.paged_query_attention(
                query[group.token_start : group.token_end], key_cache, value_cache, group.block_tables,
                group.seq_lens, group.query_len, layer.scale, 0,
            )
            assert torch.equal(got[group.token_start : group.token_end], alone)
