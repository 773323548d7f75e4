"""Which attention backend each device gets, and a tiny model's forward with the Triton backend
(through Triton's interpreter on the CPU) against the portable backend."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its own jit functions read it then

from helix_server.layers.attention import Attention, selector
from helix_server.layers.attention.builder import SequenceChunk, allocate_kv_caches, build_forward_context
from helix_server.models.loader import load_model
from tests.fixtures.tiny_models import make_tiny_model


@pytest.mark.parametrize(
    "device,hip,has_triton,expected",
    [
        ("cpu", None, True, selector.CPU),
        ("cuda", None, True, selector.TRITON),
        ("cuda:1", None, True, selector.TRITON),
        ("cuda", None, False, selector.PORTABLE),
        ("cuda", "6.2", True, selector.PORTABLE),  # ROCm builds expose AMD GPUs as "cuda"
        ("xpu", None, True, selector.PORTABLE),
        ("privateuseone", None, True, selector.PORTABLE),  # DirectML
    ],
)
def test_each_device_gets_its_backend_and_says_why(device, hip, has_triton, expected, monkeypatch):
    monkeypatch.setattr(selector, "triton_available", lambda: has_triton)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert selector.attention_backend(device) == expected
    line = selector.describe_attention_backend(device)
    if expected == selector.PORTABLE:
        reason = {"6.2": "NVIDIA CUDA only"}.get(hip, "not installed" if device == "cuda" else "no paged kernels")
        assert line.startswith("portable attention") and reason in line
    elif expected == selector.TRITON:
        assert line.startswith("Triton paged attention")


def test_triton_is_importable_here():
    """The test extras install triton; without it the kernel tests would not run."""
    assert selector.triton_available()


def _forward_steps(model, block_size, steps):
    """Run `steps` (lists of (context_len, token ids) per request, block ids fixed per request)
    through `model` on fresh caches; the logits of each step's last row per request."""
    caches = allocate_kv_caches(model.num_layers, 32, block_size, model.num_kv_heads, model.head_dim, torch.float32, "cpu")
    blocks = {0: [7, 2, 9, 4, 11], 1: [3, 12, 5]}
    out = []
    for step in steps:
        chunks = [SequenceChunk(ctx, len(ids), blocks[r]) for r, (ctx, ids) in step.items()]
        context = build_forward_context(chunks, block_size, "cpu", caches)
        ids = torch.tensor([t for _, token_ids in step.values() for t in token_ids])
        positions = torch.tensor([p for ctx, token_ids in step.values() for p in range(ctx, ctx + len(token_ids))])
        with torch.inference_mode():
            hidden = model(ids, positions, context)
        ends = torch.tensor([len(token_ids) for _, token_ids in step.values()]).cumsum(0) - 1
        out.append(model.compute_logits(hidden[ends]).float())
    return out


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])  # sliding windows; head_dim 24 (mistral)
def test_a_model_with_triton_attention_computes_what_the_portable_one_does(arch, tmp_path, monkeypatch):
    model_dir = make_tiny_model(tmp_path / arch, arch)
    portable = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    triton_model = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    monkeypatch.setattr(selector, "attention_backend", lambda device: selector.TRITON)
    assert selector.use_device_attention(triton_model, "cuda") == portable.num_layers
    assert not any(type(m) is Attention for m in triton_model.modules())
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 500, (30,), generator=gen).tolist()
    other = torch.randint(3, 500, (9,), generator=gen).tolist()
    # A prompt chunk, then its rest with another request's prompt, then decodes and a verification.
    steps = [
        {0: (0, prompt[:20])},
        {0: (20, prompt[20:27]), 1: (0, other)},
        {0: (27, prompt[27:28]), 1: (9, [5])},
        {0: (28, prompt[28:30]), 1: (10, [6, 7, 8])},
    ]
    for got, expected in zip(_forward_steps(triton_model, 8, steps), _forward_steps(portable, 8, steps)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
