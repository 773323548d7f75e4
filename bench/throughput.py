"""Offline throughput: helix_server vs transformers `generate` on the same model, in one run.

The model is a seeded random-weight Llama of about 100M parameters (built once into a cache
folder); the workload is seeded: 16 requests with prompts of 16-512 random tokens and requested
outputs of 32-256 tokens (`ignore_eos`, greedy). Only requested tokens count.

Scenarios, each measured here, now, on this machine, once per dtype (float32 and bfloat16 by
default; transformers runs in the same dtype as helix):
  1. batch 1: the requests one at a time, helix vs transformers `generate`;
  2. 16 concurrent requests through helix vs transformers generating them one at a time
     (the sum of scenario 1's transformers times) and vs transformers `generate` on the 16
     prompts as one left-padded batch (run until the longest requested output).
Measurements are interleaved (request by request for scenario 1, and `--repeats` runs of each
concurrent scenario spread over that loop, medians reported), so that the slower and faster
spells of a shared machine hit both sides alike. Prefix caching is off: every run computes every
prompt, as transformers does.

    python bench/throughput.py [--num-requests 16] [--repeats 3] [--out bench/results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import bench_model_dir  # noqa: E402
from bench_results import save_results  # noqa: E402

from helix_server import LLM, SamplingParams  # noqa: E402
from helix_server.platform.process_policy import freeze_loaded_objects  # noqa: E402


def make_workload(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, requested output length) per request, from a seeded generator."""
    rng = random.Random(seed)
    workload = []
    for _ in range(num_requests):
        prompt_len = rng.randint(16, 512)
        output_len = rng.randint(32, 256)
        # Avoid the special ids at the top of the vocabulary (tokenizer specials) and id 0.
        prompt = [rng.randint(10, vocab_size - 10) for _ in range(prompt_len)]
        workload.append((prompt, output_len))
    return workload


def helix_generate_one(llm: LLM, prompt: list[int], output_len: int) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0].outputs[0].token_ids
    return time.perf_counter() - start, out


def run_helix_concurrent(llm: LLM, workload) -> tuple[float, list[list[int]]]:
    prompts = [prompt for prompt, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    return time.perf_counter() - start, [r.outputs[0].token_ids for r in results]


def hf_generate_one(model, prompt: list[int], output_len: int) -> tuple[float, list[int]]:
    input_ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
    )
    return time.perf_counter() - start, out[0, len(prompt) :].tolist()


