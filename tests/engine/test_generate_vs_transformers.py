"""Greedy generation through the whole engine is token-identical to transformers' `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helix_server import LLM, SamplingParams

ARCHS = ["llama", "llama3_rope", "mistral", "qwen2", "qwen3", "llama_mha"]


def _prompts(num: int, seed: int, low: int = 3, high: int = 60) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (num,), generator=generator).tolist()
    return [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths]


def _hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_single_and_batched(make_model_dir, arch):
    model_dir = make_model_dir(arch)
    prompts = _prompts(5, seed=1)
    expected = _hf_greedy(model_dir, prompts, max_new_tokens=24)
    llm = LLM(model=str(model_dir), dtype="float32", block_size=8, num_kv_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    single = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert single == expected

    batched = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert batched == expected


def test_greedy_matches_transformers_with_chunked_prefill(make_model_dir):
    """A token budget smaller than the prompts forces every prompt through several chunks."""
    model_dir = make_model_dir("llama")
    prompts = _prompts(4, seed=2, low=40, high=120)
    expected = _hf_greedy(model_dir, prompts, max_new_tokens=16)
    llm = LLM(model=str(model_dir), dtype="float32", max_num_batched_tokens=24, num_kv_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == expected
