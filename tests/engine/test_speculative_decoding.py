"""Speculative decoding through the whole engine: lossless for greedy decoding (token-identical to
decoding without speculation, for every proposer and depth, with batching, preemption and both block
sizes), the target's distribution for sampling, every block freed, and the counters add up."""

from __future__ import annotations

import random

import pytest

from helix_server import LLM, SamplingParams
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from tests.fixtures.tiny_models import noisy_copy

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def target_dir(make_model_dir):
    return make_model_dir("llama", num_hidden_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def draft_dir(target_dir, tmp_path_factory):
    """A draft that agrees with the target often but not always: the target's weights plus noise."""
    return noisy_copy(target_dir, tmp_path_factory.mktemp("noisy-draft"), seed=5)


def _workload(seed: int, num: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts, params = [], []
    for _ in range(num):
        # Repeated chunks give prompt lookup (n-gram) something to find.
        chunk = [rng.randrange(3, 500) for _ in range(rng.randint(2, 12))]
        prompts.append((chunk * rng.randint(1, 4))[:60])
        params.append(SamplingParams(temperature=0, max_tokens=rng.randint(5, 30), ignore_eos=True))
    return prompts, params


def _speculative_settings(method: str, depth, draft_dir) -> dict:
    settings = {"speculative_method": method, "num_speculative_tokens": depth}
    if method == "draft":
        settings["draft_model"] = str(draft_dir)
    if method == "layer-skip":
        settings["draft_layers"] = 2
    return settings


@pytest.fixture(scope="module")
def reference(target_dir):
    """Greedy outputs without speculation: one request at a time, big pool."""
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=512)
    prompts, params = _workload(seed=3, num=16)
    return prompts, params, [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts, params)]


@pytest.mark.parametrize("method", ["draft", "ngram", "layer-skip"])
@pytest.mark.parametrize("depth", [1, 3, 5])
@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_is_token_identical_with_speculation(target_dir, draft_dir, reference, method, depth, block_size):
    prompts, params, expected = reference
    settings = _speculative_settings(method, depth, draft_dir)
    # Alone, with plenty of room.
    llm = LLM(model=str(target_dir), dtype="float32", block_size=block_size, num_kv_blocks=512, **settings)
    for prompt, sp, want in list(zip(prompts, params, expected))[:3]:
        assert llm.generate([prompt], sp)[0].outputs[0].token_ids == want
    # 16 at once on a pool far too small for them: preemption by recompute, chunked prefill.
    small = LLM(
        model=str(target_dir),
        dtype="float32",
        block_size=block_size,
        num_kv_blocks=160 // block_size,
        max_num_batched_tokens=48,
        **settings,
    )
    got = [r.outputs[0].token_ids for r in small.generate(prompts, params)]
    assert got == expected
    engine = small.engine
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_total_blocks
    stats = engine.stats()
    assert stats.spec_num_draft_tokens_total > 0
    assert 0 <= stats.spec_num_accepted_tokens_total <= stats.spec_num_draft_tokens_total
    assert sum(stats.spec_accepted_tokens_per_position_total.values()) == stats.spec_num_accepted_tokens_total
    assert max(stats.spec_accepted_tokens_per_position_total, default=0) < depth


def test_drafts_are_accepted_when_the_proposer_is_good(target_dir, draft_dir, reference):
    prompts, params, expected = reference
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=512, draft_model=str(draft_dir), num_speculative_tokens=3)
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == expected
    stats = llm.engine.stats()
    assert stats.spec_num_accepted_tokens_total / stats.spec_num_draft_tokens_total > 0.5
    # With acceptance that high, each verification yields more than one token on average.
    generated = sum(len(t) for t in expected)
    assert stats.spec_num_drafts_total < generated - len(expected)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_auto_depth_stays_lossless(target_dir, draft_dir, reference, method):
    prompts, params, expected = reference
    settings = _speculative_settings(method, "auto", draft_dir)
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=512, **settings)
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == expected
    stats = llm.engine.stats()
    if method == "ngram":  # free to propose: auto keeps drafting where prompts repeat
        assert stats.spec_num_draft_tokens_total > 0
    assert llm.engine.scheduler.num_free_blocks == llm.engine.scheduler.num_total_blocks


def test_n_stop_strings_and_max_tokens_mid_draft(target_dir, draft_dir):
    prompt = [7, 8, 9, 10, 7, 8, 9, 10, 7, 8]
    plain = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=256)
    spec = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=256, draft_model=str(draft_dir), num_speculative_tokens=5)
    full = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    stop = full.text[12:15]
    for sp in (
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),  # cut off inside the first draft
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=3),
    ):
        want = plain.generate([prompt], sp)[0]
        got = spec.generate([prompt], sp)[0]
        for a, b in zip(got.outputs, want.outputs):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert all(len(o.token_ids) <= sp.max_tokens for o in got.outputs)
    assert spec.engine.scheduler.num_free_blocks == spec.engine.scheduler.num_total_blocks


def test_speculation_depth_per_request(target_dir, draft_dir):
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=256, draft_model=str(draft_dir), num_speculative_tokens=4)
    prompt = [11, 12, 13, 14, 15]
    off = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, speculation_depth=0))[0]
    assert llm.engine.stats().spec_num_draft_tokens_total == 0
    assert off.metrics.acceptance_rate is None
    on = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, speculation_depth=2))[0]
    assert on.outputs[0].token_ids == off.outputs[0].token_ids
    stats = llm.engine.stats()
    assert stats.spec_num_draft_tokens_total > 0
    assert max(stats.spec_accepted_tokens_per_position_total, default=0) < 2  # never deeper than asked
    assert on.metrics.num_draft_tokens == stats.spec_num_draft_tokens_total
    assert on.metrics.acceptance_rate == stats.spec_num_accepted_tokens_total / stats.spec_num_draft_tokens_total


def test_the_depth_policy_sees_what_a_draft_model_must_catch_up_on(target_dir, draft_dir):
    """A draft model that has never drafted for a request must first read all of it; once it
    drafts every step, only the newest token or two."""
    config = engine_config_from_settings(
        str(target_dir), dtype="float32", num_kv_blocks=256, draft_model=str(draft_dir), num_speculative_tokens=2
    )
    engine = EngineCore(config)
    engine.add_request("a", list(range(10, 40)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    no_drafts = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, speculation_depth=0)
    engine.add_request("b", list(range(50, 70)), no_drafts)
    engine.step()  # prefill both, sample one token each, draft for "a" only
    running = {r.request_id: r for r in engine.scheduler.running}
    backlogs = engine.runner.proposal_backlogs(list(running.values()))
    assert backlogs["b"] == running["b"].num_tokens == 21  # never drafted for: its whole sequence
    assert backlogs["a"] == 1  # the sampled token the drafter has not read yet
    engine.step()
    assert 1 <= engine.runner.proposal_backlogs([running["a"]])["a"] <= 2  # new token (+ a rejected draft's slot)
