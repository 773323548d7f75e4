"""llguidance (helix's grammar backend) against xgrammar on this machine, for JSON-schema outputs.

On the benchmark model's tokenizer (byte-level BPE, 32,000 tokens), for each of
`structured_outputs.TYPICAL_SCHEMAS`: the compile time (a cold cache each time; median of
`--repeats`), and the per-token cost of decoding a valid instance with the schema enforced: for
each token, fill the bitmask of allowed next tokens, then advance the matcher by the token (the
work a constrained request adds to a decode step). Also the one-off tokenizer setup of each. xgrammar
is not a helix dependency: install it to run this (`pip install xgrammar`); helix itself never
imports it.

    python bench/grammar_backends.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import bench_model_dir  # noqa: E402
from bench_results import save_results  # noqa: E402
from structured_outputs import TYPICAL_SCHEMAS  # noqa: E402

# A valid instance of each schema: the text a constrained decode walks through.
INSTANCES = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"},
    "order": {"id": "ABC-123456", "items": [{"sku": "x-1", "qty": 2, "price": 9.5}, {"sku": "y-2", "qty": 1}],
              "status": "paid"},
    "tool_args": {"city": "Paris", "unit": "celsius", "days": 3, "options": {"hourly": True}},
}


def milliseconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def llguidance_backend(hf_tokenizer):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer)
    setup_ms = (time.perf_counter() - start) * 1000

    def compile_schema(schema: dict):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                defaults={"whitespace_flexible": False})
        return llguidance.LLMatcher(tokenizer, grammar)

    def walk(matcher, token_ids: list[int]) -> None:
        bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
        for token in token_ids:
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            assert matcher.consume_token(token), "the instance must be valid"

    return setup_ms, compile_schema, compile_schema, walk


def xgrammar_backend(hf_tokenizer, vocab_size: int):
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
    setup_ms = (time.perf_counter() - start) * 1000

    def compile_cold(schema: dict):  # a new compiler: no cache between repeats
        return xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def matcher_for(schema: dict):
        return xgr.GrammarMatcher(compile_cold(schema))

    def walk(matcher, token_ids: list[int]) -> None:
        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        for token in token_ids:
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(token), "the instance must be valid"

    return setup_ms, compile_cold, matcher_for, walk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grammar_backends.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(bench_model_dir())
    vocab_size = len(hf_tokenizer)
    backends = {"llguidance": llguidance_backend(hf_tokenizer)}
    try:
        backends["xgrammar"] = xgrammar_backend(hf_tokenizer, vocab_size)
    except ImportError as exc:
        print(f"xgrammar not installed ({exc}): measuring llguidance only")
    results: dict = {"vocab_size": vocab_size, "repeats": args.repeats, "backends": {}}
    for name, (setup_ms, compile_schema, new_matcher, walk) in backends.items():
        entry: dict = {"tokenizer_setup_ms": round(setup_ms, 1), "schemas": {}}
        for schema_name, schema in TYPICAL_SCHEMAS.items():
            text = json.dumps(INSTANCES[schema_name], separators=(",", ":"))
            token_ids = hf_tokenizer.encode(text, add_special_tokens=False)
            compile_ms = milliseconds(lambda c=compile_schema, s=schema: c(s), args.repeats)
            walks = []
            for _ in range(args.repeats):
                matcher = new_matcher(schema)
                start = time.perf_counter()
                walk(matcher, token_ids)
                walks.append((time.perf_counter() - start) * 1e6 / len(token_ids))
            entry["schemas"][schema_name] = {"compile_ms": round(compile_ms, 3),
                                             "us_per_token": round(statistics.median(walks), 1),
                                             "tokens": len(token_ids)}
            print(f"{name:>10} {schema_name:>9}: compile {compile_ms:7.2f} ms, "
                  f"mask + advance {statistics.median(walks):6.1f} us a token ({len(token_ids)} tokens)")
        print(f"{name:>10} tokenizer setup {setup_ms:.0f} ms")
        results["backends"][name] = entry
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
