"""Correctness and speed of helix on an accelerator, in one run that writes one JSON file.

Correctness
  1. every supported architecture (tiny seeded models, float32, TF32 off): greedy generation through
     the whole engine on the device equals transformers `generate` on the same device, and prompt
     logprobs match transformers' log-softmax;
  2. batch invariance: 16 staggered requests on a KV pool small enough to force preemption give
     each request exactly its solo output;
  3. speculative equality: greedy with a draft model equals greedy without it (in the speed
     section's dtype, at batch 1 and 16).
Speed (a TinyLlama-1.1B-shaped Llama with random weights, bfloat16 on a GPU)
  4. the device's memory bandwidth, from timed copies of a large buffer;
  5. batch-1 decode: seconds per token against the bandwidth bound (the bytes a step streams:
     every weight but the embedding table, plus the KV cache it reads);
  6. 64 concurrent requests through helix against transformers `generate` on them as one static
     left-padded batch (requested tokens only);
  7. speculative decoding with a 2-layer draft (the target's first layers), 4 drafts per step, at
     batch 1 and 16;
  8. batch-1 decode with CUDA graphs off (`enforce_eager`), for what the graphs buy;
  9. greedy with and without the draft in float32 (TF32 off), batch 1 and 16;
 10. the same model served over HTTP (`helix-server serve`, streamed `/v1/completions`, the
     workload of `peer_serving.py`): batch-1 decode and 16 concurrent requests.

Each section's result (or its error, with the traceback) is written to the JSON file as soon as it
is known, so a run that is stopped or fails part-way still leaves what it measured.

    python bench/device_check.py --device cuda --out device_check.json      # on a GPU: everything
    python bench/device_check.py --device cpu --tiny --out /tmp/check.json  # a small smoke run

`--tiny` shrinks every model and workload so that the whole script runs on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from device_models import TINY_SHAPE, TINYLLAMA_SHAPE, random_llama_pair, weight_bytes
from greedy_runs import drafted_accepted

from helix_server import LLM, SamplingParams
from helix_server.default_model import build_bpe_tokenizer, default_corpus
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from tests.fixtures.tiny_models import ARCH_PRESETS, make_tiny_model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(*objects) -> None:
    """Drop engines and models before the next one loads (the GPU holds one at a time)."""
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def tiny_model(root: Path, tokenizer_dir: Path, arch: str) -> Path:
    out = root / arch
    make_tiny_model(out, arch, vocab_size=512, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


def check_architectures(root: Path, tokenizer_dir: Path, device: str, tiny: bool) -> dict:
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(3, 60))] for _ in range(2 if tiny else 5)]
    max_tokens = 8 if tiny else 24
    results = {}
    for arch in ARCH_PRESETS:
        model_dir = tiny_model(root, tokenizer_dir, arch)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        hf.generation_config.eos_token_id = None
        expected = []
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([prompt], device=device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
                expected.append(out[0, len(prompt) :].tolist())
            reference = torch.log_softmax(hf(torch.tensor([prompts[0]], device=device)).logits[0].float(), -1).cpu()
        release(hf)
        llm = LLM(model=str(model_dir), dtype="float32", device=device, block_size=8, num_kv_blocks=128)
        got = [r.outputs[0].token_ids for r in llm.generate(prompts, greedy(max_tokens))]
        scored = llm.generate([prompts[0]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        release(llm)
        diffs = [
            abs(entry.logprob - reference[i, prompts[0][i + 1]].item())
            for i, entry in enumerate(scored.prompt_logprobs[1:])
        ]
        results[arch] = {"greedy_equal": got == expected, "prompt_logprob_max_abs_diff": max(diffs)}
        print(arch, results[arch], flush=True)
    return results


def check_batch_invariance(model_dir: Path, device: str) -> dict:
    rng = random.Random(7)
    workload = [([rng.randrange(3, 500) for _ in range(rng.randint(2, 90))], rng.randint(4, 40)) for _ in range(16)]
    solo_llm = LLM(model=str(model_dir), dtype="float32", device=device, num_kv_blocks=256)
    solo = [solo_llm.generate([p], greedy(n))[0].outputs[0].token_ids for p, n in workload]
    release(solo_llm)
    config = engine_config_from_settings(
        str(model_dir), dtype="float32", device=device, block_size=8, num_kv_blocks=16,
        max_num_batched_tokens=32, max_num_seqs=16,
    )
    engine = EngineCore(config)
    arrivals = sorted((rng.randint(0, 30), i) for i in range(len(workload)))
    results: dict[int, list[int]] = {i: [] for i in range(len(workload))}
    step = 0
    while arrivals or engine.has_unfinished_requests():
        while arrivals and arrivals[0][0] <= step:
            _, i = arrivals.pop(0)
            engine.add_request(str(i), workload[i][0], greedy(workload[i][1]))
        for output in engine.step():
            results[int(output.request_id)].extend(output.outputs[0].token_ids)
        step += 1
    same = sum(results[i] == solo[i] for i in range(len(workload)))
    out = {"equal_to_solo": f"{same}/{len(workload)}", "preemptions": engine.stats().num_preemptions_total}
    release(engine)
    print("batch invariance", out, flush=True)
    return out


def memory_bandwidth(device: str, num_bytes: int, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of `repeats`."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        best = min(best, time.perf_counter() - start)
    release(source, target)
    return 2 * num_bytes / best


def workload(num: int, vocab: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]):
    rng = random.Random(seed)
    return [
        ([rng.randrange(10, vocab - 10) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
        for _ in range(num)
    ]


def timed(device: str, fn):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def decode_batch1(
    llm: LLM, model_dir: Path, device: str, dtype: torch.dtype, bandwidth: float, new_tokens: int, shape: dict
) -> dict:
    """Seconds per decoded token at batch 1 (a 16-token prompt; the difference between generating
    `new_tokens` and 1 token, so the prompt does not count), median of 3, against the bound."""
    prompt = list(range(10, 26))
    per_token = []
    for _ in range(3):
        one, _ = timed(device, lambda: llm.generate([prompt], greedy(1)))
        many, _ = timed(device, lambda: llm.generate([prompt], greedy(new_tokens)))
        per_token.append((many - one) / (new_tokens - 1))
    seconds = statistics.median(per_token)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    element = torch.empty((), dtype=dtype).element_size()
    mean_context = len(prompt) + new_tokens / 2
    kv = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * element * mean_context
    # Every weight but the embedding table (a step reads one row of it), plus the KV cache read.
    streamed = weight_bytes(model_dir) - shape["vocab_size"] * shape["hidden_size"] * element + kv
    bound = streamed / bandwidth
    out = {
        "seconds_per_token": seconds,
        "tokens_per_s": 1 / seconds,
        "bytes_per_step": streamed,
        "bound_seconds_per_token": bound,
        "fraction_of_bandwidth_bound": bound / seconds,
    }
    print("batch-1 decode", out, flush=True)
    return out


def host_syncs(llm: LLM, device: str, new_tokens: int) -> dict | None:
    """Device-to-host synchronisations torch reports (`set_sync_debug_mode`) while one request
    decodes `new_tokens` tokens, each with the helix line that caused it; CUDA only (None elsewhere)."""
    if not device.startswith("cuda"):
        return None
    import collections
    import traceback as tb
    import warnings

    where: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message) and "prototype" not in str(message):
            frames = [f for f in tb.extract_stack() if "helix_server" in f.filename]
            where[f"{frames[-1].filename.split('helix_server/')[-1]}:{frames[-1].lineno}" if frames else "?"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.generate([list(range(10, 26))], greedy(new_tokens))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    out = {"syncs": sum(where.values()), "generated_tokens": new_tokens, "where": dict(where)}
    print("host syncs", out, flush=True)
    return out


def eager_profile(llm: LLM, device: str, new_tokens: int) -> dict:
    """torch.profiler's top operators (by self CPU time) while one request decodes eagerly."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        llm.generate([list(range(10, 26))], greedy(new_tokens))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    print(table, flush=True)
    return {"generated_tokens": new_tokens, "top_self_cpu": table}


