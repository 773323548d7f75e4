"""The CUDA-graph runner's padding, checked on the CPU: the padded step run eagerly (as a graph
replays it) through the Triton backend (Triton's interpreter) gives the real rows what the unpadded
step gives them, and its padding rows write no KV slot."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its own jit functions read it then
pytest.importorskip("triton")

from helix_server.layers.attention import selector
from helix_server.layers.attention.builder import SequenceChunk, allocate_kv_caches, build_forward_context
from helix_server.layers.attention.triton_backend import use_triton_attention
from helix_server.models.loader import load_model
from helix_server.runner.cuda_graphs import (
    CudaGraphRunner,
    bucket,
    capture_sizes,
    cuda_graphs_enabled,
    pad_step,
)
from tests.fixtures.tiny_models import make_tiny_model

BLOCK_SIZE = 4


def test_capture_sizes_and_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 12, 16, 20]
    assert capture_sizes(512)[-3:] == [256, 384, 512]
    sizes = capture_sizes(64)
    assert [bucket(n, sizes) for n in (1, 3, 5, 9, 13, 33, 64, 65)] == [1, 4, 8, 12, 16, 48, 64, None]


def test_graphs_only_on_cuda_with_triton_and_not_with_enforce_eager(monkeypatch):
    monkeypatch.setattr(selector, "triton_available", lambda: True)
    assert cuda_graphs_enabled(torch.device("cuda", 0), enforce_eager=False)
    assert not cuda_graphs_enabled(torch.device("cuda", 0), enforce_eager=True)
    assert not cuda_graphs_enabled(torch.device("cpu"), enforce_eager=False)
    assert not cuda_graphs_enabled(torch.device("xpu"), enforce_eager=False)
    monkeypatch.setattr(selector, "triton_available", lambda: False)
    assert not cuda_graphs_enabled(torch.device("cuda", 0), enforce_eager=False)


def test_pad_step_pads_with_rows_that_write_and_read_nothing():
    chunks = [SequenceChunk(5, 1, [3, 9]), SequenceChunk(2, 3, [7, 1])]
    step = pad_step(chunks, [11, 12, 13, 14], [5, 2, 3, 4], BLOCK_SIZE, size=8, width=6)
    assert step.num_tokens == 4
    assert step.input_ids == [11, 12, 13, 14, 0, 0, 0, 0]
    assert step.slot_mapping == [9 * 4 + 1, 7 * 4 + 2, 7 * 4 + 3, 1 * 4 + 0, -1, -1, -1, -1]
    assert step.token_seq[:4] == [0, 1, 1, 1]
    assert step.token_pos == [5, 2, 3, 4, -1, -1, -1, -1]
    assert step.block_table == [[3, 9, 0, 0, 0, 0], [7, 1, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def triton_model(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("graphs") / "llama", "llama")
    model = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    use_triton_attention(model)
    return model


def test_padded_step_equals_the_unpadded_one_and_writes_only_its_own_slots(triton_model):
    model = triton_model
    caches = allocate_kv_caches(model.num_layers, 24, BLOCK_SIZE, model.num_kv_heads, model.head_dim, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    for key_cache, value_cache in caches:  # earlier steps' K/V, and finite garbage elsewhere
        key_cache.copy_(torch.randn(key_cache.shape, generator=gen))
        value_cache.copy_(torch.randn(value_cache.shape, generator=gen))
    # Two decodes and a verification of 2 drafts: 5 tokens, padded to 8.
    chunks = [SequenceChunk(6, 1, [4, 10]), SequenceChunk(9, 1, [2, 15, 8]), SequenceChunk(3, 3, [20, 5])]
    input_ids = [17, 230, 41, 42, 43]
    positions = [6, 9, 3, 4, 5]
    before = [(k.clone(), v.clone()) for k, v in caches]

    runner = CudaGraphRunner(model, caches, BLOCK_SIZE, max_capture_size=16, max_model_len=64, device=torch.device("cpu"))
    assert runner.can_run(chunks) and bucket(5, runner.sizes) == 8
    padded = runner.run(chunks, input_ids, positions)
    padded_caches = [(k.clone(), v.clone()) for k, v in caches]

    # The padding wrote nothing: every slot but the 5 real tokens' is unchanged, in every layer.
    real_slots = torch.tensor(pad_step(chunks, input_ids, positions, BLOCK_SIZE, 8, 16).slot_mapping[:5])
    untouched = torch.ones(24 * BLOCK_SIZE, dtype=torch.bool)
    untouched[real_slots] = False
    for (k0, v0), (k1, v1) in zip(before, padded_caches):
        assert torch.equal(k1.flatten(0, 1)[untouched], k0.flatten(0, 1)[untouched])
        assert torch.equal(v1.flatten(0, 1)[untouched], v0.flatten(0, 1)[untouched])
        assert not torch.equal(k1.flatten(0, 1)[real_slots], k0.flatten(0, 1)[real_slots])

    # The same step unpadded, through the builder's metadata, on the caches as they were.
    for (k, v), (k0, v0) in zip(caches, before):
        k.copy_(k0)
        v.copy_(v0)
    ctx = build_forward_context(chunks, BLOCK_SIZE, "cpu", caches)
    with torch.inference_mode():
        unpadded = model(torch.tensor(input_ids), torch.tensor(positions), ctx)
    assert padded.shape == unpadded.shape and padded.shape[0] == 5
    # Close, not bitwise: the linear layers' GEMM over 8 rows may round a row differently than over
    # 5 (it does on this CPU; cuBLAS picks kernels by shape too). Attention rows are independent.
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)
    for (k1, v1), (k, v) in zip(padded_caches, caches):
        torch.testing.assert_close(k1, k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v1, v, atol=1e-5, rtol=1e-5)


def test_long_chunks_are_not_for_graphs(triton_model):
    runner = CudaGraphRunner(triton_model, [], BLOCK_SIZE, max_capture_size=8, max_model_len=64, device=torch.device("cpu"))
    assert not runner.can_run([SequenceChunk(0, 17, list(range(5)))])  # a prompt chunk
    assert not runner.can_run([SequenceChunk(4, 1, [1, 2])] * 9)  # more tokens than the largest size
    assert runner.can_run([SequenceChunk(4, 1, [1, 2])] * 8)
