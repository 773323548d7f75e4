"""Decode and verification steps through the CUDA-graph runner's padded path, in the whole engine on
the CPU (the Triton backend under Triton's interpreter, the padded step run eagerly as a graph would
replay it): greedy decoding, and greedy with a draft model, give the tokens of plain greedy decoding
on the portable path."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its own jit functions read it then
pytest.importorskip("triton")

from helix_server import LLM, SamplingParams
from helix_server.layers.attention.triton_backend import use_triton_attention
from helix_server.runner.cuda_graphs import CudaGraphRunner
from tests.fixtures.tiny_models import noisy_copy


def _through_graph_runner(llm: LLM) -> list[list[int]]:
    """Swap the engine's model to the Triton backend and give its runner a graph runner (eager on
    the CPU); returns the token counts of the chunks of every step it ran."""
    runner = llm.engine.runner
    assert use_triton_attention(runner.model) > 0
    graphs = CudaGraphRunner(runner.model, runner.kv_caches, runner.block_size, 32, 256, torch.device("cpu"))
    steps: list[list[int]] = []
    run = graphs.run

    def counted(chunks, input_ids, positions):
        steps.append([c.num_new_tokens for c in chunks])
        return run(chunks, input_ids, positions)

    graphs.run = counted
    runner.graphs = graphs
    return steps


def test_graph_steps_keep_greedy_speculation_token_identical(make_model_dir, tmp_path):
    target = make_model_dir("llama", num_hidden_layers=2)
    draft = noisy_copy(target, tmp_path / "draft", seed=5)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = LLM(model=str(target), dtype="float32", device="cpu", num_kv_blocks=64, cpu_kernels=False)
    expected = [r.outputs[0].token_ids for r in plain.generate(prompts, params)]

    graphed = LLM(model=str(target), dtype="float32", device="cpu", num_kv_blocks=64, cpu_kernels=False)
    decode_steps = _through_graph_runner(graphed)
    assert [r.outputs[0].token_ids for r in graphed.generate(prompts, params)] == expected
    assert any(set(step) == {1} for step in decode_steps), "no decode step went through the graph runner"

    spec = LLM(
        model=str(target), draft_model=str(draft), num_speculative_tokens=3, dtype="float32", device="cpu",
        num_kv_blocks=64, cpu_kernels=False,
    )
    verify_steps = _through_graph_runner(spec)
    assert [r.outputs[0].token_ids for r in spec.generate(prompts, params)] == expected
    assert any(max(step) > 1 for step in verify_steps), "no verification step went through the graph runner"
    assert spec.engine.stats().spec_num_accepted_tokens_total > 0
