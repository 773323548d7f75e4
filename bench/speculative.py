"""Speculative decoding: tokens/s with and without it, per proposer and depth, against Leviathan's
prediction, in one run.

Random weights make any two models disagree (acceptance ~0), so this benchmark builds a target and a
draft with controlled agreement: the draft is a 2-layer Llama; the target is the same 2 layers
followed by 10 more whose output projections (o_proj, down_proj) are scaled by a small epsilon, so
the extra layers add a small residual and the target's next-token choices mostly agree with the
draft's. The layer-skip proposer on this target (its first 2 layers) computes exactly the draft. For
prompt lookup (n-gram) the workload is copy-heavy, on a model with local (sliding-window) attention,
whose next token depends only on the last few dozen tokens: each prompt is S + C + S, where C is
the model's own greedy continuation of S, so after the second S the model writes C again and the
lookup finds it in the prompt (the situation of code edits and extraction, where answers repeat
their input).

For each configuration it measures, on the same prompts: tokens/s, the acceptance rate alpha
(accepted / drafted), and the cost ratio c = (per-token decode time of the draft alone) / (that of
the target alone, measured here). Leviathan et al.'s expected speedup is
(1 - alpha^(k+1)) / ((1 - alpha) (k c + 1)); the benchmark reports realised / predicted.

    python bench/speculative.py [--epsilon 0.05] [--out bench/results/speculative.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import BENCH_SHAPE, cache_root, copy_tokenizer  # noqa: E402
from bench_results import save_results  # noqa: E402
from greedy_runs import drafted_accepted, timed_greedy  # noqa: E402

from helix_server import LLM, SamplingParams  # noqa: E402
from helix_server.platform.process_policy import freeze_loaded_objects  # noqa: E402

DRAFT_LAYERS = 2
TARGET_LAYERS = 12
REPEATS = 3


def build_pair(epsilon: float, seed: int = 0) -> tuple[Path, Path]:
    """(target dir, draft dir) as described in the module docstring; cached per epsilon."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from helix_server.default_model import ensure_default_model

    root = cache_root() / f"spec-pair-eps{epsilon:g}"
    target_dir, draft_dir = root / "target", root / "draft"
    if (target_dir / "model.safetensors").exists() and (draft_dir / "model.safetensors").exists():
        return target_dir, draft_dir
    tokenizer_dir = ensure_default_model()
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    shape = dict(vocab_size=vocab, tie_word_embeddings=True, initializer_range=0.05, **BENCH_SHAPE)
    torch.manual_seed(seed)
    target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=TARGET_LAYERS, **shape))
    with torch.no_grad():
        for index, layer in enumerate(target.model.layers):
            if index >= DRAFT_LAYERS:
                layer.self_attn.o_proj.weight.mul_(epsilon)
                layer.mlp.down_proj.weight.mul_(epsilon)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    target.save_pretrained(tmp / "target", safe_serialization=True)
    tensors = load_file(tmp / "target" / "model.safetensors")
    keep = {
        name: t
        for name, t in tensors.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < DRAFT_LAYERS
    }
    LlamaConfig(num_hidden_layers=DRAFT_LAYERS, architectures=["LlamaForCausalLM"], **shape).save_pretrained(tmp / "draft")
    save_file(keep, tmp / "draft" / "model.safetensors", metadata={"format": "pt"})
    for sub in ("target", "draft"):
        copy_tokenizer(tokenizer_dir, tmp / sub)
    tmp.rename(root)
    return target_dir, draft_dir


def build_local_target(seed: int = 0) -> Path:
    """A 12-layer Mistral-architecture model whose attention only sees the last 8 tokens per layer
    (receptive field 96 tokens), sharing the default model's tokenizer; cached."""
    from transformers import MistralConfig, MistralForCausalLM

    from helix_server.default_model import ensure_default_model

    out = cache_root() / "spec-local-target"
    if (out / "model.safetensors").exists():
        return out
    tokenizer_dir = ensure_default_model()
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = MistralConfig(
        vocab_size=vocab,
        num_hidden_layers=12,
        sliding_window=8,
        tie_word_embeddings=True,
        initializer_range=0.05,
        architectures=["MistralForCausalLM"],
        **BENCH_SHAPE,
    )
    torch.manual_seed(seed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    MistralForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, tmp)
    tmp.rename(out)
    return out


def make_prompts(num: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(rng.randint(32, 96))] for _ in range(num)]


def per_token_decode_seconds(model_dir: Path, prompts, max_tokens: int) -> float:
    """Seconds per generated token of a model decoding alone, one request at a time."""
    llm = LLM(model=str(model_dir), dtype="float32", num_kv_blocks=512)
    warm_up(llm, llm.engine.runtime.vocab_size)
    seconds, outputs = timed_greedy(llm, prompts, max_tokens, concurrent=False)
    return seconds / sum(map(len, outputs))


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    if alpha >= 1.0:
        return (k + 1) / (k * c + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))


def warm_up(llm: LLM, vocab: int) -> None:
    """One full-budget prefill and a few decode steps, untimed: the first big step of a process
    faults in its activation memory, which no configuration should be charged for. Then what is
    alive is frozen (as `helix-server serve` does after loading), so cyclic garbage collection does
    not pause the timed runs."""
    prompt = [10 + i % (vocab - 20) for i in range(2000)]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    freeze_loaded_objects()


