"""Correctness and speed of helix on an accelerator (CUDA), in one short run.

1. For every supported architecture (tiny seeded models): greedy generation through the whole engine
   on the device equals transformers `generate` on the same device (float32, TF32 off), and prompt
   logprobs match transformers' log-softmax.
2. Batch invariance on the device: 16 staggered requests on a KV pool small enough to force
   preemption give each request exactly its solo output.
3. Throughput of the 125M benchmark model (bench_models.py) in bfloat16: helix vs transformers
   `generate` (one at a time and as one padded batch), same workload as bench/throughput.py.

    python bench/device_check.py [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_models import bench_model_dir  # noqa: E402
from throughput import make_workload, run_hf_one_at_a_time, run_hf_padded_batch  # noqa: E402

from helix_server import LLM, SamplingParams  # noqa: E402
from helix_server.default_model import build_bpe_tokenizer, default_corpus  # noqa: E402
from helix_server.engine.core import EngineCore  # noqa: E402
from helix_server.engine.llm import engine_config_from_settings  # noqa: E402
from tests.fixtures.tiny_models import ARCH_PRESETS, make_tiny_model  # noqa: E402


def tiny_model(root: Path, tokenizer_dir: Path, arch: str) -> Path:
    out = root / arch
    make_tiny_model(out, arch, vocab_size=512, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


def check_architectures(root: Path, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    tokenizer_dir = build_bpe_tokenizer(root / "tokenizer", vocab_size=512, corpus=default_corpus(200_000))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(3, 60))] for _ in range(5)]
    results = {}
    for arch in ARCH_PRESETS:
        model_dir = tiny_model(root, tokenizer_dir, arch)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        hf.generation_config.eos_token_id = None
        expected = []
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([prompt], device=device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
                expected.append(out[0, len(prompt) :].tolist())
            reference = torch.log_softmax(hf(torch.tensor([prompts[0]], device=device)).logits[0].float(), -1)
        llm = LLM(model=str(model_dir), dtype="float32", device=device, block_size=8, num_kv_blocks=128)
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        got = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
        scored = llm.generate([prompts[0]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
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
    solo = [
        solo_llm.generate([p], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids
        for p, n in workload
    ]
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
            engine.add_request(str(i), workload[i][0], SamplingParams(temperature=0, max_tokens=workload[i][1], ignore_eos=True))
        for output in engine.step():
            results[int(output.request_id)].extend(output.outputs[0].token_ids)
        step += 1
    same = sum(results[i] == solo[i] for i in range(len(workload)))
    out = {"equal_to_solo": f"{same}/{len(workload)}", "preemptions": engine.scheduler.num_preemptions_total}
    print("batch invariance", out, flush=True)
    return out


def throughput(device: str, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    model_dir = bench_model_dir()
    workload = make_workload(16, 32000, seed=0)
    requested = sum(n for _, n in workload)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    on_device = workload

    class DeviceModel:  # run_hf_* build CPU tensors; move them to the device
        def generate(self, input_ids, attention_mask=None, **kw):
            return hf.generate(input_ids.to(device), attention_mask=attention_mask.to(device), **kw).cpu()

    wrapped = DeviceModel()
    with torch.inference_mode():
        run_hf_one_at_a_time(wrapped, [(on_device[0][0][:16], 4)])
        hf_seq, _, _ = run_hf_one_at_a_time(wrapped, on_device)
        hf_batch = run_hf_padded_batch(wrapped, on_device, pad_id=0)
    del hf
    llm = LLM(model=str(model_dir), dtype=dtype, device=device, max_num_seqs=16)
    llm.generate([on_device[0][0][:16]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    for prompt, n in on_device:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    helix_seq = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([p for p, _ in on_device], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in on_device])
    helix_conc = time.perf_counter() - start
    out = {
        "dtype": dtype,
        "requested_tokens": requested,
        "tokens_per_s": {
            "hf_one_at_a_time": requested / hf_seq,
            "hf_padded_batch": requested / hf_batch,
            "helix_one_at_a_time": requested / helix_seq,
            "helix_concurrent": requested / helix_conc,
        },
        "ratios": {
            "batch1_helix_over_hf": hf_seq / helix_seq,
            "concurrent_helix_over_hf_one_at_a_time": hf_seq / helix_conc,
            "concurrent_helix_over_hf_padded_batch": hf_batch / helix_conc,
        },
    }
    print("throughput", json.dumps(out, indent=2), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="device_check.json")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report["architectures"] = check_architectures(root, args.device)
        report["batch_invariance"] = check_batch_invariance(root / "llama", args.device)
    if not args.skip_throughput:
        report["throughput"] = throughput(args.device, "bfloat16")
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