def concurrent_vs_hf(llm: LLM, model_dir: Path, device: str, dtype: torch.dtype, requests) -> dict:
    """All requests at once through helix, then through transformers as one left-padded batch."""
    from transformers import AutoModelForCausalLM

    requested = sum(n for _, n in requests)
    helix_seconds, _ = timed(
        device, lambda: llm.generate([p for p, _ in requests], [greedy(n) for _, n in requests])
    )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    longest = max(len(p) for p, _ in requests)
    ids = torch.zeros(len(requests), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(requests):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    max_new = max(n for _, n in requests)
    with torch.inference_mode():
        hf.generate(ids[:1, -8:].to(device), attention_mask=mask[:1, -8:].to(device), max_new_tokens=2)
        hf_seconds, _ = timed(device, lambda: hf.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, min_new_tokens=max_new,
            do_sample=False,
        ))
    release(hf)
    out = {
        "num_requests": len(requests),
        "requested_tokens": requested,
        "helix_tokens_per_s": requested / helix_seconds,
        "hf_padded_batch_tokens_per_s": requested / hf_seconds,
        "helix_over_hf": hf_seconds / helix_seconds,
    }
    print("concurrent", out, flush=True)
    return out


def speculative(base: LLM, spec: LLM, device: str, prompts_by_batch: dict[int, list[list[int]]], max_tokens: int) -> dict:
    """Greedy with the draft against without it: the same tokens, and the time it takes."""
    out = {}
    for batch, prompts in prompts_by_batch.items():
        base_s, base_out = timed(device, lambda p=prompts: base.generate(p, greedy(max_tokens)))
        before = spec.engine.stats()
        spec_s, spec_out = timed(device, lambda p=prompts: spec.generate(p, greedy(max_tokens)))
        after = spec.engine.stats()
        drafted, accepted = drafted_accepted(before, after)
        same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(base_out, spec_out))
        out[f"batch_{batch}"] = {
            "greedy_equal": f"{same}/{len(prompts)}",
            "speedup": base_s / spec_s,
            "acceptance_rate": accepted / drafted if drafted else None,
            "base_tokens_per_s": batch * max_tokens / base_s,
            "spec_tokens_per_s": batch * max_tokens / spec_s,
        }
        print("speculative", batch, out[f"batch_{batch}"], flush=True)
    return out


