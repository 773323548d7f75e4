"""Prefix caching: a long shared system prompt and many short questions, caching on vs off, in one run;
and the KV memory the paged pool wastes at steady state.

Model: the seeded random-weight ~100M Llama of bench/throughput.py (float32, block size 16). Two
engines on the same weights, one with prefix caching and one without, measured alternately:

1. Time to first token, one request at a time: a 1,000-token system prompt (seen once before, as
   a client's earlier request would have) plus a 10-30-token question, 16 output tokens.
2. Throughput: 16 requests sharing another, never-seen 1,000-token system prompt, all at once
   (`LLM.generate`): requests/s and generated tokens/s. The greedy outputs must be identical with
   and without caching.
3. KV waste at steady state: allocated KV slots not holding a live token, over allocated slots,
   for the paged pool (block size 16) and for a contiguous buffer per request of max_model_len
   (and of exactly prompt + max_tokens). Measured with the engine's own scheduler and block pool
   driven by a stub model (allocation does not depend on the model's numbers): a closed loop of
   16 concurrent requests (prompts of 64-1,024 tokens, outputs of 32-256), sampled every step once
   the loop is full.

    python bench/prefix_cache.py [--questions 12] [--threads N] [--out bench/results/prefix_cache.json]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import BENCH_VOCAB, bench_model_dir  # noqa: E402
from bench_results import save_results  # noqa: E402

from helix_server import LLM, SamplingParams  # noqa: E402
from helix_server.config import SchedulerConfig  # noqa: E402
from helix_server.step_contract import ModelRunnerOutput  # noqa: E402
from helix_server.scheduler import Request, RequestStatus, Scheduler  # noqa: E402

BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048
OUTPUT_TOKENS = 16


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(10, BENCH_VOCAB - 10) for _ in range(n)]


def _greedy(max_tokens: int = OUTPUT_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def time_to_first_token(llm: LLM, prompt: list[int], request_id: str) -> tuple[float, list[int]]:
    """Seconds from adding the request to its first token, and all its tokens."""
    engine = llm.engine
    started = time.perf_counter()
    engine.add_request(request_id, prompt, _greedy())
    ttft, tokens = None, []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens += output.outputs[0].token_ids
            if ttft is None and tokens:
                ttft = time.perf_counter() - started
    return ttft, tokens


def measure_ttft(llms: dict[str, LLM], system: list[int], questions: list[list[int]]) -> dict:
    for name, llm in llms.items():  # the system prompt seen once before (and a warm-up)
        time_to_first_token(llm, system + [11, 12, 13], f"prime-{name}")
    ttfts: dict[str, list[float]] = {name: [] for name in llms}
    outputs: dict[str, list[list[int]]] = {name: [] for name in llms}
    for i, question in enumerate(questions):
        for name, llm in llms.items():  # alternate, so drift hits both alike
            ttft, tokens = time_to_first_token(llm, system + question, f"ttft-{name}-{i}")
            ttfts[name].append(ttft)
            outputs[name].append(tokens)
    median = {name: statistics.median(values) for name, values in ttfts.items()}
    return {
        "median_s": median,
        "mean_s": {name: statistics.fmean(values) for name, values in ttfts.items()},
        "ratio_off_over_on": median["caching_off"] / median["caching_on"],
        "outputs_equal": outputs["caching_on"] == outputs["caching_off"],
    }


def measure_throughput(llms: dict[str, LLM], system: list[int], questions: list[list[int]]) -> dict:
    prompts = [system + q for q in questions]
    result: dict = {"requests": len(prompts), "requests_per_s": {}, "output_tokens_per_s": {}, "seconds": {}}
    outputs = {}
    for name, llm in llms.items():
        started = time.perf_counter()
        generated = llm.generate(prompts, _greedy())
        elapsed = time.perf_counter() - started
        outputs[name] = [g.outputs[0].token_ids for g in generated]
        result["seconds"][name] = elapsed
        result["requests_per_s"][name] = len(prompts) / elapsed
        result["output_tokens_per_s"][name] = sum(len(o) for o in outputs[name]) / elapsed
        if name == "caching_on":
            result["cached_prompt_tokens"] = sum(g.num_cached_tokens for g in generated)
    result["speedup"] = result["seconds"]["caching_off"] / result["seconds"]["caching_on"]
    result["outputs_equal"] = outputs["caching_on"] == outputs["caching_off"]
    return result


def measure_kv_waste(seed: int, concurrency: int = 16, num_requests: int = 400) -> dict:
    """Closed loop on the real scheduler and block pool with a stub model (one token per sample)."""
    rng = random.Random(seed)
    num_blocks = concurrency * MAX_MODEL_LEN // BLOCK_SIZE  # room for everyone: no preemption
    config = SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=concurrency)
    scheduler = Scheduler(config, BLOCK_SIZE, num_blocks, enable_caching=False)
    kv = scheduler.kv_cache_manager
    targets: dict[str, int] = {}  # request id -> prompt + max_tokens
    added = 0
    paged_allocated = paged_live = contiguous_max = contiguous_exact = 0
    while added < num_requests or scheduler.has_unfinished_requests():
        while added < num_requests and len(scheduler.requests) < concurrency:
            prompt_len, max_tokens = rng.randint(64, 1024), rng.randint(32, 256)
            request = Request(f"r{added}", _tokens(rng, prompt_len))
            targets[request.request_id] = prompt_len + max_tokens
            scheduler.add_request(request)
            added += 1
        output = scheduler.schedule()
        sampled = {s.request_id: [7] for s in output.scheduled if s.samples}
        updated = scheduler.update_from_output(output, ModelRunnerOutput(sampled_token_ids=sampled))
        done = [r.request_id for r in updated if r.num_tokens >= targets[r.request_id]]
        # Sample the steady state: a full loop, every request admitted and past its first step.
        running = scheduler.running
        if len(running) == concurrency and added < num_requests:
            held = {b.block_id for r in running for b in kv.get_blocks(r.request_id)}
            paged_allocated += len(held) * BLOCK_SIZE
            live = sum(r.num_computed_tokens for r in running)
            paged_live += live
            contiguous_max += concurrency * MAX_MODEL_LEN
            contiguous_exact += sum(targets[r.request_id] for r in running)
        scheduler.finish_requests(done, RequestStatus.FINISHED_LENGTH)
    return {
        "block_size": BLOCK_SIZE,
        "concurrency": concurrency,
        "paged": 1 - paged_live / paged_allocated,
        "contiguous_max_model_len": 1 - paged_live / contiguous_max,
        "contiguous_prompt_plus_max_tokens": 1 - paged_live / contiguous_exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefix_cache.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = random.Random(args.seed)
    model_dir = bench_model_dir()
    settings = {"dtype": "float32", "block_size": BLOCK_SIZE, "num_kv_blocks": 1400, "max_model_len": MAX_MODEL_LEN}
    llms = {
        "caching_on": LLM(model=str(model_dir), enable_prefix_caching=True, **settings),
        "caching_off": LLM(model=str(model_dir), enable_prefix_caching=False, **settings),
    }
    questions = [_tokens(rng, rng.randint(10, 30)) for _ in range(args.questions)]
    system_a, system_b = _tokens(rng, args.system_tokens), _tokens(rng, args.system_tokens)

    ttft = measure_ttft(llms, system_a, questions)
    print(f"TTFT median: on {ttft['median_s']['caching_on'] * 1e3:.0f} ms, off "
          f"{ttft['median_s']['caching_off'] * 1e3:.0f} ms ({ttft['ratio_off_over_on']:.1f}x lower with caching)")
    throughput = measure_throughput(llms, system_b, [_tokens(rng, rng.randint(10, 30)) for _ in range(16)])
    print(f"16 concurrent: on {throughput['seconds']['caching_on']:.2f} s, off "
          f"{throughput['seconds']['caching_off']:.2f} s ({throughput['speedup']:.1f}x); "
          f"{throughput['output_tokens_per_s']['caching_on']:.0f} vs "
          f"{throughput['output_tokens_per_s']['caching_off']:.0f} generated tokens/s")
    waste = measure_kv_waste(args.seed)
    print(f"KV waste at steady state: paged {waste['paged']:.2%}, contiguous max_model_len "
          f"{waste['contiguous_max_model_len']:.2%}, contiguous prompt+max_tokens "
          f"{waste['contiguous_prompt_plus_max_tokens']:.2%}")

    result = {
        "model_dir": str(model_dir),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "system_prompt_tokens": args.system_tokens,
        "output_tokens": OUTPUT_TOKENS,
        "targets": {"ttft_ratio_off_over_on": 3.0, "paged_kv_waste_max": 0.05},
        "ttft": ttft,
        "throughput": throughput,
        "kv_waste": waste,
    }
    save_results(result, args.out)


if __name__ == "__main__":
    main()
