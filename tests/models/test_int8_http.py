"""`--quantization int8` through a live server: the OpenAI SDK against the real app under uvicorn."""

from __future__ import annotations

import openai
import pytest

from helix_server import LLM, SamplingParams
from helix_server.layers.int8_linear import Int8Linear
from tests.api.conftest import MODEL_NAME, engine_idle, start_live_server, wait_until


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir("llama", hidden_size=128, intermediate_size=384)


def test_a_completion_over_http_is_the_offline_int8_models_greedy_text(model_dir):
    offline = LLM(model=str(model_dir), dtype="float32", quantization="int8", num_kv_blocks=256)
    expected = offline.generate("def main(", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    live = start_live_server(model_dir, quantization="int8")
    try:
        model = live.engine.core.runner.model
        assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear) and isinstance(model.lm_head, Int8Linear)
        client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=300)
        response = client.completions.create(
            model=MODEL_NAME, prompt="def main(", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        assert response.choices[0].text == expected.outputs[0].text and len(expected.outputs[0].text) > 0
        assert response.usage.completion_tokens == 16
        wait_until(lambda: engine_idle(live), what="engine idle, every KV block free")
    finally:
        live.stop()
