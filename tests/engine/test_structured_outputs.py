"""Structured outputs in the engine: the mask in the batched sampler, and speculation kept lossless.

With a constraint, greedy (and seeded) outputs are identical with and without speculative decoding,
for a draft model that often proposes what the grammar forbids and for n-gram drafts; every output
that finished parses and matches its constraint.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from helix_server import LLM, SamplingParams
from helix_server.sample.sampler import Sampler
from helix_server.sample.sampling_row import SamplingRow
from helix_server.sampling_params import StructuredOutputSpec
from tests.fixtures.tiny_models import noisy_copy

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "label": {"type": "string", "maxLength": 6},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
    },
    "required": ["id", "label", "flags"],
    "additionalProperties": False,
}
SPECS = [
    StructuredOutputSpec("json", json.dumps(SCHEMA)),
    StructuredOutputSpec("regex", r"(ab|cd)[0-9]{2,6}(,(ab|cd)[0-9]{2,6}){0,5}"),
    StructuredOutputSpec("json", json.dumps({"type": "array", "items": {"type": "integer"}, "maxItems": 8})),
]
PROMPTS = ["a a a a a a a a", "def f(x): return x", "hello hello hello hello", "[1, 2, 3, 1, 2, 3, 1, 2"]


@pytest.fixture(scope="module")
def target_dir(make_model_dir):
    return make_model_dir("llama")


@pytest.fixture(scope="module")
def draft_dir(target_dir, tmp_path_factory):
    """The target's weights plus noise: drafts agree often, not always."""
    return noisy_copy(target_dir, tmp_path_factory.mktemp("noisy-draft-structured"), seed=7)


def _params(seed: int | None) -> list[SamplingParams]:
    temperature = 0.0 if seed is None else 1.0
    return [
        SamplingParams(temperature=temperature, seed=seed, max_tokens=60, structured_output=spec)
        for spec in SPECS
        for _ in PROMPTS
    ]


def _run(llm: LLM, seed: int | None) -> list[tuple[list[int], str | None]]:
    prompts = [p for _ in SPECS for p in PROMPTS]
    outputs = llm.generate(prompts, _params(seed))
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outputs]


@pytest.fixture(scope="module")
def reference(target_dir):
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=512)
    return {seed: _run(llm, seed) for seed in (None, 11)}, llm.engine.tokenizer


@pytest.mark.parametrize("seed", [None, 11])
@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_constrained_outputs_identical_with_speculation(target_dir, draft_dir, reference, method, seed):
    expected, _tokenizer = reference
    settings = {"speculative_method": method, "num_speculative_tokens": 4}
    if method == "draft":
        settings["draft_model"] = str(draft_dir)
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=512, **settings)
    got = _run(llm, seed)
    assert got == expected[seed]
    counters = llm.engine.stats()
    assert counters.spec_num_draft_tokens_total > 0
    assert 0 < counters.spec_num_accepted_tokens_total < counters.spec_num_draft_tokens_total
    assert len(llm.engine.structured_matchers) == 0  # every finished request's matcher forgotten


@pytest.mark.parametrize("seed", [None, 11])
def test_finished_outputs_match_their_constraint(reference, seed):
    expected, tokenizer = reference
    finished = 0
    for (token_ids, reason), spec in zip(expected[seed], [s for s in SPECS for _ in PROMPTS]):
        assert reason in ("stop", "length")
        if reason != "stop":
            continue
        finished += 1
        text = tokenizer.decode(token_ids)
        if spec.kind == "regex":
            assert re.fullmatch(spec.value, text), text
        else:
            value = json.loads(text)
            if spec.value == json.dumps(SCHEMA):
                assert set(value) == {"id", "label", "flags"} and len(value["label"]) <= 6
    assert finished >= len(PROMPTS)


def test_mask_is_per_row_and_free_rows_are_untouched():
    sampler = Sampler(vocab_size=70, eos_token_ids={0}, device="cpu")
    logits = torch.randn(3, 70, generator=torch.Generator().manual_seed(0))  # [3, V]
    mask = torch.zeros(3, dtype=torch.int32)  # [W] for 70 tokens: 3 words
    mask[1] = 1 << 5  # only token 37 allowed
    free = SamplingRow(SamplingParams(temperature=1.0), [1], [])
    rows = [free, SamplingRow(SamplingParams(temperature=1.0), [1], [], token_bitmask=mask), free]
    processed = sampler.process_logits(logits, rows)
    assert torch.equal(processed[0], logits[0]) and torch.equal(processed[2], logits[2])
    assert torch.isfinite(processed[1]).sum() == 1 and torch.isfinite(processed[1, 37])
    probs = sampler.probs(processed, rows)
    assert probs[1, 37] == 1.0
    for _ in range(5):
        assert [t for t, _ in sampler.sample(logits, rows)][1] == 37


def test_embedded_default_model_with_its_draft_model():
    """helix-pycoder-tiny's own tokenizer works with the grammar backend, speculation on or off."""
    llm = LLM("helix-pycoder-tiny")
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    spec = StructuredOutputSpec("json", json.dumps({**schema, "additionalProperties": False}))
    texts = []
    for depth in (None, 0):
        params = SamplingParams(temperature=0, max_tokens=40, structured_output=spec, speculation_depth=depth)
        output = llm.generate(["def add(a, b):"], params)[0].outputs[0]
        assert output.finish_reason == "stop"
        assert set(json.loads(output.text)) == {"answer"}
        texts.append(output.text)
    assert texts[0] == texts[1]
    assert llm.engine.stats().spec_num_draft_tokens_total > 0
