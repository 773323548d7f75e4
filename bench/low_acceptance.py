"""Speculation where drafts are rarely accepted: `auto` against no speculation (and a fixed k).

Layer-skip on a model with random weights: its first layers predict the whole model's next token
almost never, the situation of issue 15 (2 of 957 drafted tokens accepted, 0.2-0.5x the speed of no
speculation at a fixed depth). `auto`, the default depth, must stay at 0.95x of no speculation or
better; a fixed k shows what it guards against. The model is `bench_models.bench_model_dir()` (the
~100M random Llama, 12 layers; layer-skip drafts with its first 3).

Each configuration runs `--repeats` times, interleaved with the baseline, greedy, one request at a
time and `--concurrent` at once; the fastest runs compare (a shared machine is noisy).

    python bench/low_acceptance.py [--max-tokens 48] [--repeats 3] [--out bench/results/low_acceptance.json]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import bench_model_dir  # noqa: E402
from bench_results import save_results  # noqa: E402
from greedy_runs import drafted_accepted, timed_greedy  # noqa: E402

from helix_server import LLM  # noqa: E402

DRAFT_LAYERS = 3


def make_prompts(num: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(rng.randint(16, 48))] for _ in range(num)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts run one at a time")
    parser.add_argument("--concurrent", type=int, default=8, help="prompts run at once")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "low_acceptance.json"))
    args = parser.parse_args()

    model_dir = bench_model_dir()
    common = dict(model=str(model_dir), dtype="float32", num_kv_blocks=512, max_num_seqs=16)
    spec = dict(speculative_method="layer-skip", draft_layers=DRAFT_LAYERS)
    llms = {
        "none": LLM(**common),
        "auto": LLM(**common, **spec),  # the default depth
        "k3": LLM(**common, **spec, num_speculative_tokens=3),
    }
    vocab = llms["none"].engine.runtime.vocab_size
    workloads = {
        "one_at_a_time": (make_prompts(args.num_prompts, vocab, seed=1), False),
        f"{args.concurrent}_concurrent": (make_prompts(args.concurrent, vocab, seed=2), True),
    }
    for llm in llms.values():  # untimed: first steps fault in memory
        timed_greedy(llm, workloads["one_at_a_time"][0][:1], 4, False)
    results: dict = {"threads": torch.get_num_threads(), "draft_layers": DRAFT_LAYERS, "workloads": {}}
    for name, (prompts, concurrent) in workloads.items():
        times: dict[str, list[float]] = {key: [] for key in llms}
        outputs: dict[str, list] = {}
        before = {key: llm.engine.stats() for key, llm in llms.items()}
        for _ in range(args.repeats):
            for key, llm in llms.items():
                seconds, outputs[key] = timed_greedy(llm, prompts, args.max_tokens, concurrent)
                times[key].append(seconds)
        row: dict = {}
        for key, llm in llms.items():
            after = llm.engine.stats()
            drafted, accepted = drafted_accepted(before[key], after)
            row[key] = {
                "seconds": times[key],
                "x_no_speculation": min(times["none"]) / min(times[key]),
                "drafted": drafted,
                "alpha": accepted / drafted if drafted else None,
                "outputs_equal_to_none": outputs[key] == outputs["none"],
            }
        results["workloads"][name] = row
        for key in ("auto", "k3"):
            r = row[key]
            alpha = "n/a" if r["alpha"] is None else f"{r['alpha']:.3f}"
            print(f"{name:16s} {key:4s}: {r['x_no_speculation']:.2f}x no speculation "
                  f"(alpha {alpha}, {r['drafted']} drafted), identical output: {r['outputs_equal_to_none']}")
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
