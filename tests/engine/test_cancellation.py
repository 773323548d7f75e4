"""Aborts in every phase of a request's life, with prefix caching and speculation on: each abort
drops exactly one reference from each block the request's sequences held (no more: blocks shared
with others stay theirs), the others finish with their solo output, and the pool ends idle."""

from __future__ import annotations

from collections import Counter

import pytest

from helix_server import SamplingParams
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings

SHARED = [17, 301, 45, 99, 260, 12, 7, 480, 33, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160]
VICTIM = SHARED + [9, 8, 7, 6, 5, 4, 3]
BYSTANDER = SHARED + [40, 41, 42]
PHASES = ["queued", "mid_prefill", "decoding", "final_step", "verifying_drafts", "n_sequences", "preempted"]


def _engine(model_dir, **settings) -> EngineCore:
    settings = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 64, **settings}
    return EngineCore(engine_config_from_settings(str(model_dir), **settings))


def _greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, n=n, ignore_eos=True)


def _step(engine: EngineCore, tokens: dict[str, list[int]]) -> None:
    """One engine step, keeping every request's first-sequence tokens."""
    for output in engine.step():
        for seq in output.outputs:
            if seq.index == 0:
                tokens.setdefault(output.request_id, []).extend(seq.token_ids)


def _drain(engine: EngineCore, tokens: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    tokens = {} if tokens is None else tokens
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return tokens
        _step(engine, tokens)
    raise AssertionError("engine did not finish")


def _sequences(engine: EngineCore, request_id: str) -> list[str]:
    return [rid for rid in engine.scheduler.requests if rid == request_id or rid.startswith(request_id + "#")]


def _step_until(engine: EngineCore, tokens: dict[str, list[int]], predicate, limit: int = 200) -> None:
    for _ in range(limit):
        if predicate():
            return
        _step(engine, tokens)
    raise AssertionError("phase not reached")


@pytest.fixture(scope="module")
def solo(make_model_dir):
    """The bystander's greedy output alone."""
    target = make_model_dir("llama", num_hidden_layers=4)
    engine = _engine(target, enable_prefix_caching=False)
    engine.add_request("b", BYSTANDER, _greedy(12))
    return target, _drain(engine)["b"]


@pytest.mark.parametrize("phase", PHASES)
def test_abort_releases_exactly_what_the_request_held(solo, phase):
    target, bystander_tokens = solo
    settings = {}
    if phase == "verifying_drafts":
        settings = {"draft_model": str(target), "num_speculative_tokens": 3}
    if phase == "preempted":
        settings = {"num_kv_blocks": 16}
    engine = _engine(target, max_num_batched_tokens=8, max_num_seqs=2 if phase == "queued" else 8, **settings)
    scheduler = engine.scheduler
    kv = scheduler.kv_cache_manager
    engine.add_request("bystander", BYSTANDER, _greedy(12))
    if phase == "queued":
        engine.add_request("other", SHARED + [1, 2], _greedy(30))  # takes the second seat
    if phase == "preempted":
        engine.add_request("hog", [7] * 30, _greedy(8))  # older than the victim: it grows, the victim goes
    n = 3 if phase == "n_sequences" else 1
    max_tokens = {"final_step": 6, "preempted": 20}.get(phase, 40)
    engine.add_request("victim", VICTIM, _greedy(max_tokens, n=n))

    tokens: dict[str, list[int]] = {}
    victim = lambda: scheduler.get_request("victim" if n == 1 else "victim#0")  # noqa: E731
    if phase == "queued":
        _step_until(engine, tokens, lambda: scheduler.get_request("bystander").num_output_tokens >= 2)
        assert victim().first_scheduled_time is None and "victim" in engine.queued
    elif phase == "mid_prefill":
        _step_until(engine, tokens, lambda: 0 < victim().num_computed_tokens < len(VICTIM))
    elif phase == "decoding":
        _step_until(engine, tokens, lambda: victim().num_output_tokens >= 3)
    elif phase == "verifying_drafts":
        _step_until(engine, tokens, lambda: victim().spec_token_ids and victim().num_output_tokens >= 2)
    elif phase == "n_sequences":
        _step_until(engine, tokens, lambda: all(kv.num_blocks_held(r) for r in _sequences(engine, "victim")))
    elif phase == "preempted":
        _step_until(engine, tokens, lambda: victim().num_preemptions > 0 and kv.num_blocks_held("victim") == 0)
    elif phase == "final_step":
        # Step until the victim's last token came out: it has finished and released its blocks.
        _step_until(engine, tokens, lambda: not _sequences(engine, "victim"))

    held = Counter(b for rid in _sequences(engine, "victim") for b in kv.get_block_ids(rid))
    before = {b.block_id: b.ref_cnt for b in kv.block_pool.blocks}
    final = engine.abort_request("victim")
    if phase == "final_step":
        assert final is None and not held  # already done: the abort changes nothing
    else:
        assert final is not None and final.finished and {s.finish_reason for s in final.outputs} == {"abort"}
        assert len(final.outputs) == n or phase != "n_sequences"
    for block in kv.block_pool.blocks:
        assert block.ref_cnt == before[block.block_id] - held[block.block_id], block
    assert not _sequences(engine, "victim") and "victim" not in engine.queued
    kv.check_invariants()

    outputs = _drain(engine, tokens)
    assert outputs["bystander"] == bystander_tokens
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    assert engine.queued.num_sequences == 0 and engine.queued.num_prompt_tokens == 0
    if phase == "verifying_drafts":
        engine.step()  # idle: nothing to run, but the runner hears who finished
        assert not engine.runner.speculator.proposer._written  # the drafter forgot the victim too
