"""Requests are validated once and their ids checked once, by the front they enter through: the
async front on its event loop (the engine thread does not check again), `EngineCore.add_request`
for synchronous callers."""

from __future__ import annotations

import asyncio
import sys

import pytest

from helix_server import SamplingParams
from helix_server.engine.async_engine import AsyncEngine
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from helix_server.errors import ParameterError

PROMPT = [17, 301, 45, 99, 260, 12, 7, 480, 33]
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def _core(model_dir) -> EngineCore:
    return EngineCore(engine_config_from_settings(str(model_dir), dtype="float32", num_kv_blocks=64))


def _count_validations(monkeypatch) -> list[int]:
    """Counts calls of `validate_request` wherever an engine module holds it."""
    calls: list[int] = []
    for name, module in list(sys.modules.items()):
        if name.startswith("helix_server.engine") and hasattr(module, "validate_request"):
            real = module.validate_request

            def counted(*args, _real=real, **kwargs):
                calls.append(1)
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, "validate_request", counted)
    return calls


def test_the_async_front_validates_each_prompt_once(tiny_model_dir, monkeypatch):
    engine = AsyncEngine(_core(tiny_model_dir))
    calls = _count_validations(monkeypatch)

    async def main():
        engine.start()
        try:
            streams = await engine.add_requests([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=2), ["a", "b"])
            for stream in streams:
                async for _ in stream:
                    pass
        finally:
            engine.shutdown()

    asyncio.run(main())
    assert len(calls) == 2


def test_the_async_front_refuses_an_id_that_clashes_with_a_running_sequence(tiny_model_dir):
    engine = AsyncEngine(_core(tiny_model_dir))

    async def main():
        engine.start()
        try:
            running = await engine.add_request(PROMPT, SamplingParams(n=2, **_greedy_fields()), request_id="a")
            with pytest.raises(ParameterError) as info:  # "a#1" is the second sequence of "a"
                await engine.add_request(PROMPT, GREEDY, request_id="a#1")
            assert info.value.param == "request_id" and "clashes" in info.value.message
            with pytest.raises(ParameterError) as info:
                await engine.add_request(PROMPT, GREEDY, request_id="a")
            assert "already in use" in info.value.message
            async for _ in running:
                pass
        finally:
            engine.shutdown()

    asyncio.run(main())


def _greedy_fields() -> dict:
    return {"temperature": 0, "max_tokens": 30, "ignore_eos": True}


def test_the_core_refuses_clashing_ids_both_ways(tiny_model_dir):
    engine = _core(tiny_model_dir)
    engine.add_request("x", PROMPT, SamplingParams(n=2, **_greedy_fields()))
    engine.add_request("y#0", PROMPT, GREEDY)
    for request_id, n in (("x#0", 1), ("y", 2)):
        with pytest.raises(ParameterError) as info:
            engine.add_request(request_id, PROMPT, SamplingParams(n=n, **_greedy_fields()))
        assert "clashes" in info.value.message
    engine.add_request("x#2", PROMPT, GREEDY)  # "x" has sequences 0 and 1 only
    engine.add_request("x#01", PROMPT, GREEDY)  # not a sequence id
    assert sorted(engine.unfinished_request_ids()) == ["x", "x#01", "x#2", "y#0"]
