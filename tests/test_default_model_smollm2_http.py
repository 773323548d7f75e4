"""`helix-server serve` with no `--model`: SmolLM2-135M-Instruct answers a question through the
OpenAI SDK (the newcomer's first request after `make run`)."""

from __future__ import annotations

import openai
import pytest

from helix_server.default_model import SMOLLM2_SERVED_MODEL_NAME
from tests.fixtures.serve_process import serve_process


@pytest.mark.slow
def test_the_default_model_answers_the_capital_of_france():
    with serve_process("--max-model-len", "512", "--num-kv-blocks", "64", "--log-level", "warning") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        models = [m.id for m in client.models.list().data]
        assert models == [SMOLLM2_SERVED_MODEL_NAME]
        chat = client.chat.completions.create(
            model=models[0],
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in chat.choices[0].message.content, chat.choices[0].message.content
