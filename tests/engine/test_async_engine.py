"""AsyncEngine: streams deltas from the background step thread, aborts abandoned requests within a
step, validates before queueing, and keeps serving after one request fails."""

from __future__ import annotations

import asyncio
import time

import pytest

from helix_server import LLM, SamplingParams
from helix_server.engine import async_engine as async_engine_module
from helix_server.engine.async_engine import AsyncEngine
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from helix_server.errors import EngineDeadError, ParameterError

PROMPT = "def fibonacci(n):\n    "


def _async_engine(model_dir, **settings) -> AsyncEngine:
    settings.setdefault("dtype", "float32")
    settings.setdefault("num_kv_blocks", 64)
    return AsyncEngine(EngineCore(engine_config_from_settings(str(model_dir), **settings)))


async def _collect(stream) -> tuple[str, list[int], str | None]:
    text, tokens, finish = "", [], None
    async for output in stream:
        for seq in output.outputs:
            text += seq.text
            tokens += seq.token_ids
            finish = seq.finish_reason or finish
    return text, tokens, finish


async def _wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_concurrent_streams_match_offline_generation(tiny_model_dir):
    prompts = [PROMPT, "import os\n", "class Foo:", "x = [1, 2, 3]\nfor"]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    offline = LLM(model=str(tiny_model_dir), dtype="float32", num_kv_blocks=64).generate(prompts, params)

    async def main():
        engine = _async_engine(tiny_model_dir)
        # One tokenizer for the event loop and the engine thread (a second would cost ~10 MiB).
        assert engine.tokenizer is engine.core.tokenizer
        engine.start()
        try:
            streams = [await engine.add_request(p, params) for p in prompts]
            return await asyncio.gather(*(_collect(s) for s in streams))
        finally:
            engine.shutdown()

    for (text, tokens, finish), expected in zip(asyncio.run(main()), offline):
        assert text == expected.outputs[0].text and tokens == expected.outputs[0].token_ids
        assert finish == "length"


def test_abandoned_stream_is_aborted_and_its_blocks_freed_within_a_step(tiny_model_dir):
    async def main():
        engine = _async_engine(tiny_model_dir)
        engine.start()
        scheduler = engine.core.scheduler
        try:
            stream = await engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
            async for output in stream:
                if output.outputs[0].token_ids:
                    assert scheduler.num_free_blocks < scheduler.num_total_blocks
                    break  # leaving the loop abandons the stream: the client went away mid-answer
            steps_at_abort = engine.num_steps
            await _wait_until(lambda: not engine.core.has_unfinished_requests())
            assert scheduler.num_free_blocks == scheduler.num_total_blocks
            assert engine.num_steps - steps_at_abort <= 2
            assert engine.core.scheduler.num_running == 0 and engine.core.scheduler.num_waiting == 0
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_bad_input_fails_before_queueing_and_engine_keeps_serving(tiny_model_dir):
    async def main():
        engine = _async_engine(tiny_model_dir)
        engine.start()
        try:
            with pytest.raises(ParameterError) as info:
                await engine.add_request("", SamplingParams())
            assert info.value.param == "prompt"
            with pytest.raises(ParameterError) as info:
                await engine.add_request([1, 2, 99999], SamplingParams())
            assert info.value.param == "prompt"
            with pytest.raises(ParameterError) as info:
                await engine.add_request(PROMPT, SamplingParams(max_tokens=10_000))
            assert info.value.code == "context_length_exceeded"
            assert not engine.has_unfinished_requests
            text, tokens, finish = await _collect(
                await engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
            )
            assert len(tokens) == 5 and finish == "length"
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_one_failing_request_does_not_stop_the_loop(tiny_model_dir):
    async def main():
        engine = _async_engine(tiny_model_dir)
        engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
            # Long enough that it cannot finish before its detokenizer is broken below.
            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            bad = await engine.add_request(PROMPT, long, request_id="bad")
            await _wait_until(lambda: "bad" in engine.core.output_processor.sequences)

            def explode(token_ids):
                raise ValueError("cannot detokenize")

            engine.core.output_processor.sequences["bad"].detokenizer.add_tokens = explode
            good = await engine.add_request("import os\n", params, request_id="good")
            bad_result, good_result = await asyncio.gather(_collect(bad), _collect(good))
            assert bad_result[2] == "error"
            assert good_result[2] == "length" and len(good_result[1]) == 10
            assert engine.is_alive
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_a_dead_engine_loop_fails_streams_with_engine_dead_error(tiny_model_dir):
    async def main():
        engine = _async_engine(tiny_model_dir)

        def broken_step():
            raise RuntimeError("scheduler invariant broken")

        engine.core.step = broken_step
        engine.start()
        try:
            stream = await engine.add_request(PROMPT, SamplingParams(max_tokens=5))
            with pytest.raises(EngineDeadError):
                await _collect(stream)
            assert not engine.is_alive
            with pytest.raises(EngineDeadError):
                await engine.add_request(PROMPT, SamplingParams(max_tokens=5))
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_freed_memory_goes_back_to_the_os_once_the_engine_runs_out_of_work(tiny_model_dir, monkeypatch):
    """On the CPU glibc keeps freed buffers between steps; after a burst, not for good."""
    busy_when_released: list[bool] = []
    config = engine_config_from_settings(str(tiny_model_dir), dtype="float32", num_kv_blocks=64)
    engine = AsyncEngine.from_config(config)
    assert engine.release_memory_when_idle
    monkeypatch.setattr(
        async_engine_module, "release_freed_memory",
        lambda: busy_when_released.append(engine.core.has_unfinished_requests()) or True,
    )

    async def main() -> None:
        engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            streams = [await engine.add_request(p, params) for p in ("def f(x):", "import os")]
            for stream in streams:
                async for _ in stream:
                    pass
        finally:
            engine.shutdown()

    asyncio.run(main())
    assert engine.num_steps >= 6
    assert busy_when_released and not any(busy_when_released)  # only when idle: not every step
    assert len(busy_when_released) <= 2
