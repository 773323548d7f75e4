"""Prefix caching through the whole engine: greedy outputs are token-identical whether a prefix came
from the cache or was computed (shared system prompts, multi-turn chats, n > 1, preemption, every
speculative proposer), `num_cached_tokens` reports the hits, `cache_salt` separates tenants, and a
hash function that collides never makes a request use another prefix's KV."""

from __future__ import annotations

import random
import struct

import pytest

from helix_server import LLM, SamplingParams
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings

BLOCK = 8
RNG = random.Random(11)
SYSTEM = [RNG.randrange(3, 500) for _ in range(45)]
QUESTIONS = [[RNG.randrange(3, 500) for _ in range(RNG.randint(2, 9))] for _ in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _llm(model_dir, caching: bool, **settings) -> LLM:
    settings.setdefault("num_kv_blocks", 128)
    return LLM(
        model=str(model_dir), dtype="float32", block_size=BLOCK, enable_prefix_caching=caching, **settings
    )


def _one_by_one(llm: LLM, prompts, params=GREEDY):
    """Each prompt alone, in order (so later ones can hit what earlier ones cached)."""
    return [llm.generate([p], params)[0] for p in prompts]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy outputs with prefix caching off."""
    llm = _llm(tiny_model_dir, caching=False)
    prompts = [SYSTEM + q for q in QUESTIONS]
    return prompts, [out.outputs[0].token_ids for out in _one_by_one(llm, prompts)]


def test_shared_system_prompt_hits_and_gives_identical_tokens(tiny_model_dir, reference):
    prompts, expected = reference
    llm = _llm(tiny_model_dir, caching=True)
    outputs = _one_by_one(llm, prompts)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert outputs[0].num_cached_tokens == 0
    for prompt, out in zip(prompts[1:], outputs[1:]):
        # Every full block of the shared system prompt, never the block of the last prompt token.
        assert out.num_cached_tokens == (len(SYSTEM) // BLOCK) * BLOCK
        assert out.num_cached_tokens < len(prompt)
    stats = llm.engine.stats()
    assert stats.prefix_cache_queries_total == sum(len(p) for p in prompts)
    assert stats.prefix_cache_hits_total == sum(o.num_cached_tokens for o in outputs)
    # The same prompt again: every full block before its last token.
    again = llm.generate([prompts[2]], GREEDY)[0]
    assert again.outputs[0].token_ids == expected[2]
    assert again.num_cached_tokens == ((len(prompts[2]) - 1) // BLOCK) * BLOCK


def test_multi_turn_chat_reuses_the_previous_turn_with_identical_tokens(tiny_model_dir):
    turns = [[5, 6, 7, 8, 9] * 3, [40, 41, 42], [77, 78, 79, 80, 81, 82]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = _llm(tiny_model_dir, caching=caching)
        history, answers, cached = [], [], []
        for user in turns:
            history = history + user
            out = llm.generate([history], params)[0]
            answers.append(out.outputs[0].token_ids)
            cached.append(out.num_cached_tokens)
            history = history + out.outputs[0].token_ids  # the answer joins the conversation
        results[caching] = (answers, cached)
    assert results[True][0] == results[False][0]
    assert results[False][1] == [0, 0, 0]
    # Each later turn finds the earlier turns, answers included (decode blocks are cached too).
    assert results[True][1][0] == 0 and results[True][1][1] >= 24 and results[True][1][2] >= 40


def test_concurrent_requests_with_preemption_and_n(tiny_model_dir, reference):
    prompts, expected = reference
    # A pool too small for all of them at once: preemption by recompute, hits on freed blocks.
    llm = _llm(tiny_model_dir, caching=True, num_kv_blocks=20, max_num_batched_tokens=64)
    outputs = llm.generate(prompts + prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected + expected
    assert llm.engine.stats().num_preemptions_total > 0
    assert llm.engine.stats().prefix_cache_hits_total > 0
    n_out = llm.generate([prompts[0]], SamplingParams(temperature=0, n=3, max_tokens=10, ignore_eos=True))[0]
    assert [s.token_ids for s in n_out.outputs] == [expected[0]] * 3
    scheduler = llm.engine.scheduler
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    scheduler.kv_cache_manager.check_invariants()


@pytest.mark.parametrize("method", ["draft", "ngram", "layer-skip"])
def test_identical_tokens_with_speculation(make_model_dir, method):
    target = make_model_dir("llama", num_hidden_layers=4)
    settings = {"speculative_method": method, "num_speculative_tokens": 3}
    if method == "draft":
        settings["draft_model"] = str(target)
    if method == "layer-skip":
        settings["draft_layers"] = 2
    prompts = [SYSTEM + q for q in QUESTIONS[:4]]
    expected = [o.outputs[0].token_ids for o in _one_by_one(_llm(target, caching=False), prompts)]
    llm = _llm(target, caching=True, **settings)
    outputs = _one_by_one(llm, prompts) + llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected + expected
    assert all(o.num_cached_tokens > 0 for o in outputs[1:])
    assert llm.engine.stats().spec_num_draft_tokens_total > 0


def test_cache_salt_separates_prefixes(tiny_model_dir, reference):
    prompts, expected = reference
    engine = EngineCore(
        engine_config_from_settings(str(tiny_model_dir), dtype="float32", block_size=BLOCK, num_kv_blocks=128)
    )

    def run(request_id, prompt, salt):
        engine.add_request(request_id, prompt, GREEDY, cache_salt=salt)
        tokens, cached = [], None
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens += output.outputs[0].token_ids
                cached = output.num_cached_tokens
        return tokens, cached

    assert run("a", prompts[0], "tenant-1") == (expected[0], 0)
    assert run("b", prompts[1], "tenant-2") == (expected[1], 0)  # another salt: no hit
    assert run("c", prompts[2], None) == (expected[2], 0)  # no salt: no hit either
    assert run("d", prompts[3], "tenant-1") == (expected[3], (len(SYSTEM) // BLOCK) * BLOCK)


def _tokens_only(data: bytes) -> bytes:
    """A hash that ignores the parent: equal token blocks under different prefixes collide."""
    (parent_len,) = struct.unpack_from("<I", data)
    return data[4 + parent_len :]


@pytest.mark.parametrize(
    ("hash_fn", "cached"),
    [(_tokens_only, [0, 0, BLOCK, 5 * BLOCK]), (lambda data: b"same", [0, 0, 0, BLOCK])],
    ids=["ignores-parent", "constant"],
)
def test_a_colliding_hash_never_shares_wrong_kv(tiny_model_dir, hash_fn, cached):
    # X + S and Y + S: with a hash that ignores the parent, S's blocks under Y have the same digest
    # as under X. The third request finds Y, then must not take S computed after X.
    x, y, tail = [100] * BLOCK, [200] * BLOCK, SYSTEM[8:40]
    prompts = [x + tail + QUESTIONS[0], y + tail + QUESTIONS[1], y + tail + QUESTIONS[2], x + tail + QUESTIONS[3]]
    expected = [o.outputs[0].token_ids for o in _one_by_one(_llm(tiny_model_dir, caching=False), prompts)]
    llm = _llm(tiny_model_dir, caching=True)
    llm.engine.scheduler.kv_cache_manager.prefix_cache.hash_fn = hash_fn
    outputs = _one_by_one(llm, prompts)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert [o.num_cached_tokens for o in outputs] == cached
    llm.engine.scheduler.kv_cache_manager.check_invariants()


def test_prompt_logprobs_requests_compute_every_position(tiny_model_dir, reference):
    prompts, _ = reference
    llm = _llm(tiny_model_dir, caching=True)
    llm.generate([prompts[0]], GREEDY)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    out = llm.generate([prompts[1]], params)[0]
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(prompts[1]) and all(lp is not None for lp in out.prompt_logprobs[1:])
