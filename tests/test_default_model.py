"""helix-pycoder-tiny: the shipped target + draft pair, how a config naming it serves it, that
transformers and helix load it, and that its draft is accepted often enough."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import torch

from helix_server import LLM, SamplingParams
from helix_server.config import EngineConfig, ModelConfig, SpeculativeConfig
from helix_server.default_model import (
    DEFAULT_SERVED_MODEL_NAME,
    MANIFEST_FILE,
    WEIGHTS_DIR,
    default_draft_dir,
    default_target_dir,
    ensure_default_model,
    read_manifest,
    with_default_model,
)
from helix_server.engine.tokenizer import load_tokenizer
from helix_server.platform import device as device_module

MAX_SHIPPED_BYTES = 40 * 1000 * 1000
# Greedy acceptance rate of the shipped draft at k = 3 on ACCEPTANCE_PROMPTS (32 tokens each) was
# 0.41 when the pair was shipped; the floor leaves a margin. A worse draft or a broken proposer path
# fails here (a random draft scores near 0).
ACCEPTANCE_FLOOR = 0.30
ACCEPTANCE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "    def __repr__(self):\n",
    "def read_lines(filename):\n    with open(filename) as f:\n",
    "        for key, value in self.items():\n",
    "    if not isinstance(name, str):\n",
    "def main():\n    parser = argparse.ArgumentParser()\n",
]


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    return default_target_dir(), default_draft_dir()


def test_the_pair_ships_complete_and_within_budget(pair) -> None:
    assert ensure_default_model() == pair[0]
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total <= MAX_SHIPPED_BYTES, total
    for model_dir in pair:
        for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", MANIFEST_FILE):
            assert (model_dir / name).is_file(), (model_dir, name)
    target, draft = (read_manifest(d) for d in pair)
    assert (target["role"], draft["role"]) == ("target", "draft")
    assert target["name"] == DEFAULT_SERVED_MODEL_NAME
    assert draft["parameters"] * 4 < target["parameters"]  # "much smaller"
    assert (pair[0] / "tokenizer.json").read_bytes() == (pair[1] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("role", ["target", "draft"])
def test_loads_with_transformers(pair, role: str) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    model_dir = pair[0] if role == "target" else pair[1]
    hf_tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    eos, im_end = hf_tok.convert_tokens_to_ids("<|endoftext|>"), hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert len(hf_tok) == config.vocab_size
    assert config.max_position_embeddings == 2048
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == eos
    assert list(config.eos_token_id) == [eos, im_end]
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == [eos, im_end]
    assert hf_tok.decode(hf_tok("def f(x):\n    return x\n").input_ids) == "def f(x):\n    return x\n"

    model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    ids = hf_tok("def fibonacci(n):\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # [1, num_tokens, vocab]
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()


def test_tokenizer_and_chat_template(pair) -> None:
    tok = load_tokenizer(pair[0])
    assert tok.eos_token_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    text = "import os\nprint('héllo 世界')\n"
    assert tok.decode(tok.encode(text)) == text
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.render_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("fast_half", [False, True])
def test_dtype_auto_on_a_cpu(pair, monkeypatch, fast_half: bool) -> None:
    """Half-precision checkpoints run in float32 on CPUs without fast half precision."""
    from helix_server.models import load_hf_config

    monkeypatch.setattr(device_module, "cpu_has_fast_half", lambda dtype: fast_half)
    hf_config = load_hf_config(pair[0])
    saved = json.loads((pair[0] / "config.json").read_text())["dtype"]
    resolved = device_module.resolve_dtype("auto", hf_config, torch.device("cpu"))
    assert resolved == (torch.float32 if saved == "float32" or not fast_half else getattr(torch, saved))


def test_helix_pycoder_tiny_by_name_gets_the_pair(pair) -> None:
    tiny = ModelConfig(model=DEFAULT_SERVED_MODEL_NAME)
    config = with_default_model(EngineConfig(model=tiny))
    assert config.model.model == str(pair[0])
    assert config.model.served_model_name == DEFAULT_SERVED_MODEL_NAME
    assert config.speculative.method == "draft" and config.speculative.draft_model == str(pair[1])
    assert config.speculative.num_speculative_tokens == "auto"

    def spec(**kwargs) -> SpeculativeConfig:
        return with_default_model(EngineConfig(model=tiny, speculative=SpeculativeConfig(**kwargs))).speculative

    assert spec(speculative_method="none").method == "none"
    assert spec(speculative_method="ngram").draft_model is None
    assert spec(num_speculative_tokens=5).num_speculative_tokens == 5
    assert spec(num_speculative_tokens=3).num_speculative_tokens == 3  # set explicitly: kept
    assert spec(draft_model="/elsewhere").draft_model == "/elsewhere"
    named = EngineConfig(model=ModelConfig(model="/some/model"))
    assert with_default_model(named) is named
    renamed = with_default_model(EngineConfig(model=msgspec.structs.replace(tiny, served_model_name="mine")))
    assert renamed.model.served_model_name == "mine"


def test_llm_serves_the_pair_with_speculation_and_the_draft_is_accepted() -> None:
    """Greedy, k = 3: the acceptance rate on fixed prompts stays above the floor, and the output is
    token for token the output without speculation."""
    llm = LLM(DEFAULT_SERVED_MODEL_NAME, dtype="float32", num_kv_blocks=256, num_speculative_tokens=3)
    assert llm.engine.num_speculative_tokens == 3
    assert llm.engine.runtime.model_name == DEFAULT_SERVED_MODEL_NAME
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = [r.outputs[0].token_ids for r in llm.generate(ACCEPTANCE_PROMPTS, params)]
    stats = llm.engine.stats()
    alpha = stats.spec_num_accepted_tokens_total / stats.spec_num_draft_tokens_total
    assert alpha >= ACCEPTANCE_FLOOR, alpha

    plain = LLM(DEFAULT_SERVED_MODEL_NAME, dtype="float32", num_kv_blocks=256, speculative_method="none")
    assert plain.engine.num_speculative_tokens == 0
    assert [r.outputs[0].token_ids for r in plain.generate(ACCEPTANCE_PROMPTS, params)] == outputs
