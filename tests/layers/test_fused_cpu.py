"""helix's fused CPU kernels against the torch code they replace (`layers.fused_cpu`), in float32 and
bfloat16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helix_server.layers.activation import SiluAndMul
from helix_server.layers.attention import Attention
from helix_server.layers.attention.builder import MAX_BATCHED_QUERY_LEN
from helix_server.layers.attention.layer import short_query_len
from helix_server.layers.attention.portable import write_kv_cache
from helix_server.layers.cpu_kernels import cpu_kernels_supported, load_cpu_kernels
from helix_server.layers.fused_cpu import (
    FusedAttention,
    FusedRMSNorm,
    FusedRotaryEmbedding,
    FusedSiluAndMul,
    store_kv,
    use_fused_cpu_ops,
)
from helix_server.layers.norm import RMSNorm
from helix_server.layers.panel_linear import amx_available
from helix_server.layers.rotary import RopeConfig, RotaryEmbedding
from helix_server.models import load_model
from tests.fixtures.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler"
)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels()


DTYPES = [torch.float32, torch.bfloat16]
# Another summation order or exp moves a float32 result by a few ulps; in bfloat16 that can cross a
# rounding boundary: one bfloat16 ulp.
TOLERANCE = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}


def make_norm(hidden: int, generator: torch.Generator, dtype=torch.float32) -> tuple[RMSNorm, FusedRMSNorm]:
    reference = RMSNorm(hidden, eps=1e-5)
    reference.weight.data = torch.randn(hidden, generator=generator).to(dtype)
    fused = FusedRMSNorm(hidden, eps=1e-5)
    fused.weight = reference.weight
    return reference, fused


@pytest.mark.parametrize("hidden", [8, 37, 768])  # under one vector, a partial last vector, the bench width
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_the_residual_add_match_torchs(hidden, dtype):
    generator = torch.Generator().manual_seed(0)
    reference, fused = make_norm(hidden, generator, dtype)
    x = (torch.randn(20, hidden, generator=generator) * 3).to(dtype)
    residual = torch.randn(20, hidden, generator=generator).to(dtype)
    with torch.inference_mode():
        assert fused(x).dtype == dtype
        torch.testing.assert_close(fused(x), reference(x), **TOLERANCE[dtype])
        expected, expected_residual = reference(x, residual.clone())
        got, got_residual = fused(x, residual.clone())
    assert torch.equal(got_residual, expected_residual)  # the add: one rounding either way
    # Another summation order for the mean of squares: within a few ulps.
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_norm_rows_bits_do_not_depend_on_the_other_rows(dtype):
    generator = torch.Generator().manual_seed(1)
    _, fused = make_norm(768, generator, dtype)
    x = torch.randn(300, 768, generator=generator).to(dtype)  # more rows than one thread's share
    residual = torch.randn(300, 768, generator=generator).to(dtype)
    with torch.inference_mode():
        batch = fused(x)
        batch_add, _ = fused(x, residual.clone())
        for rows in (slice(0, 1), slice(7, 8), slice(5, 70), slice(299, 300)):
            assert torch.equal(fused(x[rows]), batch[rows])
            assert torch.equal(fused(x[rows], residual[rows].clone())[0], batch_add[rows])


def test_three_dimensional_inputs_take_torchs_path():
    generator = torch.Generator().manual_seed(2)
    reference, fused = make_norm(16, generator)
    x = torch.randn(3, 4, 16, generator=generator)  # q/k norm over heads
    with torch.inference_mode():
        assert torch.equal(fused(x), reference(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torchs_including_extremes(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(33, 2 * 200, generator=generator) * 4
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e4, -1e4])
    x[0, : len(extremes)] = extremes
    x[1, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    x = x.to(dtype)
    with torch.inference_mode():
        expected = SiluAndMul()(x)
        got = FusedSiluAndMul()(x)
    # Its own exp: within 2 ulp (float32; bfloat16 rounds that to at most one ulp); non-finite
    # results where torch's are.
    tolerance = dict(rtol=4e-7, atol=1e-30) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-30)
    torch.testing.assert_close(got, expected, equal_nan=True, **tolerance)
    assert torch.equal(got.isnan(), expected.isnan())
    rows = slice(10, 11)
    with torch.inference_mode():
        assert torch.equal(FusedSiluAndMul()(x[rows]), got[rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_gives_torchs_bits_on_a_strided_view(dtype):
    rope = RotaryEmbedding(RopeConfig(), head_dim=64, max_position_embeddings=512)
    rope.build_cache("cpu", dtype)
    fused = FusedRotaryEmbedding(RopeConfig(), head_dim=64, max_position_embeddings=512)
    fused.cos_sin_cache = rope.cos_sin_cache
    generator = torch.Generator().manual_seed(4)
    qkv = torch.randn(9, (6 + 2 + 2) * 64, generator=generator).to(dtype)  # q, k, v heads side by side
    positions = torch.tensor([0, 1, 2, 100, 101, 300, 301, 302, 511])
    cos, sin = rope.lookup(positions)
    expected, got = qkv.clone(), qkv.clone()
    with torch.inference_mode():
        rope.rotate_(expected[:, : 8 * 64].view(9, 8, 64), cos, sin)
        fused.rotate_(got[:, : 8 * 64].view(9, 8, 64), cos, sin)
    assert torch.equal(got, expected)  # rotated q/k identical, v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_what_write_kv_cache_writes(dtype):
    generator = torch.Generator().manual_seed(5)
    caches = [torch.randn(6, 4, 2, 8, generator=generator).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    key = torch.randn(5, 2, 8, generator=generator).to(dtype)
    value = torch.randn(5, 2, 8, generator=generator).to(dtype)
    key[1, 0, 3], value[2, 1, 0], value[4, 0, 7] = float("inf"), float("nan"), float("-inf")
    slots = torch.tensor([3, 0, 23, 10, 17])
    with torch.inference_mode():
        write_kv_cache(key, value, *expected, slots)
        store_kv(key, value, *caches, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    with pytest.raises(RuntimeError, match="slot 24 out of range"):
        store_kv(key, value, *caches, torch.tensor([0, 1, 2, 3, 24]))


def test_a_float32_model_runs_the_fused_ops_and_computes_the_same_logits(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    model = load_model(model_dir, torch.float32, "cpu")
    plain = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    kinds = {type(m) for m in model.modules()}
    assert {FusedRMSNorm, FusedSiluAndMul} <= kinds and not {RMSNorm, SiluAndMul} & kinds
    assert isinstance(model.rotary, FusedRotaryEmbedding)
    assert all(layer.self_attn.rotary is model.rotary for layer in model.model.layers)
    assert all(isinstance(m, FusedAttention) for m in model.modules() if isinstance(m, Attention))
    assert use_fused_cpu_ops(model) == 0  # nothing left to swap
    embed = model.model.embed_tokens.weight
    hidden = torch.randn(5, embed.shape[1])
    with torch.inference_mode():
        torch.testing.assert_close(model.model.norm(hidden), plain.model.norm(hidden), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(model.compute_logits(hidden), plain.compute_logits(hidden), atol=1e-5, rtol=1e-5)
    # bfloat16: the same swaps, the same logits as torch's ops within bfloat16's rounding; none in
    # float16.
    bf16 = load_model(model_dir, torch.bfloat16, "cpu")
    plain_bf16 = load_model(model_dir, torch.bfloat16, "cpu", pack_for_cpu=False)
    kinds = {type(m) for m in bf16.modules()}
    assert {FusedRMSNorm, FusedSiluAndMul, FusedAttention} <= kinds and not {RMSNorm, SiluAndMul, Attention} & kinds
    assert isinstance(bf16.rotary, FusedRotaryEmbedding)
    with torch.inference_mode():
        torch.testing.assert_close(
            bf16.model.norm(hidden.bfloat16()), plain_bf16.model.norm(hidden.bfloat16()), rtol=2**-7, atol=1e-6
        )
    assert use_fused_cpu_ops(load_model(model_dir, torch.float16, "cpu"), torch.float16) == 0


def test_use_fused_cpu_ops_leaves_other_modules_alone():
    model = nn.Sequential(nn.Linear(4, 4), RMSNorm(4), SiluAndMul())
    assert use_fused_cpu_ops(model) == 2
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], FusedRMSNorm)


def paged_case(head_dim: int, seq_lens: list[int], generator: torch.Generator, block_size: int = 16, kv_heads: int = 2):
    """Random caches (finite garbage outside the requests' keys) and shuffled block tables."""
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    free = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(-(-n // block_size) for n in seq_lens) + 1  # padded like a query group's tables
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return key_cache, value_cache, tables, block_tables


def attention_op(query, key_cache, value_cache, block_tables, seq_lens, query_len, window=0, kernel="avx512"):
    op = torch.ops.helix.paged_query_attention_amx if kernel == "amx" else torch.ops.helix.paged_query_attention
    with torch.inference_mode():
        return op(query, key_cache, value_cache, block_tables, torch.tensor(seq_lens), query_len, 0.3, window)


needs_amx = pytest.mark.skipif(not amx_available(), reason="this CPU has no AMX")
AMX = pytest.param("amx", marks=needs_amx)
# (kernel, dtype, head_dim): AVX-512 with a partial vector, one pass, two passes over the values; AMX
# (bfloat16, head_dim a multiple of 32) with 1 to 4 tile multiplies a score.
KERNEL_CASES = [
    *(("avx512", dtype, head_dim) for dtype in DTYPES for head_dim in (24, 64, 128)),
    *(pytest.param("amx", torch.bfloat16, head_dim, marks=needs_amx) for head_dim in (32, 64, 96, 128)),
]


@pytest.mark.parametrize("kernel,dtype,head_dim", KERNEL_CASES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("heads", [6, 14])  # GQA groups of 3 and 7 query heads (AMX: 1 and 2 score tiles a token)
def test_paged_query_attention_matches_a_dense_reference(kernel, dtype, head_dim, window, heads):
    """bfloat16: the reference runs on the same bfloat16 values widened; the kernel computes in
    float32 and rounds each output once, so it is within bfloat16's rounding of the reference."""
    generator = torch.Generator().manual_seed(head_dim + window)
    seq_lens, query_len, group = [3, 40, 17], 3, heads // 2
    key_cache, value_cache, tables, block_tables = paged_case(head_dim, seq_lens, generator)
    query = torch.randn(len(seq_lens) * query_len, heads, head_dim, generator=generator)
    key_cache, value_cache, query = key_cache.to(dtype), value_cache.to(dtype), query.to(dtype)
    out = attention_op(query, key_cache, value_cache, block_tables, seq_lens, query_len, window, kernel)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    for r, (seq_len, table) in enumerate(zip(seq_lens, tables)):
        slots = torch.tensor([table[j // 16] * 16 + j % 16 for j in range(seq_len)])
        k = key_cache.view(-1, 2, head_dim)[slots].double()[:, torch.arange(heads) // group]  # [L, heads, d]
        v = value_cache.view(-1, 2, head_dim)[slots].double()[:, torch.arange(heads) // group]
        for t in range(query_len):
            position = seq_len - query_len + t
            allowed = torch.arange(seq_len) <= position
            if window:
                allowed &= torch.arange(seq_len) > position - window
            q = query[r * query_len + t].double()  # [heads, d]
            scores = torch.einsum("hd,lhd->hl", q, k) * 0.3
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            expected = torch.einsum("hl,lhd->hd", weights, v)
            torch.testing.assert_close(out[r * query_len + t].double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("kernel,dtype", [("avx512", torch.float32), ("avx512", torch.bfloat16), (AMX, torch.bfloat16)])
@pytest.mark.parametrize("heads,window,block_size", [(6, 0, 16), (14, 20, 32)])
def test_a_query_rows_bits_depend_on_its_keys_only(kernel, dtype, heads, window, block_size):
    """The same position gives the same bits as a decode, as a draft being verified, alone or
    among other requests (AMX: whichever other query rows share its score tile)."""
    generator = torch.Generator().manual_seed(9)
    seq_lens = [50, 7, 33]
    key_cache, value_cache, _, block_tables = paged_case(64, seq_lens, generator, block_size)
    key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    query = torch.randn(9, heads, 64, generator=generator).to(dtype)

    def attend(q, tables, lens, query_len):
        return attention_op(q, key_cache, value_cache, tables, lens, query_len, window, kernel)

    batch = attend(query, block_tables, seq_lens, 3)  # 3 requests x 3 tokens
    for r, seq_len in enumerate(seq_lens):
        for t in range(3):
            row = r * 3 + t
            alone = attend(query[row : row + 1], block_tables[r : r + 1], [seq_len - 2 + t], 1)  # a decode there
            assert torch.equal(alone, batch[row : row + 1]), (r, t)
    assert torch.equal(attend(query[3:6], block_tables[1:2], [7], 3), batch[3:6])


@needs_amx
def test_the_amx_kernel_refuses_shapes_it_does_not_tile():
    generator = torch.Generator().manual_seed(11)
    for head_dim, block_size, message in [(24, 16, "got 24 and 16"), (64, 8, "got 64 and 8"), (160, 16, "got 160")]:
        key_cache, value_cache, _, block_tables = paged_case(head_dim, [20], generator, block_size)
        query = torch.randn(1, 4, head_dim, generator=generator).bfloat16()
        with pytest.raises(RuntimeError, match=message):
            attention_op(query, key_cache.bfloat16(), value_cache.bfloat16(), block_tables, [20], 1, kernel="amx")
    key_cache, value_cache, _, block_tables = paged_case(64, [20], generator)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        attention_op(torch.randn(1, 4, 64), key_cache, value_cache, block_tables, [20], 1, kernel="amx")


def test_helix_kernels_take_chunks_of_up_to_64_tokens_as_short_queries():
    model = nn.Sequential(Attention(9, 3, 64, 0), Attention(9, 3, 64, 1))
    assert short_query_len(model) == MAX_BATCHED_QUERY_LEN == 16  # torch's SDPA: prompt chunks past 16
    use_fused_cpu_ops(model, torch.float32)
    assert short_query_len(model) == 64


def test_bfloat16_attention_layers_run_the_amx_kernel_where_it_tiles_them():
    model = nn.Sequential(Attention(9, 3, 64, 0), Attention(8, 2, 24, 1))
    use_fused_cpu_ops(model, torch.bfloat16)
    assert [layer.use_amx for layer in model] == [amx_available(), False]
    model = nn.Sequential(Attention(9, 3, 64, 0))
    use_fused_cpu_ops(model, torch.float32)
    assert not model[0].use_amx


def test_paged_query_attention_refuses_inconsistent_metadata():
    generator = torch.Generator().manual_seed(10)
    key_cache, value_cache, _, block_tables = paged_case(16, [20], generator)
    query = torch.randn(1, 4, 16, generator=generator)
    with pytest.raises(RuntimeError, match="has 60 keys"):
        attention_op(query, key_cache, value_cache, block_tables, [60], 1)  # more keys than 3 blocks hold
    with pytest.raises(RuntimeError, match="block id out of range"):
        attention_op(query, key_cache, value_cache, torch.tensor([[999, 0, 0]]), [20], 1)
    with pytest.raises(RuntimeError, match="query has 1 rows"):
        attention_op(query, key_cache, value_cache, block_tables, [20], 2)
