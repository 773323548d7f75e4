"""helix's CPU attention kernels for short queries (`helix::paged_query_attention`, and in bfloat16 on
CPUs with AMX `helix::paged_query_attention_amx`, the one helix runs there): milliseconds per call,
and the rates they mean, for decode rows of SmolLM2-135M's attention shape.

Each case is `--requests` requests of one query token each (a decode step's rows) over the same
number of keys, in float32 and bfloat16 (on both kernels where AMX is present): 9 query heads over 3 KV heads of 64 values, 16-token
blocks scattered at random over the pool, as a pool that has served for a while holds them. Per
case: the median of `--repeats` timed calls after 3 warm-ups, GFLOP/s (a score and a weighted
value per query head and key: 4 x head_dim flops) and the KV bytes read per second. Both threads
(`--threads`). Results move with other load on the machine.

    python bench/paged_attention.py [--requests 16] [--keys 600,1000] [--repeats 30] [--out bench/results/paged_attention.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_results import save_results
from quant_kernels import median_us

from helix_server.layers.cpu_kernels import load_cpu_kernels
from helix_server.layers.panel_linear import amx_available

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16


def time_case(
    dtype: torch.dtype, kernel: str, requests: int, keys: int, repeats: int, generator: torch.Generator
) -> dict:
    blocks_per_request = -(-keys // BLOCK_SIZE)
    num_blocks = requests * blocks_per_request + 8
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=generator)[: requests * blocks_per_request]
    block_tables = block_tables.view(requests, blocks_per_request)  # [requests, blocks] int64
    seq_lens = torch.full((requests,), keys, dtype=torch.long)
    query = torch.randn(requests, HEADS, HEAD_DIM, generator=generator).to(dtype)  # one token per request
    op = getattr(torch.ops.helix, "paged_query_attention_amx" if kernel == "amx" else "paged_query_attention").default

    def call() -> torch.Tensor:
        return op(query, key_cache, value_cache, block_tables, seq_lens, 1, HEAD_DIM**-0.5, 0)

    call()
    call()  # with median_us's own, 3 warm-ups
    seconds = median_us(call, repeats) / 1e6
    flops = requests * HEADS * keys * HEAD_DIM * 4
    kv_bytes = requests * keys * KV_HEADS * HEAD_DIM * 2 * key_cache.element_size()
    return {"dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "requests": requests, "keys": keys, "ms": seconds * 1e3,
            "gflop_s": flops / seconds / 1e9, "kv_gb_s": kv_bytes / seconds / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--keys", default="600,1000", help="comma-separated numbers of keys per request")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "paged_attention.json"))
    args = parser.parse_args()
    if not load_cpu_kernels():
        raise SystemExit("helix's CPU kernels are not available here (x86-64 Linux with AVX-512 and a C++ compiler)")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    cases = []
    with torch.inference_mode():
        kernels = [(torch.float32, "avx512"), (torch.bfloat16, "avx512")]
        if amx_available():
            kernels.append((torch.bfloat16, "amx"))
        for dtype, kernel in kernels:
            for keys in (int(k) for k in args.keys.split(",")):
                case = time_case(dtype, kernel, args.requests, keys, args.repeats, generator)
                cases.append(case)
                print(f"{case['dtype']:>8} ({kernel}), {args.requests} rows x {keys} keys: {case['ms']:.3f} ms per call "
                      f"({case['gflop_s']:.1f} GFLOP/s, KV read at {case['kv_gb_s']:.1f} GB/s)", flush=True)
    save_results({"threads": args.threads, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "cases": cases}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
