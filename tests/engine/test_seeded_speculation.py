"""A seeded request reproduces its text whatever speculation does: off, any proposer, any depth,
`auto`, alone, batched, preempted (randomness keyed by (seed, position), see `sample.generators`)."""

from __future__ import annotations

import random

import pytest

from helix_server import LLM, SamplingParams
from tests.fixtures.tiny_models import noisy_copy


@pytest.fixture(scope="module")
def target_dir(make_model_dir):
    return make_model_dir("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def draft_dir(target_dir, tmp_path_factory):
    """The target's weights plus noise: a draft that agrees often but not always."""
    return noisy_copy(target_dir, tmp_path_factory.mktemp("seeded-draft"), seed=8)


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(11)
    prompts, params = [], []
    for index in range(8):
        chunk = [rng.randrange(3, 500) for _ in range(rng.randint(2, 8))]
        prompts.append((chunk * 4)[:40])  # repeats: the n-gram proposer finds something
        # temperature 0.7, top_k 50: peaked enough that drafts are accepted often
        params.append(SamplingParams(temperature=0.7, top_k=50, seed=100 + index % 3, max_tokens=24, ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def reference(target_dir):
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=256)
    prompts, params = _workload()
    return [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts, params)]


@pytest.mark.parametrize(
    "method,depth",
    [("draft", 1), ("draft", 4), ("draft", "auto"), ("ngram", 3), ("ngram", "auto"), ("layer-skip", 2)],
)
def test_a_seeded_request_gives_the_same_text_with_or_without_speculation(
    target_dir, draft_dir, reference, method, depth
):
    settings = {"speculative_method": method, "num_speculative_tokens": depth}
    if method == "draft":
        settings["draft_model"] = str(draft_dir)
    if method == "layer-skip":
        settings["draft_layers"] = 2
    prompts, params = _workload()
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=256, **settings)
    alone = [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts, params)]
    assert alone == reference
    together = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert together == reference
    stats = llm.engine.stats()
    if depth != "auto":  # auto may rightly stay off; a fixed depth must have drafted
        assert stats.spec_num_draft_tokens_total > 0
    if method == "draft" and depth != "auto":  # a close draft with the same noise: accepted often
        assert stats.spec_num_accepted_tokens_total > stats.spec_num_draft_tokens_total // 2
    # A pool too small for the batch: preemption by recompute and chunked prefill.
    small = LLM(
        model=str(target_dir), dtype="float32", num_kv_blocks=12, block_size=16, max_num_batched_tokens=48, **settings
    )
    assert [r.outputs[0].token_ids for r in small.generate(prompts, params)] == reference
    assert small.engine.scheduler.num_preemptions_total > 0
