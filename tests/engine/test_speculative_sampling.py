"""Sampling with speculation keeps the target's distribution, end to end.

A model with a 16-token vocabulary samples (temperature 1) the first three tokens after a fixed
prompt, in thousands of independently seeded requests, with and without a draft that disagrees with
the target often. The exact distributions of tokens 1 and 2 (token 0 is sampled before any draft)
are computed from transformers' forward passes; each histogram must fit them by a chi-square test
(p-value > 1e-3; small bins pooled, see tests/stats.py).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helix_server import LLM, SamplingParams
from tests.fixtures.tiny_models import make_tiny_model
from tests.stats import chi_square_pvalue

VOCAB = 16
PROMPT = [3, 9, 4, 12, 5]
NUM_REQUESTS = 3000
P_VALUE_BOUND = 1e-3


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory, tokenizer_dir):
    target = tmp_path_factory.mktemp("small-vocab-target")
    # Small weights: a flat-ish distribution, so every token shows up often.
    make_tiny_model(target, "llama", vocab_size=VOCAB, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    tensors = load_file(target / "model.safetensors")
    save_file({k: v * 0.5 for k, v in tensors.items()}, target / "model.safetensors", metadata={"format": "pt"})
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, target / item.name)
    draft = tmp_path_factory.mktemp("small-vocab-draft")
    for item in target.iterdir():
        shutil.copy(item, draft / item.name)
    generator = torch.Generator().manual_seed(1)
    tensors = load_file(target / "model.safetensors")
    noisy = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    save_file(noisy, draft / "model.safetensors", metadata={"format": "pt"})
    return target, draft


def _exact_distributions(target) -> tuple[list[float], list[float]]:
    """P(token 1) and P(token 2) after PROMPT (marginalising over the tokens before them)."""
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64).eval()
    with torch.no_grad():
        def next_probs(tokens: list[int]) -> torch.Tensor:
            return torch.softmax(model(torch.tensor([tokens])).logits[0, -1].double(), -1)

        p0 = next_probs(PROMPT)
        p1 = torch.zeros(VOCAB, dtype=torch.float64)
        p2 = torch.zeros(VOCAB, dtype=torch.float64)
        for a in range(VOCAB):
            after_a = next_probs(PROMPT + [a])
            p1 += p0[a] * after_a
            for b in range(VOCAB):
                p2 += p0[a] * after_a[b] * next_probs(PROMPT + [a, b])
    return p1.tolist(), p2.tolist()


def _histograms(llm: LLM) -> tuple[list[int], list[int], object]:
    params = [
        SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=seed) for seed in range(NUM_REQUESTS)
    ]
    outputs = llm.generate([PROMPT] * NUM_REQUESTS, params)
    first = [0] * VOCAB
    second = [0] * VOCAB
    for output in outputs:
        tokens = output.outputs[0].token_ids
        assert len(tokens) == 3
        first[tokens[1]] += 1
        second[tokens[2]] += 1
    return first, second, llm.engine.stats()


@pytest.mark.parametrize("speculative", [False, True])
def test_sampled_tokens_follow_the_target_distribution(model_pair, speculative):
    target, draft = model_pair
    settings = {"draft_model": str(draft), "num_speculative_tokens": 2} if speculative else {}
    llm = LLM(model=str(target), dtype="float32", num_kv_blocks=2048, max_num_seqs=256, **settings)
    first, second, stats = _histograms(llm)
    p1, p2 = _exact_distributions(target)
    assert chi_square_pvalue([(first, p1)]) > P_VALUE_BOUND
    assert chi_square_pvalue([(second, p2)]) > P_VALUE_BOUND
    if speculative:
        # Both paths of the rejection sampler were taken many times.
        accepted, drafted = stats.spec_num_accepted_tokens_total, stats.spec_num_draft_tokens_total
        assert 0.2 * drafted < accepted < 0.9 * drafted
