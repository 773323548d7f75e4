"""`train_default`: the whole run of `helix-server train-default`, from source files to two HF dirs.

1. Select the standard library's files and split them by file (`corpus`); train the byte-level BPE
   tokenizer on the training files only.
2. Tokenize both sets (`data`); plan each phase's steps (given, or from a time budget and a few timed
   steps on the device, `plan`).
3. Train the target on the text; evaluate; save it.
4. Train the draft on the same text; then distil it on the target (`distill`); evaluate both, and
   their greedy agreement before and after distillation; save the draft.

Progress goes to stdout and `train-log.txt`; the numbers to `training-summary.json` and to each
model's manifest.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from helix_server.default_model.shipped import DEFAULT_SERVED_MODEL_NAME
from helix_server.default_model.tokenizer_training import EOS_TOKEN, IM_END, build_bpe_tokenizer
from helix_server.training.corpus import DEFAULT_HELDOUT_PERCENT, select_corpus
from helix_server.training.data import eval_windows, random_batches, tokenize_files
from helix_server.training.distill import make_distill_loss
from helix_server.training.evaluate import greedy_agreement, heldout_loss
from helix_server.training.export import count_parameters, new_llama, save_dtype, save_model_dir
from helix_server.training.loop import PhaseResult, ce_loss, train_phase
from helix_server.training.plan import plan_steps
from helix_server.training.presets import Recipe

MIN_CORPUS_CHARS = 1_000_000


@dataclass(frozen=True)
class TrainOptions:
    """How to run a recipe: where to write, on which device, with which seed and limits."""

    output: Path
    recipe: Recipe
    device: str = "auto"
    seed: int = 0
    # Wall-clock seconds for the whole run; phases without a step count share what is left.
    time_budget_s: float | None = None
    threads: int | None = None
    corpus_dir: Path | None = None
    log_every: int = 50
    # Refuse corpora smaller than this (a Python without its sources); tests lower it.
    min_corpus_chars: int = MIN_CORPUS_CHARS
    heldout_percent: int = DEFAULT_HELDOUT_PERCENT


class RunLog:
    """Prints progress lines with the elapsed time and appends them to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def resolve_training_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cpu`, `cuda` and `cuda:N` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"training runs on cpu or cuda, not {name!r}")
    return device


def train_default(options: TrainOptions) -> dict:
    """Run the recipe; returns the summary also written to `training-summary.json`."""
    recipe = options.recipe
    output = Path(options.output)
    log = RunLog(output / "train-log.txt")
    deadline = log.start + options.time_budget_s if options.time_budget_s else None
    device = resolve_training_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"recipe {recipe.name} on {_describe(device)}; seed {options.seed}; output {output}")

    split = select_corpus(options.corpus_dir, recipe.include_tests, options.heldout_percent)
    train_texts, heldout_texts = split.read(split.train), split.read(split.heldout)
    train_chars = sum(map(len, train_texts))
    if train_chars < options.min_corpus_chars or not heldout_texts:
        raise RuntimeError(
            f"only {train_chars} characters of Python source in {split.root} ({len(split.heldout)} held-out "
            "files); this Python lacks its standard library sources: pass --corpus-dir DIR"
        )
    log(f"corpus {split.root}: {len(split.train)} training files ({train_chars:,} chars), "
        f"{len(split.heldout)} held-out files ({sum(map(len, heldout_texts)):,} chars)")

    tokenizer_dir = build_bpe_tokenizer(output / ".tokenizer", vocab_size=recipe.vocab_size, corpus=train_texts)
    eos_id, im_end_id, vocab_size = _special_ids(tokenizer_dir)
    train_stream = tokenize_files(tokenizer_dir / "tokenizer.json", train_texts, eos_id)
    heldout_stream = tokenize_files(tokenizer_dir / "tokenizer.json", heldout_texts, eos_id)
    windows = eval_windows(heldout_stream, recipe.seq_len, recipe.eval_tokens)
    log(f"tokenizer: {vocab_size} tokens; training stream {train_stream.numel():,} tokens, held-out "
        f"{heldout_stream.numel():,} ({windows.shape[0]} evaluation windows of {recipe.seq_len})")

    target = new_llama(recipe.target, vocab_size, [eos_id, im_end_id], eos_id, options.seed).to(device)
    draft = new_llama(recipe.draft, vocab_size, [eos_id, im_end_id], eos_id, options.seed + 1).to(device)
    log(f"target {count_parameters(target):,} parameters {asdict(recipe.target)}")
    log(f"draft {count_parameters(draft):,} parameters {asdict(recipe.draft)}")
    dtype = save_dtype([target, draft], recipe.max_weight_bytes)

    steps = plan_steps(recipe, target, draft, train_stream, device, deadline, options.seed, log)
    results: dict[str, PhaseResult] = {}
    evals: dict[str, float] = {}

    def batches(phase_index: int):
        generator = torch.Generator().manual_seed(options.seed * 1000 + phase_index)
        return random_batches(train_stream, recipe.batch_size, recipe.seq_len, generator)

    def run(name: str, index: int, model, phase, loss_fn) -> None:
        phase_deadline = steps.deadline(name, time.monotonic())
        results[name] = train_phase(
            name, model, batches(index), steps.count(name), phase, loss_fn, device, log, phase_deadline,
            options.log_every,
        )

    run("target", 1, target, recipe.target_phase, ce_loss)
    evals["target_loss"] = heldout_loss(target, windows, device)
    log(f"held-out loss: target {evals['target_loss']:.4f} nats/token")
    corpus = _corpus_facts(split, options, train_chars, heldout_texts, train_stream, heldout_stream)
    common = {"recipe": recipe.name, "seed": options.seed, "corpus": corpus, "device": _describe(device),
              "versions": _versions(), "saved_dtype": str(dtype).removeprefix("torch.")}

    def target_manifest() -> dict:
        return {**common, "name": DEFAULT_SERVED_MODEL_NAME, "role": "target",
                "description": "A tiny Python-completion model trained by helix_server on the Python "
                               "standard library's source, for trying helix out; not an assistant.",
                "shape": asdict(recipe.target), "parameters": count_parameters(target),
                "training": {"target": _phase_facts(results["target"], recipe.target_phase)},
                "heldout": {"loss": evals["target_loss"]}}

    save_model_dir(target, output / "target", tokenizer_dir, dtype, target_manifest())
    log(f"saved {output / 'target'} ({str(dtype).removeprefix('torch.')})")

    run("draft", 2, draft, recipe.draft_phase, ce_loss)
    evals["draft_loss_before_distillation"] = heldout_loss(draft, windows, device)
    evals["agreement_before_distillation"] = greedy_agreement(target, draft, windows, device)
    log(f"held-out: draft loss {evals['draft_loss_before_distillation']:.4f}, greedy agreement with the "
        f"target {evals['agreement_before_distillation']:.3f}")
    distill_loss = make_distill_loss(target, recipe.distill_temperature, recipe.distill_kl_weight)
    run("distill", 3, draft, recipe.distill_phase, distill_loss)
    evals["draft_loss"] = heldout_loss(draft, windows, device)
    evals["agreement"] = greedy_agreement(target, draft, windows, device)
    log(f"held-out: draft loss {evals['draft_loss']:.4f}, greedy agreement with the target "
        f"{evals['agreement']:.3f} (after distillation)")

    draft_manifest = {
        **common, "name": f"{DEFAULT_SERVED_MODEL_NAME}-draft", "role": "draft",
        "description": "The speculative-decoding draft of the default model: same tokenizer, trained on "
                       "the same text, then distilled on the target's next-token distributions.",
        "shape": asdict(recipe.draft), "parameters": count_parameters(draft),
        "training": {"draft": _phase_facts(results["draft"], recipe.draft_phase),
                     "distill": {**_phase_facts(results["distill"], recipe.distill_phase),
                                 "temperature": recipe.distill_temperature,
                                 "kl_weight": recipe.distill_kl_weight}},
        "heldout": {"loss": evals["draft_loss"], "loss_before_distillation": evals["draft_loss_before_distillation"],
                    "greedy_agreement_with_target": evals["agreement"],
                    "greedy_agreement_before_distillation": evals["agreement_before_distillation"]},
    }
    save_model_dir(draft, output / "draft", tokenizer_dir, dtype, draft_manifest)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    summary = {"recipe": recipe.name, "seed": options.seed, "device": _describe(device), "corpus": corpus,
               "phases": {name: _phase_facts(r, getattr(recipe, f"{name}_phase")) for name, r in results.items()},
               "heldout": evals, "seconds": time.monotonic() - log.start, "versions": _versions()}
    (output / "training-summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log(f"done in {summary['seconds']:.0f}s: target loss {evals['target_loss']:.4f}, draft loss "
        f"{evals['draft_loss']:.4f}, agreement {evals['agreement']:.3f}; wrote {output / 'target'} and "
        f"{output / 'draft'}")
    return summary


def _special_ids(tokenizer_dir: Path) -> tuple[int, int, int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(IM_END), tokenizer.get_vocab_size()


def _phase_facts(result: PhaseResult, phase) -> dict:
    return {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
            "final_train_loss": result.final_loss, "stopped_early": result.stopped_early, "peak_lr": phase.lr}


def _corpus_facts(split, options: TrainOptions, train_chars, heldout_texts, train_stream, heldout_stream) -> dict:
    return {
        "source": "python-stdlib" if options.corpus_dir is None else "custom",
        "python": platform.python_version(), "root": str(split.root),
        "include_tests": options.recipe.include_tests, "train_files": len(split.train), "train_chars": train_chars,
        "train_tokens": train_stream.numel(), "heldout_files": list(split.heldout),
        "heldout_chars": sum(map(len, heldout_texts)), "heldout_tokens": heldout_stream.numel(),
        "heldout_rule": f"sha256(relative path)[:4] as big-endian int % 100 < {options.heldout_percent}",
    }


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} torch threads)"


def _versions() -> dict:
    import tokenizers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}