def speed(root: Path, tokenizer_dir: Path, device: str, tiny: bool) -> dict:
    shape = TINY_SHAPE if tiny else TINYLLAMA_SHAPE
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    target, draft = random_llama_pair(root / "speed", shape, dtype, device, tokenizer_dir)
    report = {"model_shape": shape, "dtype": dtype_name}
    report["memory_bandwidth_gb_s"] = memory_bandwidth(device, (64 if tiny else 2048) << 20) / 1e9
    print("memory bandwidth GB/s", report["memory_bandwidth_gb_s"], flush=True)
    num_requests = 8 if tiny else 64
    requests = workload(num_requests, shape["vocab_size"], 0, (16, 96 if tiny else 512), (8, 32) if tiny else (32, 256))
    max_tokens = 16 if tiny else 128
    spec_prompts = {b: [p[:64] for p, _ in requests[:b]] for b in (1, 4 if tiny else 16)}
    settings = {"dtype": dtype_name, "device": device, "max_num_seqs": num_requests, "enable_prefix_caching": False,
                    "num_kv_blocks": num_requests * (1024 // 16)}
    llm = LLM(model=str(target), **settings)
    llm.generate([requests[0][0][:16]], greedy(4))  # warm-up (kernels, graphs, allocator)
    bandwidth = report["memory_bandwidth_gb_s"] * 1e9
    report["decode_batch1"] = decode_batch1(llm, target, device, dtype, bandwidth, 16 if tiny else 128, shape)
    report["host_syncs_batch1"] = host_syncs(llm, device, 16)
    spec = LLM(model=str(target), draft_model=str(draft), num_speculative_tokens=4, **settings)
    spec.generate([requests[0][0][:16]], greedy(4))
    report["speculative"] = speculative(llm, spec, device, spec_prompts, max_tokens)
    release(spec)
    report["concurrent"] = concurrent_vs_hf(llm, target, device, dtype, requests)
    release(llm)
    if device.startswith("cuda"):
        eager = LLM(model=str(target), enforce_eager=True, **settings)
        eager.generate([requests[0][0][:16]], greedy(4))
        report["decode_batch1_eager"] = decode_batch1(eager, target, device, dtype, bandwidth, 128, shape)
        report["eager_profile"] = eager_profile(eager, device, 8)
        release(eager)
    return report


def speculative_float32(root: Path, tokenizer_dir: Path, device: str, tiny: bool) -> dict:
    """Greedy with and without the draft in float32 (TF32 off), at batch 1 and 16: whether the
    speculative equality that bfloat16 loses on this device holds at full precision."""
    shape = TINY_SHAPE if tiny else TINYLLAMA_SHAPE
    target, draft = random_llama_pair(root / "speed32", shape, torch.float32, device, tokenizer_dir)
    requests = workload(16, shape["vocab_size"], 0, (16, 96), (8, 32))
    settings = {"dtype": "float32", "device": device, "max_num_seqs": 16, "enable_prefix_caching": False,
                "num_kv_blocks": 16 * (1024 // 16)}
    base = LLM(model=str(target), **settings)
    spec = LLM(model=str(target), draft_model=str(draft), num_speculative_tokens=4, **settings)
    out = speculative(base, spec, device, {1: [requests[0][0]], 16: [p for p, _ in requests]}, 16 if tiny else 64)
    release(base, spec)
    return out


def over_http(model_dir: Path, device: str, dtype: str, tiny: bool) -> dict:
    """The model behind `helix-server serve`: streamed greedy `/v1/completions` (`ignore_eos`),
    batch 1 and concurrent. Tokens are counted from `return_token_ids` (ids past the small
    tokenizer's vocabulary decode to no text, so text chunks would undercount them)."""
    import asyncio

    import httpx
    from peer_serving import Server, free_port, text_of

    async def stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True}
        start, arrivals = time.perf_counter(), []  # (time, tokens in the chunk)
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("token_ids"):
                        arrivals.append((time.perf_counter(), len(choices[0]["token_ids"])))
        if sum(n for _, n in arrivals) != max_tokens:
            raise RuntimeError(f"streamed {sum(n for _, n in arrivals)} token ids for max_tokens={max_tokens}")
        return {"start": start, "arrivals": arrivals}

    async def batch_one(server: Server, requests: int, max_tokens: int) -> dict:
        rng, rates, ttfts, chunks = random.Random(0), [], [], []
        async with httpx.AsyncClient(timeout=600) as client:
            await stream(client, server.url, text_of(20, rng), 16)  # warm-up
            for _ in range(requests):
                got = await stream(client, server.url, text_of(20, rng), max_tokens)
                (first, n_first), (last, _) = got["arrivals"][0], got["arrivals"][-1]
                ttfts.append(first - got["start"])
                rates.append((max_tokens - n_first) / (last - first))
                chunks.append(len(got["arrivals"]))
        return {"decode_tok_s": statistics.median(rates), "ttft_s": statistics.median(ttfts), "rates": rates,
                "chunks_per_request": chunks}

    async def concurrent(server: Server, count: int) -> dict:
        rng = random.Random(1)
        jobs = [(text_of(rng.randint(16, 256), rng), rng.randint(32, 128 if tiny else 256)) for _ in range(count)]
        async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=count)) as client:
            start = time.perf_counter()
            await asyncio.gather(*(stream(client, server.url, p, n) for p, n in jobs))
            wall = time.perf_counter() - start
        tokens = sum(n for _, n in jobs)
        return {"num_requests": count, "output_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens}

    port = free_port()
    command = [sys.executable, "-m", "helix_server", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "bench", "--model", str(model_dir), "--device", device, "--dtype", dtype]
    with Server("helix", command, port) as server:
        out = {"batch1": asyncio.run(batch_one(server, 3 if tiny else 5, 32 if tiny else 128))}
        out["concurrent"] = asyncio.run(concurrent(server, 4 if tiny else 16))
    print("http", out, flush=True)
    return out


def section(report: dict, name: str, out: Path, fn) -> None:
    """Run one section; keep its result or its error, and write the report so far."""
    started = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001 (a failing section is a finding; the next ones still run)
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"{name} failed:", report[name]["traceback"], flush=True)
    report.setdefault("section_seconds", {})[name] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="device_check.json")
    parser.add_argument("--tiny", action="store_true", help="small models and workloads (a CPU smoke run)")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all): "
                        "architectures, batch_invariance, speed, speculative_float32, http")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from helix_server.layers.attention.selector import describe_attention_backend

    on_cuda = args.device.startswith("cuda")
    report = {
        "device": torch.cuda.get_device_name(0) if on_cuda else args.device,
        "torch": torch.__version__,
        "attention": describe_attention_backend(args.device),
        "tiny": args.tiny,
    }
    started = time.perf_counter()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer_dir = build_bpe_tokenizer(root / "tokenizer", vocab_size=512, corpus=default_corpus(200_000))
        only = set(filter(None, args.only.split(",")))

        def wanted(name: str, skipped: bool) -> bool:
            return name in only if only else not skipped

        if wanted("architectures", args.skip_correctness):
            section(report, "architectures", out, lambda: check_architectures(root, tokenizer_dir, args.device, args.tiny))
        if wanted("batch_invariance", args.skip_correctness):
            if not (root / "llama").exists():
                tiny_model(root, tokenizer_dir, "llama")
            section(report, "batch_invariance", out, lambda: check_batch_invariance(root / "llama", args.device))
        if wanted("speed", args.skip_speed):
            section(report, "speed", out, lambda: speed(root, tokenizer_dir, args.device, args.tiny))
        if wanted("speculative_float32", args.skip_correctness):
            section(report, "speculative_float32", out,
                    lambda: speculative_float32(root, tokenizer_dir, args.device, args.tiny))
        if wanted("http", args.skip_http):
            dtype = "float32" if args.device == "cpu" else "bfloat16"
            if not (root / "speed" / "target").exists():
                shape = TINY_SHAPE if args.tiny else TINYLLAMA_SHAPE
                random_llama_pair(root / "speed", shape, getattr(torch, dtype), args.device, tokenizer_dir)
            section(report, "http", out, lambda: over_http(root / "speed" / "target", args.device, dtype, args.tiny))
    report["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2))
    print("wrote", args.out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
