"""Structured outputs: the cost of a grammar against free decoding, and grammar compile times.

The model is `bench_models.bench_model_dir()` (the ~100M random Llama, vocabulary 32000, so masks
have a realistic width). Both runs decode exactly `--max-tokens` tokens per request: the free run
ignores EOS, the constrained one writes a JSON string field the random model never closes
(`{"text": "...`), so the grammar is consulted at every step. Greedy, no speculation, one request at
a time (batch 1) and `--concurrent` json_schema requests at once; the runs interleave and the
fastest of `--repeats` compares (the machine is shared and noisy). Compile times: each schema
compiled `--compiles` times into an empty cache (p50 / p99, milliseconds).

    python bench/structured_outputs.py [--max-tokens 32] [--repeats 3] [--concurrent 16]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import bench_model_dir
from bench_results import save_results

from helix_server import LLM, SamplingParams
from helix_server.sampling_params import StructuredOutputSpec

OPEN_STRING = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
TYPICAL_SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "email": {"type": "string", "format": "email"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "qty": {"type": "integer", "minimum": 1},
                        "price": {"type": "number"},
                    },
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
            },
            "status": {"enum": ["new", "paid", "shipped"]},
        },
        "required": ["id", "items", "status"],
    },
    "tool_args": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "options": {
                "anyOf": [{"type": "null"}, {"type": "object", "properties": {"hourly": {"type": "boolean"}}}]
            },
        },
        "required": ["city"],
    },
}


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def decode_comparison(llm: LLM, args, num_requests: int) -> dict:
    rng = random.Random(num_requests)
    prompts = [[rng.randrange(10, 31000) for _ in range(24)] for _ in range(num_requests)]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, speculation_depth=0)
    spec = StructuredOutputSpec("json", json.dumps(OPEN_STRING), param="response_format")
    constrained = SamplingParams(
        temperature=0, max_tokens=args.max_tokens, structured_output=spec, speculation_depth=0
    )
    best = {"free": (float("inf"), 0), "json_schema": (float("inf"), 0)}
    timed(llm, prompts, free)  # warm up both paths
    timed(llm, prompts, constrained)
    for _ in range(args.repeats):
        for name, params in (("free", free), ("json_schema", constrained)):
            seconds, tokens = timed(llm, prompts, params)
            if seconds < best[name][0]:
                best[name] = (seconds, tokens)
    result = {
        name: {"seconds": round(s, 4), "tokens": t, "tokens_per_s": round(t / s, 1)}
        for name, (s, t) in best.items()
    }
    result["slowdown"] = round(result["free"]["tokens_per_s"] / result["json_schema"]["tokens_per_s"] - 1, 4)
    return result


def compile_times(llm: LLM, repeats: int) -> dict:
    backend = llm.engine.structured
    _ = backend.ll_tokenizer  # built once per server, not per schema
    out = {}
    for name, schema in TYPICAL_SCHEMAS.items():
        spec = StructuredOutputSpec("json", json.dumps(schema))
        times = []
        for _ in range(repeats):
            backend._cache.clear()
            started = time.perf_counter()
            backend.compile(spec)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        out[name] = {
            "p50_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[int(0.99 * (len(times) - 1))], 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--compiles", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    llm = LLM(model=str(bench_model_dir()), dtype="float32", speculative_method="none")
    results = {
        "batch_1": decode_comparison(llm, args, 1),
        f"concurrent_{args.concurrent}": decode_comparison(llm, args, args.concurrent),
        "compile": compile_times(llm, args.compiles),
        "settings": vars(args) | {"out": str(args.out)},
    }
    print(json.dumps(results, indent=2))
    if args.out is not None:
        save_results(results, args.out)


if __name__ == "__main__":
    main()
