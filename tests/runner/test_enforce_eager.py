"""`--enforce-eager` (vLLM's flag): from the command line, the environment and TOML to the engine
config; without it CUDA with the Triton backend captures graphs, whose memory the KV pool sizing
sets aside; the CPU never does."""

from __future__ import annotations

import argparse

import torch

from helix_server.config import CacheConfig, SchedulerConfig
from helix_server.layers.attention import selector
from helix_server.models.loader import load_model
from helix_server.runner import kv_cache
from helix_server.runner.kv_cache import cuda_graph_bytes
from helix_server.settings import add_setting_flags, build_config
from tests.fixtures.tiny_models import make_tiny_model


def test_enforce_eager_flag_env_and_toml(tmp_path):
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    assert build_config(env={}).engine.model.enforce_eager is False
    flags = vars(parser.parse_args(["--enforce-eager"]))
    assert build_config(flags, env={}).engine.model.enforce_eager is True
    assert build_config(env={"HELIX_ENFORCE_EAGER": "1"}).engine.model.enforce_eager is True
    toml = tmp_path / "helix.toml"
    toml.write_text("enforce_eager = true\n")
    assert build_config(env={}, config_file=toml).engine.model.enforce_eager is True


def test_graph_memory_is_set_aside_only_with_graphs(tmp_path, monkeypatch):
    model = load_model(make_tiny_model(tmp_path / "llama"), torch.float32, "cpu", pack_for_cpu=False)
    scheduler = SchedulerConfig()
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(selector, "triton_available", lambda: True)
    with_graphs = cuda_graph_bytes(model, scheduler, torch.bfloat16, cuda, enforce_eager=False)
    assert with_graphs > 0
    assert cuda_graph_bytes(model, scheduler, torch.bfloat16, cuda, enforce_eager=True) == 0
    assert cuda_graph_bytes(model, scheduler, torch.bfloat16, torch.device("cpu"), enforce_eager=False) == 0

    # The pool sizing sees it: on a (simulated) 8 GiB GPU the pool shrinks by the graphs' share.
    monkeypatch.setattr(kv_cache, "device_memory", lambda device: (6 << 30, 8 << 30))
    sizes = {}
    for eager in (True, False):
        captured = {}

        def fake_size(*args, activation_bytes=0, gather_factor=0.0, _captured=captured, **kwargs):
            _captured.update(activation_bytes=activation_bytes, gather_factor=gather_factor)
            return 4

        monkeypatch.setattr(kv_cache, "size_kv_pool", fake_size)
        monkeypatch.setattr(kv_cache, "allocate_kv_caches", lambda *args: [])
        kv_cache.allocate_kv_pool(CacheConfig(), scheduler, model, None, 256, torch.bfloat16, cuda, eager)
        sizes[eager] = captured
    assert sizes[False]["activation_bytes"] - sizes[True]["activation_bytes"] == with_graphs
    # The Triton backend gathers nothing: no share of the pool is kept for gathering.
    assert sizes[False]["gather_factor"] == sizes[True]["gather_factor"] == 0.0