def run_hf_padded_batch(model, workload, pad_id: int) -> float:
    longest = max(len(p) for p, _ in workload)
    input_ids = torch.full((len(workload), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (prompt, _) in enumerate(workload):  # left padding, as decoder-only batching needs
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    max_new = max(n for _, n in workload)
    start = time.perf_counter()
    model.generate(
        input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
    )
    return time.perf_counter() - start


def run_dtype(model_dir, dtype: str, workload, num_requests: int, repeats: int) -> dict:
    """All four scenarios for one dtype (transformers and helix both run in it)."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    # No prefix caching: each request is measured several times here, and a run must not reuse the
    # prompts cached by the one before (transformers recomputes every prompt, as would a first visit).
    llm = LLM(model=str(model_dir), dtype=dtype, max_num_seqs=num_requests, seed=0, enable_prefix_caching=False)
    requested = sum(n for _, n in workload)

    # Warm both up (allocator, kernels) on the largest step each will run: helix a full token
    # budget of prompt (the concurrent run's first step), transformers its longest prompt.
    budget = min(llm.engine.config.scheduler.max_num_batched_tokens, llm.engine.seq_num_tokens_limit - 8)
    warm_prompt = [10 + i % 1000 for i in range(budget)]
    llm.generate([warm_prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    longest = max((p for p, _ in workload), key=len)
    with torch.inference_mode():
        hf_model.generate(torch.tensor([longest]), max_new_tokens=4, do_sample=False)
    # As `helix-server serve` does after loading: keep the long-lived objects (both models, torch,
    # transformers) out of the cyclic garbage collector's full collections.
    freeze_loaded_objects()

    # Interleaved, so that a slower or faster spell of this shared machine hits both sides alike:
    # the requests one at a time alternate transformers and helix request by request, and the
    # concurrent runs (helix, transformers' padded batch) happen `repeats` times spread over that
    # loop; the concurrent numbers are medians.
    hf_times, helix_times, hf_outputs, helix_seq_outputs = [], [], [], []
    helix_conc_times, hf_batch_times = [], []
    checkpoints = {round(i * len(workload) / repeats) for i in range(repeats)}
    for index, (prompt, output_len) in enumerate(workload):
        if index in checkpoints:
            took, helix_conc_outputs = run_helix_concurrent(llm, workload)
            helix_conc_times.append(took)
            with torch.inference_mode():
                hf_batch_times.append(run_hf_padded_batch(hf_model, workload, pad_id=0))
        with torch.inference_mode():
            took, out = hf_generate_one(hf_model, prompt, output_len)
        hf_times.append(took)
        hf_outputs.append(out)
        took, out = helix_generate_one(llm, prompt, output_len)
        helix_times.append(took)
        helix_seq_outputs.append(out)
    del hf_model
    hf_seq_time, helix_seq_time = sum(hf_times), sum(helix_times)
    helix_conc_time, hf_batch_time = statistics.median(helix_conc_times), statistics.median(hf_batch_times)
    print(f"[{dtype}] transformers one at a time: {hf_seq_time:.1f} s, {requested / hf_seq_time:.1f} tok/s")
    print(f"[{dtype}] helix one at a time:        {helix_seq_time:.1f} s, {requested / helix_seq_time:.1f} tok/s")
    print(f"[{dtype}] transformers padded batch:  {hf_batch_time:.1f} s, {requested / hf_batch_time:.1f} tok/s "
          f"(median of {', '.join(f'{t:.1f}' for t in hf_batch_times)})")
    print(f"[{dtype}] helix {num_requests} concurrent:        {helix_conc_time:.1f} s, "
          f"{requested / helix_conc_time:.1f} tok/s (median of {', '.join(f'{t:.1f}' for t in helix_conc_times)})")
    return {
        "tokens_per_s": {
            "hf_one_at_a_time": requested / hf_seq_time,
            "hf_padded_batch": requested / hf_batch_time,
            "helix_one_at_a_time": requested / helix_seq_time,
            "helix_concurrent": requested / helix_conc_time,
        },
        "ratios": {
            "batch1_helix_over_hf": hf_seq_time / helix_seq_time,
            "concurrent_helix_over_hf_one_at_a_time": hf_seq_time / helix_conc_time,
            "concurrent_helix_over_hf_padded_batch": hf_batch_time / helix_conc_time,
        },
        # Random weights give nearly flat distributions, so rounding differences between kernels
        # can flip near-tied greedy choices; these counts are a sanity check, not a target.
        "greedy_outputs_equal_to_hf": f"{sum(a == b for a, b in zip(hf_outputs, helix_seq_outputs))}/{len(workload)}",
        "concurrent_outputs_equal_to_one_at_a_time":
            f"{sum(a == b for a, b in zip(helix_seq_outputs, helix_conc_outputs))}/{len(workload)}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each concurrent scenario (median)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; each runs every scenario")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = parser.parse_args()

    model_dir = bench_model_dir()
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    workload = make_workload(args.num_requests, vocab_size, args.seed)
    requested = sum(n for _, n in workload)
    print(f"model: {model_dir}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(workload)} requests, {requested} requested tokens")
    results = {
        "model_dir": str(model_dir),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "num_requests": len(workload),
        "requested_tokens": requested,
        "repeats": args.repeats,
        "targets": {
            "batch1_helix_over_hf": 1.3,
            "concurrent_helix_over_hf_one_at_a_time": 5.0,
            "concurrent_helix_over_hf_padded_batch": 1.5,
        },
        "by_dtype": {},
    }
    for dtype in args.dtypes.split(","):
        results["by_dtype"][dtype] = run_dtype(model_dir, dtype, workload, args.num_requests, args.repeats)
    summary = {dtype: r["ratios"] | {k: r[k] for k in ("greedy_outputs_equal_to_hf",
                                                        "concurrent_outputs_equal_to_one_at_a_time")}
               for dtype, r in results["by_dtype"].items()}
    print(json.dumps({"targets": results["targets"], "measured": summary}, indent=2))
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
