"""`helix-server serve --model helix-pycoder-tiny`: the shipped pair over HTTP completes Python.

A real server process (the command a user runs), greedy decoding. The Python check is also run on a
random-weight model with the same tokenizer, where it must fail: it tells trained output apart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from helix_server import LLM, SamplingParams
from helix_server.default_model import DEFAULT_SERVED_MODEL_NAME, default_target_dir
from tests.fixtures.python_text import looks_like_python
from tests.fixtures.serve_process import serve_process

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server_url():
    with serve_process("--model", DEFAULT_SERVED_MODEL_NAME, "--dtype", "float32", "--num-kv-blocks", "256",
                       "--log-level", "warning", ready_timeout=90) as url:
        yield url


def test_fibonacci_completion_over_http_looks_like_python(server_url: str) -> None:
    models = httpx.get(server_url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [DEFAULT_SERVED_MODEL_NAME]
    response = httpx.post(
        server_url + "/v1/completions",
        json={"model": DEFAULT_SERVED_MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    assert looks_like_python(PROMPT, text), text
    metrics = httpx.get(server_url + "/metrics", timeout=10).text
    drafted = [line for line in metrics.splitlines() if line.startswith("helix:spec_decode_num_draft_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) > 0  # served with the draft as proposer


def test_the_check_fails_on_random_weights(tmp_path: Path) -> None:
    """The same prompt on a seeded random Llama with the shipped tokenizer is not Python."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = default_target_dir()
    vocab = LlamaConfig.from_pretrained(target).vocab_size
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         initializer_range=0.1, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=None, architectures=["LlamaForCausalLM"])
    failures = 0
    for seed in range(2):
        torch.manual_seed(seed)
        out = tmp_path / f"random{seed}"
        LlamaForCausalLM(config).save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(target / name, out / name)
        llm = LLM(model=str(out), dtype="float32", num_kv_blocks=64)
        text = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0].text
        failures += not looks_like_python(PROMPT, text)
    assert failures == 2
