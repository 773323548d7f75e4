"""The embedded default model: builds offline, loads with transformers, is cached, is deterministic."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helix_server.default_model import builder, ensure_default_model
from helix_server.default_model.builder import DEFAULT_MODEL_NAME, MANIFEST_FILE, MODEL_SHAPE
from helix_server.engine.tokenizer import load_tokenizer

OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("helix-cache")


@pytest.fixture(scope="module")
def model_dir(cache_root: Path) -> Path:
    return ensure_default_model(cache_root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builds_a_complete_directory(model_dir: Path, cache_root: Path) -> None:
    assert model_dir == cache_root / DEFAULT_MODEL_NAME
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        MANIFEST_FILE,
    ):
        assert (model_dir / name).is_file(), name
    assert not list(cache_root.glob(f".{DEFAULT_MODEL_NAME}.build-*"))  # temp dir renamed away


def test_loads_with_transformers(model_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    hf_tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    eos, im_start, im_end = (
        hf_tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    )
    assert len(hf_tok) == config.vocab_size == 4096
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == eos
    assert {eos, im_start, im_end} <= set(hf_tok.all_special_ids)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    for key, value in MODEL_SHAPE.items():
        assert getattr(config, key) == value, key
    assert config.head_dim == 32
    assert list(config.eos_token_id) == [eos, im_end]
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == [eos, im_end]

    model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = hf_tok("def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # [1, num_tokens, vocab]
    assert logits.shape == (1, ids.shape[1], 4096)
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 0.5  # clearly non-uniform


def test_our_tokenizer_wrapper_reads_it(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    assert tok.eos_token_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert tok.vocab_size == 4096
    text = "import os\nprint('héllo 世界')\n"
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_renders_all_roles(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "developer", "content": "D"},
        {"role": "user", "content": [{"type": "text", "text": "U1"}, {"type": "text", "text": "U2"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "A"},
    ]
    text = tok.render_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>developer\nD<|im_end|>\n"
        "<|im_start|>user\nU1U2<|im_end|>\n"
        '<|im_start|>assistant\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n42<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not tok.render_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.apply_chat_template(messages[:1])
    assert ids[0] == 1 and ids.count(2) == 1  # markers are single special tokens
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert tok.render_chat_template(messages[:1], tools=tools).startswith("<|im_start|>system\n# Tools\n{")


def test_second_call_reuses_the_cache(model_dir: Path, cache_root: Path, monkeypatch) -> None:
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_default_model(cache_root) == model_dir
    assert time.perf_counter() - start < 0.5
    monkeypatch.setenv("HELIX_CACHE_DIR", str(cache_root))
    assert ensure_default_model() == model_dir  # the env var names the same cache root
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_build_is_deterministic_across_processes(model_dir: Path, tmp_path: Path) -> None:
    """A second build from scratch, in a fresh interpreter with another hash seed, is byte-identical."""
    other = tmp_path / "other"
    code = f"from helix_server.default_model import build_default_model; build_default_model({str(other)!r})"
    env = {**OFFLINE_ENV, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[1], timeout=120
    )
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        MANIFEST_FILE,
    ):
        assert _sha256(other / name) == _sha256(model_dir / name), name


def _fake_build(out_dir, corpus=None) -> Path:
    out = Path(out_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text(out.name)
    (out / MANIFEST_FILE).write_text("{}")
    return out


def test_racing_builders_agree_on_one_directory(tmp_path: Path, monkeypatch) -> None:
    barrier = threading.Barrier(2)

    def slow_build(out_dir, corpus=None):
        barrier.wait(timeout=10)  # both have built before either renames
        return _fake_build(out_dir)

    monkeypatch.setattr(builder, "build_default_model", slow_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_default_model(tmp_path))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    target = tmp_path / DEFAULT_MODEL_NAME
    assert results == [target, target]
    assert builder.is_complete_model_dir(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_MODEL_NAME]  # losers cleaned up


def test_broken_leftover_is_replaced(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(builder, "build_default_model", _fake_build)
    broken = tmp_path / DEFAULT_MODEL_NAME
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no manifest: an interrupted or damaged copy
    assert ensure_default_model(tmp_path) == broken
    assert builder.is_complete_model_dir(broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_MODEL_NAME]
