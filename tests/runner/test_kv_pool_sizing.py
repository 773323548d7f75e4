"""KV pool sizing: an exact block count, a memory size on CPU / DirectML, and on CUDA what is left
of `gpu_memory_utilization` of the GPU after loading (the CUDA query is faked: no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from helix_server.config import CacheConfig
from helix_server.errors import ParameterError
from helix_server.runner.kv_cache import CUDA_OVERHEAD_BYTES, GIB, size_kv_pool

BLOCK_BYTES = 1 << 20  # 1 MiB per block


def test_exact_count_and_cpu_memory():
    assert size_kv_pool(CacheConfig(num_kv_blocks=7), BLOCK_BYTES, 4096, 64) == 7
    cpu = torch.device("cpu")
    assert size_kv_pool(CacheConfig(kv_cache_memory=0.5), BLOCK_BYTES, 4096, 64, device=cpu) == 512
    # Capped at what max_num_seqs full-length sequences could use: 2 x 4096 / 16 blocks.
    assert size_kv_pool(CacheConfig(kv_cache_memory=4.0), BLOCK_BYTES, 4096, 2, device=cpu) == 512


def test_cuda_pool_is_what_is_left_of_the_utilization_budget(monkeypatch):
    total, used = 80 * GIB, 10 * GIB  # weights, CUDA context and other processes
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - used, total))
    cuda = torch.device("cuda", 0)
    cache = CacheConfig(gpu_memory_utilization=0.5, kv_cache_memory=0.001)  # kv_cache_memory: not on CUDA
    blocks = size_kv_pool(cache, BLOCK_BYTES, 1 << 20, 64, device=cuda, activation_bytes=2 * GIB)
    assert blocks == ((40 - 10 - 2) * GIB - CUDA_OVERHEAD_BYTES) // BLOCK_BYTES
    with pytest.raises(ParameterError) as info:
        size_kv_pool(CacheConfig(gpu_memory_utilization=0.1), BLOCK_BYTES, 4096, 64, device=cuda)
    assert info.value.param == "gpu_memory_utilization"
    with pytest.raises(ParameterError):
        size_kv_pool(CacheConfig(gpu_memory_utilization=1.5), BLOCK_BYTES, 4096, 64, device=cuda)


def test_cuda_pool_leaves_room_for_the_attention_gather(monkeypatch):
    from types import SimpleNamespace

    from helix_server.runner.kv_cache import attention_gather_factor

    total = 80 * GIB
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total, total))
    cache = CacheConfig(gpu_memory_utilization=0.5)
    plain = size_kv_pool(cache, BLOCK_BYTES, 1 << 20, 64, device=torch.device("cuda"))
    # 12 layers, 12 query heads over 4 KV heads: a gather copy plus a 3x wider copy, one layer at a time.
    model = SimpleNamespace(arch=SimpleNamespace(num_heads=12, num_kv_heads=4, num_layers=12))
    factor = attention_gather_factor(model)
    assert factor == pytest.approx(4 / 12)
    gathered = size_kv_pool(cache, BLOCK_BYTES, 1 << 20, 64, device=torch.device("cuda"), gather_factor=factor)
    assert gathered * BLOCK_BYTES * (1 + factor) <= plain * BLOCK_BYTES < (gathered + 2) * BLOCK_BYTES * (1 + factor)
    mha = SimpleNamespace(arch=SimpleNamespace(num_heads=8, num_kv_heads=8, num_layers=4))
    assert attention_gather_factor(mha) == pytest.approx(1 / 4)