def run_config(target_dir, settings, prompts, max_tokens, baseline, concurrent=False) -> dict:
    llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=1024, max_num_seqs=16, **settings)
    warm_up(llm, llm.engine.runtime.vocab_size)
    before = llm.engine.stats()
    seconds, outputs = timed_greedy(llm, prompts, max_tokens, concurrent)
    drafted, accepted = drafted_accepted(before, llm.engine.stats())
    return {
        "tokens_per_s": sum(map(len, outputs)) / seconds,
        "speedup": baseline["seconds"] / seconds,
        "alpha": accepted / drafted if drafted else None,
        "drafted": drafted,
        "outputs_equal_to_baseline": outputs == baseline["outputs"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=0.05, help="scale of the target's extra layers")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speculative.json"))
    args = parser.parse_args()

    target_dir, draft_dir = build_pair(args.epsilon)
    vocab = json.loads((target_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_prompts, vocab, seed=1)
    results: dict = {"epsilon": args.epsilon, "threads": torch.get_num_threads(), "configs": {}}

    t_target = per_token_decode_seconds(target_dir, prompts, args.max_tokens)
    t_draft = per_token_decode_seconds(draft_dir, prompts, args.max_tokens)
    c_model = t_draft / t_target
    results["cost_ratio_c"] = {"draft": c_model, "layer-skip": c_model, "ngram": 0.0}
    print(f"per-token decode: target {t_target * 1e3:.1f} ms, draft {t_draft * 1e3:.1f} ms -> c = {c_model:.3f}")

    baseline_llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=1024, max_num_seqs=16)
    warm_up(baseline_llm, vocab)
    seconds, outputs = timed_greedy(baseline_llm, prompts, args.max_tokens, concurrent=False)
    baseline = {"seconds": seconds, "outputs": outputs, "tokens_per_s": sum(map(len, outputs)) / seconds}
    print(f"no speculation, one request at a time: {baseline['tokens_per_s']:.1f} tok/s")

    for method in ("draft", "layer-skip"):
        for k in (1, 3, 5):
            settings = {"speculative_method": method, "num_speculative_tokens": k}
            settings |= {"draft_model": str(draft_dir)} if method == "draft" else {"draft_layers": DRAFT_LAYERS}
            row = run_config(target_dir, settings, prompts, args.max_tokens, baseline)
            row["predicted_speedup"] = predicted_speedup(row["alpha"] or 0.0, k, c_model)
            row["realised_over_predicted"] = row["speedup"] / row["predicted_speedup"]
            results["configs"][f"{method}-k{k}"] = row
            print(f"{method:10s} k={k}: {row['tokens_per_s']:.1f} tok/s, speedup {row['speedup']:.2f} "
                  f"(predicted {row['predicted_speedup']:.2f}, alpha {row['alpha']:.2f}), "
                  f"identical output: {row['outputs_equal_to_baseline']}")

    # Prompt lookup on a copy-heavy workload (see the module docstring): prompts S + C + S.
    local_dir = build_local_target()
    local_llm = LLM(model=str(local_dir), dtype="float32", num_kv_blocks=1024, max_num_seqs=16)
    warm_up(local_llm, vocab)
    starts = make_prompts(args.num_prompts, vocab, seed=3)
    _, continuations = timed_greedy(local_llm, starts, args.max_tokens, concurrent=True)
    copying = [s + c + s for s, c in zip(starts, continuations)]
    copy_seconds, copy_outputs = timed_greedy(local_llm, copying, args.max_tokens, concurrent=False)
    copy_baseline = {"seconds": copy_seconds, "outputs": copy_outputs}
    results["copy_workload_repeats_continuation"] = sum(o == c for o, c in zip(copy_outputs, continuations))
    for k in (1, 3, 5):
        settings = {"speculative_method": "ngram", "num_speculative_tokens": k}
        row = run_config(local_dir, settings, copying, args.max_tokens, copy_baseline)
        row["predicted_speedup"] = predicted_speedup(row["alpha"] or 0.0, k, 0.0)
        results["configs"][f"ngram-k{k}"] = row
        print(f"ngram      k={k}: speedup {row['speedup']:.2f} (alpha {row['alpha']:.2f}), "
              f"identical output: {row['outputs_equal_to_baseline']}")

    # 16 concurrent requests: auto must never be slower than no speculation. Timings of a whole
    # batch vary by several percent from run to run on a shared 2-core machine, so each
    # configuration runs REPEATS times, interleaved with the baseline, and the fastest runs compare.
    many = make_prompts(16, vocab, seed=2)
    for method in ("draft", "layer-skip", "ngram"):
        settings = {"speculative_method": method, "num_speculative_tokens": "auto"}
        if method == "draft":
            settings["draft_model"] = str(draft_dir)
        if method == "layer-skip":
            settings["draft_layers"] = DRAFT_LAYERS
        llm = LLM(model=str(target_dir), dtype="float32", num_kv_blocks=1024, max_num_seqs=16, **settings)
        warm_up(llm, vocab)
        base_times, spec_times, equal = [], [], True
        before = llm.engine.stats()
        for _ in range(REPEATS):
            seconds, base_outputs = timed_greedy(baseline_llm, many, args.max_tokens, concurrent=True)
            base_times.append(seconds)
            seconds, outputs = timed_greedy(llm, many, args.max_tokens, concurrent=True)
            spec_times.append(seconds)
            equal = equal and outputs == base_outputs
        drafted, accepted = drafted_accepted(before, llm.engine.stats())
        row = {
            "speedup": min(base_times) / min(spec_times),
            "baseline_seconds": base_times,
            "seconds": spec_times,
            "alpha": accepted / drafted if drafted else None,
            "drafted": drafted,
            "outputs_equal_to_baseline": equal,
        }
        results["configs"][f"{method}-auto-16-concurrent"] = row
        alpha = "n/a" if row["alpha"] is None else f"{row['alpha']:.2f}"
        print(f"{method} auto, 16 concurrent: {row['speedup']:.2f}x no speculation (alpha {alpha}, "
              f"{drafted} drafted), identical output: {equal}")

    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
