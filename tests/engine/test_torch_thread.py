"""The server's torch work happens on one thread: the model loads on the thread that runs the steps
(OpenMP's worker pools are per thread; a second pool makes every kernel wait for a wake-up)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from helix_server import SamplingParams
from helix_server.engine import core as engine_core_module
from helix_server.engine.async_engine import AsyncEngine
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from helix_server.engine.torch_thread import TorchThread


def test_jobs_run_in_order_on_one_thread_and_exceptions_reach_the_caller():
    worker = TorchThread("test-torch")
    seen: list[tuple[int, int]] = []
    futures = [worker.submit(lambda i=i: seen.append((i, threading.get_ident())) or i) for i in range(5)]
    assert [f.result(timeout=10) for f in futures] == list(range(5))
    assert [i for i, _ in seen] == list(range(5))
    assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        worker.submit(fail).result(timeout=10)
    assert worker.submit(lambda: 7).result(timeout=10) == 7  # still serving after a failed job
    worker.close(timeout=10)
    assert not worker.is_alive()


def test_the_engine_steps_on_the_thread_that_loaded_its_model(tiny_model_dir, monkeypatch):
    loaded_on: list[int] = []
    stepped_on: set[int] = set()
    load_model = engine_core_module.load_model
    step = EngineCore.step

    def recording_load(*args, **kwargs):
        loaded_on.append(threading.get_ident())
        return load_model(*args, **kwargs)

    def recording_step(self):
        stepped_on.add(threading.get_ident())
        return step(self)

    monkeypatch.setattr(engine_core_module, "load_model", recording_load)
    monkeypatch.setattr(EngineCore, "step", recording_step)
    config = engine_config_from_settings(str(tiny_model_dir), dtype="float32", num_kv_blocks=64)
    engine = AsyncEngine.from_config(config)

    async def main() -> list[int]:
        engine.start()
        try:
            stream = await engine.add_request("def f(x):", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
            tokens = []
            async for output in stream:
                tokens += output.outputs[0].token_ids
            return tokens
        finally:
            engine.shutdown()

    assert len(asyncio.run(main())) == 5
    assert len(loaded_on) == 1 and loaded_on[0] != threading.get_ident()
    assert stepped_on == set(loaded_on)
    assert not engine.is_alive


def test_a_failed_load_raises_in_the_caller(tmp_path):
    config = engine_config_from_settings(str(tmp_path / "missing"), dtype="float32")
    with pytest.raises(Exception, match="missing"):
        AsyncEngine.from_config(config)

