"""Admission control and time limits: queue bounds (n counts as n), requests dropped after waiting
too long to be scheduled, and requests ended at the wall-clock cap with what they have."""

from __future__ import annotations

import asyncio
import time

import pytest

from helix_server import SamplingParams
from helix_server.config import SchedulerConfig
from helix_server.engine.admission import QueuedRequests, check_admission
from helix_server.engine.async_engine import AsyncEngine
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from helix_server.errors import EngineOverloadedError

PROMPT = [17, 301, 45, 99, 260, 12, 7, 480, 33]


def _engine(model_dir, **settings) -> EngineCore:
    settings = {"dtype": "float32", "num_kv_blocks": 64, "block_size": 8, **settings}
    return EngineCore(engine_config_from_settings(str(model_dir), **settings))


def _greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, n=n, ignore_eos=True)


def test_queue_bounds_count_sequences_and_prompt_tokens():
    limits = SchedulerConfig(max_queued_requests=4, max_queued_tokens=100)
    check_admission(limits, 0, 0, num_sequences=16, num_prompt_tokens=1000)  # nothing waits: always in
    check_admission(limits, 2, 50, num_sequences=2, num_prompt_tokens=50)
    with pytest.raises(EngineOverloadedError) as info:
        check_admission(limits, 2, 10, num_sequences=3, num_prompt_tokens=1)  # n = 3 counts as 3
    assert info.value.code == "queue_full" and info.value.retry_after >= 1
    with pytest.raises(EngineOverloadedError):
        check_admission(limits, 1, 90, num_sequences=1, num_prompt_tokens=11)
    check_admission(SchedulerConfig(max_queued_requests=None), 10_000, 10**9, 16, 10**6)


def test_queued_requests_bookkeeping():
    queued = QueuedRequests()
    queued.add("a", 1.0, 2, 10)
    queued.add("b", 5.0, 1, 7)
    assert (len(queued), queued.num_sequences, queued.num_prompt_tokens) == (2, 3, 17)
    assert queued.arrived_before(3.0) == ["a"]
    queued.discard("a")
    queued.discard("a")  # twice: harmless
    assert ("a" in queued, queued.num_sequences, queued.num_prompt_tokens) == (False, 1, 7)


def test_a_request_queued_too_long_is_dropped_and_frees_everything(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_queue_wait=5.0, max_num_seqs=1)
    engine.add_request("running", PROMPT, _greedy(30))
    engine.step()  # scheduled: it has left the queue and is never dropped for waiting
    engine.output_processor.requests["running"].metrics.arrival_time -= 100
    engine.add_request("late", PROMPT + [1], _greedy(5, n=2), arrival_time=time.monotonic() - 10)
    assert engine.queued.num_sequences == 2
    outputs = {o.request_id: o for o in engine.step()}
    late = outputs["late"]
    assert late.finished and late.error_code == "queue_timeout" and "waited" in late.error
    assert [s.finish_reason for s in late.outputs] == ["abort", "abort"]
    assert engine.queued.num_sequences == 0 and engine.scheduler.get_request("late#0") is None
    assert engine.stats().num_requests_rejected_total == {"queue_timeout": 1}
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_total_blocks


def test_request_timeout_ends_a_request_with_what_it_has(tiny_model_dir):
    engine = _engine(tiny_model_dir, request_timeout=30.0, max_num_seqs=1)
    engine.add_request("slow", PROMPT, _greedy(100))
    engine.add_request("queued", PROMPT, _greedy(100))
    tokens = []
    for _ in range(4):
        for output in engine.step():
            tokens += output.outputs[0].token_ids
    assert 0 < len(tokens) < 100
    for state in engine.output_processor.requests.values():
        state.metrics.arrival_time -= 31  # both are past the cap now
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["slow"].finished and outputs["slow"].outputs[0].finish_reason == "length"
    assert outputs["queued"].finished and outputs["queued"].outputs[0].finish_reason == "length"
    assert outputs["queued"].outputs[0].token_ids == [] and outputs["queued"].error_code is None
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_total_blocks


def test_async_engine_refuses_past_the_bound_and_surfaces_queue_timeouts(make_model_dir):
    model_dir = make_model_dir("llama", max_position_embeddings=4096)

    async def scenario():
        engine = AsyncEngine(
            _engine(model_dir, max_num_seqs=1, max_queued_requests=2, max_queue_wait=0.5, num_kv_blocks=512)
        )
        engine.start()
        try:
            hog = await engine.add_request(PROMPT, _greedy(3000))
            hog_iter = hog.__aiter__()
            await hog_iter.__anext__()  # running: the only seat is taken
            waiting = await engine.add_request(PROMPT, _greedy(4))
            with pytest.raises(EngineOverloadedError):
                await engine.add_request(PROMPT, _greedy(4, n=2))  # 1 waiting + 2 > 2
            started = time.monotonic()
            with pytest.raises(EngineOverloadedError) as info:
                async for _ in waiting:
                    pass
            assert info.value.code == "queue_timeout" and time.monotonic() - started < 5
            assert engine.stats().num_requests_rejected_total == {"queue_full": 1, "queue_timeout": 1}
            await hog_iter.aclose()
            deadline = time.monotonic() + 10
            while engine.stats().num_kv_blocks_free != engine.stats().num_kv_blocks_total:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        finally:
            engine.shutdown()

    asyncio.run(scenario())
