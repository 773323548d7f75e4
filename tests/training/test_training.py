"""The training package: corpus split, schedule, distillation loss, step planning, and a tiny end-to-end
run of `train_default` whose saved directories load with transformers and with helix."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from helix_server.training.corpus import is_heldout, select_corpus, stdlib_root
from helix_server.training.distill import distillation_loss
from helix_server.training.loop import lr_at
from helix_server.training.plan import plan_steps
from helix_server.training.presets import CPU, ModelShape, Phase, Recipe
from helix_server.training.recipe import TrainOptions, train_default

TINY = Recipe(
    name="tiny",
    vocab_size=384,
    seq_len=32,
    batch_size=8,
    target=ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    draft=ModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
    target_phase=Phase(steps=40, lr=5e-3),
    draft_phase=Phase(steps=20, lr=5e-3),
    distill_phase=Phase(steps=20, lr=3e-3),
    include_tests=False,
    eval_tokens=2048,
)


def test_split_is_by_file_deterministic_and_keeps_tests_out_of_heldout() -> None:
    split = select_corpus(include_tests=True)
    assert split.root == stdlib_root()
    assert split.heldout and not set(split.heldout) & set(split.train)
    assert all(is_heldout(name) for name in split.heldout)
    assert not any(part in ("test", "tests") for name in split.heldout for part in Path(name).parts)
    assert not any("site-packages" in name or name.startswith("encodings/") for name in split.train)
    assert select_corpus(include_tests=True) == split
    assert is_heldout("typing.py") and not is_heldout("os.py")  # fixed by the hash, on every machine
    without_tests = select_corpus()
    assert without_tests.heldout == split.heldout and set(without_tests.train) < set(split.train)
    assert "test/test_typing.py" not in split.train  # tests of a held-out module stay out


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    phase = Phase(steps=100, lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    rates = [lr_at(step, 100, phase) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


def test_distillation_loss() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(teacher.flatten(0, 1), labels.flatten())
    # Identical distributions: only the CE part remains.
    assert distillation_loss(teacher, teacher, labels, 2.0, 0.8).item() == pytest.approx(0.2 * ce.item(), rel=1e-5)
    student = torch.zeros(2, 5, 11, requires_grad=True)
    distillation_loss(student, teacher, labels, 1.0, 1.0).backward()
    # The gradient of KL(p || softmax(s)) w.r.t. s is softmax(s) - p, per position (batchmean: / 10).
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / 10
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_time_budget_plan_fits_and_respects_the_epoch_cap() -> None:
    from helix_server.training.export import new_llama

    target = new_llama(TINY.target, 384, [0, 2], 0, seed=0)
    draft = new_llama(TINY.draft, 384, [0, 2], 0, seed=1)
    stream = torch.randint(0, 384, (20_000,), dtype=torch.int32)
    budget = Recipe(**{**TINY.__dict__, "target_phase": Phase(None, 1e-3), "distill_phase": Phase(None, 1e-3)})
    lines: list[str] = []
    deadline = time.monotonic() + 60.0
    before = [p.detach().clone() for p in target.parameters()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids oversubscription on a busy machine
    try:
        plan = plan_steps(budget, target, draft, stream, torch.device("cpu"), deadline, 0, lines.append)
    finally:
        torch.set_num_threads(threads)
    assert plan.count("draft") == 20  # given steps are kept
    cap = int(budget.max_epochs * stream.numel() / (budget.batch_size * budget.seq_len))
    assert 1 <= plan.count("target") <= cap and 1 <= plan.count("distill") <= cap
    assert plan.deadline("target", time.monotonic()) <= deadline
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))  # timing used copies
    assert any("planned steps" in line for line in lines)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """`train_default` on 12 small stdlib files with tiny models (a few seconds)."""
    corpus = tmp_path_factory.mktemp("corpus")
    files = sorted(p for p in stdlib_root().glob("*.py") if 4_000 < p.stat().st_size < 40_000)[:12]
    for path in files:
        shutil.copy(path, corpus / path.name)
    output = tmp_path_factory.mktemp("trained")
    options = TrainOptions(output=output, recipe=TINY, device="cpu", seed=0, corpus_dir=corpus, threads=1,
                           min_corpus_chars=10_000, heldout_percent=30, log_every=10)
    threads = torch.get_num_threads()
    try:
        return output, train_default(options)
    finally:
        torch.set_num_threads(threads)


def test_tiny_training_learns(tiny_run) -> None:
    output, summary = tiny_run
    uniform = math.log(TINY.vocab_size)
    heldout = summary["heldout"]
    assert heldout["target_loss"] < uniform - 1.0
    assert heldout["draft_loss"] < uniform - 0.5
    assert 0.0 < heldout["agreement"] <= 1.0 and heldout["draft_loss_before_distillation"] < uniform
    assert summary["phases"]["target"]["steps"] == 40 and not summary["phases"]["target"]["stopped_early"]
    assert json.loads((output / "training-summary.json").read_text())["heldout"] == heldout
    log = (output / "train-log.txt").read_text()
    assert "[target] step 40/40" in log and "[distill] step 20/20" in log
    assert not (output / ".tokenizer").exists()


def test_tiny_training_saves_loadable_directories(tiny_run) -> None:
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from helix_server import LLM, SamplingParams

    output, _ = tiny_run
    for role in ("target", "draft"):
        model_dir = output / role
        config = AutoConfig.from_pretrained(model_dir)
        assert config.max_position_embeddings == 2048 and config.vocab_size == TINY.vocab_size
        assert len(AutoTokenizer.from_pretrained(model_dir)) == TINY.vocab_size
        LlamaForCausalLM.from_pretrained(model_dir)
        manifest = json.loads((model_dir / "helix-default-model.json").read_text())
        assert manifest["role"] == role and manifest["corpus"]["source"] == "custom"
    llm = LLM(model=str(output / "target"), draft_model=str(output / "draft"), num_kv_blocks=64, dtype="float32")
    result = llm.generate(["def f(x):\n"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(result[0].outputs[0].token_ids) == 8


def test_the_cpu_recipe_is_small_enough_to_ship() -> None:
    def params(shape: ModelShape, vocab: int) -> int:
        attn = shape.hidden_size * shape.hidden_size * 2 + 2 * shape.hidden_size * (
            shape.hidden_size // shape.num_attention_heads * shape.num_key_value_heads
        )
        mlp = 3 * shape.hidden_size * shape.intermediate_size
        return vocab * shape.hidden_size + shape.num_hidden_layers * (attn + mlp)

    total = params(CPU.target, CPU.vocab_size) + params(CPU.draft, CPU.vocab_size)
    assert 4 * total <= CPU.max_weight_bytes
