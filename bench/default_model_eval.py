"""Held-out evaluation of the embedded default model pair (target + distilled draft).

On the standard library files the training held out (same rule as `helix-server train-default`):

1. per-token loss (nats) of the target and of the draft, teacher-forced over windows of `--seq-len`
   tokens, with transformers' LlamaForCausalLM (float32), and their greedy agreement;
2. through helix's own engine (`helix_server.LLM`), greedy: the draft's acceptance rate
   alpha = accepted / drafted (the engine's `stats()` counters) for k = 1..6, and tokens/s with and
   without speculative decoding (k = 1..6 and `auto`), one request at a time and all prompts at
   once. Prompts are the `--context-lines` lines before a `def` line of a held-out file, plus that
   line. Every configuration runs `--repeats` times, interleaved; medians are compared. Outputs with
   speculation must equal the outputs without it (greedy speculation is lossless).

    python bench/default_model_eval.py [--target DIR] [--draft DIR] [--threads N]
                                       [--out bench/results/default_model_eval.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_results import save_results  # noqa: E402
from greedy_runs import drafted_accepted, timed_greedy  # noqa: E402

from helix_server import LLM  # noqa: E402
from helix_server.default_model import default_draft_dir, default_target_dir, read_manifest  # noqa: E402
from helix_server.training.corpus import select_corpus  # noqa: E402

DEF_LINE = re.compile(r"^\s*(async\s+)?def \w+\(")
DEPTHS = (1, 2, 3, 4, 5, 6)


def heldout_prompts(texts: list[str], num: int, context_lines: int) -> list[str]:
    """Up to `num` prompts, taken round-robin over the files: context lines + a `def` line."""
    per_file: list[list[str]] = []
    for text in texts:
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if i >= context_lines and DEF_LINE.match(line)]
        picks = starts[:: max(1, len(starts) // 4)][:4]
        per_file.append(["\n".join(lines[i - context_lines : i + 1]) + "\n" for i in picks])
    prompts: list[str] = []
    for round_index in range(4):
        for candidates in per_file:
            if round_index < len(candidates) and len(prompts) < num:
                prompts.append(candidates[round_index])
    return prompts


def loss_eval(target_dir: Path, draft_dir: Path, texts: list[str], seq_len: int) -> dict:
    """Held-out per-token loss of both models and their teacher-forced greedy agreement."""
    from transformers import LlamaForCausalLM

    from helix_server.default_model.tokenizer_training import EOS_TOKEN
    from helix_server.training.data import eval_windows, tokenize_files
    from helix_server.training.evaluate import greedy_agreement, heldout_loss

    from tokenizers import Tokenizer

    eos_id = Tokenizer.from_file(str(target_dir / "tokenizer.json")).token_to_id(EOS_TOKEN)
    stream = tokenize_files(target_dir / "tokenizer.json", texts, eos_id)
    windows = eval_windows(stream, seq_len, stream.numel())
    cpu = torch.device("cpu")
    target = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    draft = LlamaForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    return {
        "heldout_tokens": stream.numel(),
        "evaluated_tokens": windows.shape[0] * seq_len,
        "seq_len": seq_len,
        "target_loss": heldout_loss(target, windows, cpu),
        "draft_loss": heldout_loss(draft, windows, cpu),
        "greedy_agreement": greedy_agreement(target, draft, windows, cpu),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=default_target_dir())
    parser.add_argument("--draft", type=Path, default=default_draft_dir())
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--context-lines", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256, help="window of the held-out loss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "default_model_eval.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    split = select_corpus()
    texts = split.read(split.heldout)
    results: dict = {
        "command": " ".join(sys.argv),
        "target": str(args.target),
        "draft": str(args.draft),
        "target_manifest_recipe": read_manifest(args.target).get("recipe"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "heldout_files": list(split.heldout),
    }
    results["loss"] = loss_eval(args.target, args.draft, texts, args.seq_len)
    print(json.dumps(results["loss"], indent=2), flush=True)

    common = {"dtype": args.dtype, "num_kv_blocks": 1024, "max_num_seqs": 32}
    configs = {"none": LLM(model=str(args.target), speculative_method="none", **common)}
    configs["draft-alone"] = LLM(model=str(args.draft), speculative_method="none", **common)
    for k in (*DEPTHS, "auto"):
        configs[f"k{k}" if k != "auto" else "auto"] = LLM(
            model=str(args.target), draft_model=str(args.draft), num_speculative_tokens=k, **common
        )
    tokenizer = configs["none"].get_tokenizer()
    prompt_texts = heldout_prompts(texts, args.num_prompts, args.context_lines)
    prompts = [tokenizer.encode(p) for p in prompt_texts]
    results.update(dtype=str(configs["none"].engine.runtime.dtype), num_prompts=len(prompts),
                   max_tokens=args.max_tokens, prompt_tokens=[len(p) for p in prompts])
    for llm in configs.values():
        timed_greedy(llm, prompts[:2], 8, concurrent=False)  # warm-up

    seconds: dict[tuple[str, bool], list[float]] = {}
    outputs: dict[tuple[str, bool], list[list[int]]] = {}
    counters = {name: (llm.engine.stats(), None) for name, llm in configs.items()}
    for _ in range(args.repeats):
        for concurrent in (False, True):
            for name, llm in configs.items():
                gc.collect()
                took, out = timed_greedy(llm, prompts, args.max_tokens, concurrent)
                seconds.setdefault((name, concurrent), []).append(took)
                outputs[(name, concurrent)] = out
    generated = len(prompts) * args.max_tokens
    rows = {}
    for name, llm in configs.items():
        before, after = counters[name][0], llm.engine.stats()
        drafted, accepted = drafted_accepted(before, after)
        drafts = after.spec_num_drafts_total - before.spec_num_drafts_total
        row = {"alpha": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
               "mean_accepted_per_draft": accepted / drafts if drafts else None}
        if drafted:
            per_position = {int(k): v - before.spec_accepted_tokens_per_position_total.get(k, 0)
                            for k, v in after.spec_accepted_tokens_per_position_total.items()}
            row["accepted_per_position"] = dict(sorted(per_position.items()))
        for concurrent in (False, True):
            mode = "concurrent" if concurrent else "one_at_a_time"
            median = statistics.median(seconds[(name, concurrent)])
            base = statistics.median(seconds[("none", concurrent)])
            row[mode] = {"tokens_per_s": generated / median, "speedup": base / median,
                         "seconds": seconds[(name, concurrent)]}
            if name != "draft-alone":
                row[mode]["outputs_equal_to_no_speculation"] = outputs[(name, concurrent)] == outputs[("none", concurrent)]
        rows[name] = row
        alpha = "  -  " if row["alpha"] is None else f"{row['alpha']:.3f}"
        print(f"{name:12s} alpha {alpha}  one-at-a-time {row['one_at_a_time']['tokens_per_s']:7.1f} tok/s "
              f"({row['one_at_a_time']['speedup']:.2f}x)  concurrent {row['concurrent']['tokens_per_s']:7.1f} tok/s "
              f"({row['concurrent']['speedup']:.2f}x)", flush=True)
    results["configs"] = rows
    results["cost_ratio_c"] = (rows["none"]["one_at_a_time"]["tokens_per_s"]
                               / rows["draft-alone"]["one_at_a_time"]["tokens_per_s"])
    results["load_average_at_end"] = os.getloadavg()
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
