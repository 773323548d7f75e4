"""Where a decode step's time goes, and how fast the linear layers stream their weights.

Runs a model (default: the throughput benchmark's, seeded random weights, ~100M Llama shape;
`--model smollm2-shaped` for a random model of SmolLM2-135M's shape, 30 thin layers and a tied
49,152-token vocabulary, or any model directory) through helix's `LLM` with B requests decoding together (B = 1 and 16 by default) and times, in the engine itself,
the model runner's part of every decode step (forward and sampling; prompt steps are left out;
the scheduler and detokenizer add ~0.15 ms a step at batch 1), split into

  * linear layers: every projection and the LM head, each call timed where it runs;
  * attention: the attention layers (K/V writes into the paged cache, attention over it);
  * the rest: norms, RoPE, activations, embedding, sampling, metadata and Python between them.

(helix's own float32 CPU kernels count the same way: `PanelLinear` as linear layers, `FusedAttention`
as attention.)

It also measures the rate at which torch's `sum` reads a tensor as large as the weights the linear
layers stream each step (a reference, not a hard floor: helix's float32 kernel, with software
prefetch, streams faster; for a small model the pass is partly served by a large L3), memory's
read bandwidth (the same pass over at least 1 GiB, larger than any cache), the rate the batch-1
linear layers reached (timed per call, and by difference: batch-1 steps with no timer inside, less
the same steps with the linear layers skipped), and, unless `--no-hf`,
transformers' batch-1 decode time per token on the same model, then prints the batch-1 speed-up
over transformers now and if the linear layers ran at least at the summing pass's rate.

    python bench/decode_profile.py [--model llama-100m|smollm2-shaped|DIR] [--dtype float32] [--batches 1,16]
        [--steps 64] [--repeats 3] [--no-hf]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import resolve_bench_model  # noqa: E402
from bench_results import save_results  # noqa: E402
from throughput import make_workload  # noqa: E402

from helix_server import LLM, SamplingParams  # noqa: E402
from helix_server.layers.attention.layer import Attention  # noqa: E402
from helix_server.layers.int8_linear import Int8Linear  # noqa: E402
from helix_server.layers.linear import Linear, PackedLinear  # noqa: E402
from helix_server.layers.panel_linear import PanelLinear  # noqa: E402
from helix_server.layers.quantized_linear import QuantizedLinear  # noqa: E402
from helix_server.platform.process_policy import freeze_loaded_objects  # noqa: E402

MEMORY_PASS_BYTES = 1 << 30
LINEAR_KINDS = (Linear, PackedLinear, PanelLinear, QuantizedLinear, Int8Linear)


class StepTimer:
    """Accumulates, per decode step with exactly `batch` requests, the time of the step and of the
    calls made inside it to the wrapped modules (by kind)."""

    def __init__(self) -> None:
        self.batch = 0
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def wrap(self, module: torch.nn.Module, kind: str) -> None:
        forward = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            self.current[kind] = self.current.get(kind, 0.0) + time.perf_counter() - start
            return out

        module.forward = timed  # an instance attribute: nn.Module.__call__ finds it first

    def wrap_step(self, execute_model: Callable) -> Callable:
        def timed(scheduler_output):
            self.current = {}
            start = time.perf_counter()
            out = execute_model(scheduler_output)
            elapsed = time.perf_counter() - start
            scheduled = scheduler_output.scheduled
            if len(scheduled) == self.batch and all(s.num_new_tokens == 1 for s in scheduled):
                self.steps.append({"step": elapsed, **self.current})
            return out

        return timed


def step_ms_without_linear_layers(llm: LLM, timer: StepTimer, prompt: list[int], params: SamplingParams,
                                  repeats: int) -> tuple[float, float]:
    """Median batch-1 decode step (ms) with no per-call timing inside, and with every linear layer
    skipped (it returns a zero tensor of its output's shape, made once): their difference is the
    linear layers' time in a step as it runs, without the ~1 us a call of the per-call timer. (An
    upper bound: with no weights streaming, the other kernels find more of their data in cache.)"""
    modules = [m for m in llm.engine.runner.model.modules() if isinstance(m, (*LINEAR_KINDS, Attention))]
    for module in modules:
        module.__dict__.pop("forward", None)  # the per-call timers off
    linears = [m for m in modules if isinstance(m, LINEAR_KINDS)]
    outputs: dict[tuple, torch.Tensor] = {}

    def skipped(module: torch.nn.Module):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out_dtype = torch.float32 if getattr(module, "float_out", False) else x.dtype
            key = (x.shape[0], module.out_features, out_dtype)
            if key not in outputs:
                outputs[key] = torch.zeros(x.shape[0], module.out_features, dtype=out_dtype)
            return outputs[key]
        return forward

    def median_step() -> float:
        timer.batch, timer.steps = 1, []
        for _ in range(repeats):
            llm.generate([prompt], params)
        return 1000 * statistics.median(s["step"] for s in timer.steps)

    plain = median_step()
    for module in linears:
        module.forward = skipped(module)
    try:
        return plain, median_step()
    finally:
        for module in linears:
            del module.forward


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weight every decode step streams through the linear layers (LM head included)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (PackedLinear, PanelLinear)):
            weight = module.packed_weight if isinstance(module, PackedLinear) else module.panels
            total += module.out_features * module.in_features * weight.element_size()
        elif isinstance(module, (QuantizedLinear, Int8Linear)):  # packed bytes (and scales) as they are
            total += sum(buffer.numel() * buffer.element_size() for buffer in module.buffers(recurse=False))
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def read_seconds(data: torch.Tensor) -> float:
    """Seconds of one summing pass over `data` (float32: summing bfloat16 is bound by its
    conversions, not by memory)."""
    start = time.perf_counter()
    data.sum()
    return time.perf_counter() - start


class HfDecode:
    """transformers' batch-1 decode time per token on one prompt: generating 1 + n tokens minus
    generating 1 (the prompt's forward), divided by n."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, prompt: list[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        self.input_ids = torch.tensor([prompt])
        self.generate(2)  # warm-up

    def generate(self, new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - start

    def decode_ms(self, steps: int) -> float:
        return 1000 * (self.generate(1 + steps) - self.generate(1)) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-100m", help="llama-100m, smollm2-shaped or a model directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", default="1,16", help="comma-separated numbers of requests decoding together")
    parser.add_argument("--steps", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each measurement (medians)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' decode time")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_profile.json"))
    args = parser.parse_args()

    model_dir = resolve_bench_model(args.model)
    dtype = getattr(torch, args.dtype)
    llm = LLM(model=str(model_dir), dtype=args.dtype, max_num_seqs=64, seed=0, enable_prefix_caching=False)
    runner = llm.engine.runner
    timer = StepTimer()
    for module in runner.model.modules():
        if isinstance(module, LINEAR_KINDS):
            timer.wrap(module, "linear")
        elif isinstance(module, Attention):
            timer.wrap(module, "attention")
    runner.execute_model = timer.wrap_step(runner.execute_model)
    workload = make_workload(64, runner.model.vocab_size, seed=0)
    weight_bytes = linear_weight_bytes(runner.model)
    weights_sized = torch.ones(weight_bytes // 4, dtype=torch.float32)
    # Memory's read rate: a pass over a buffer larger than any cache (a weights-sized pass over a
    # small model reads partly from a large L3: 42 GB/s over 96 MiB against 27 over 1 GiB here).
    memory_sized = torch.ones(max(weight_bytes, MEMORY_PASS_BYTES) // 4, dtype=torch.float32)
    hf = None if args.no_hf else HfDecode(model_dir, dtype, workload[0][0])
    print(f"model: {model_dir} ({args.dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"linear layers stream {weight_bytes / 1e6:.0f} MB per step")
    freeze_loaded_objects()

    # Interleaved, so that a slower or faster spell of a shared machine hits every measurement alike.
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
    batches = [int(b) for b in args.batches.split(",")]
    steps: dict[int, list[dict[str, float]]] = {batch: [] for batch in batches}
    read_times, memory_times, hf_times = [], [], []
    for batch in batches:  # warm-up, not recorded
        timer.batch = 0
        llm.generate([prompt for prompt, _ in workload[:batch]], params)
    for _ in range(args.repeats):
        for batch in batches:
            timer.batch, timer.steps = batch, []
            llm.generate([prompt for prompt, _ in workload[:batch]], params)
            steps[batch] += timer.steps
        read_times += [read_seconds(weights_sized) for _ in range(3)]
        memory_times += [read_seconds(memory_sized) for _ in range(3)]
        if hf is not None:
            hf_times.append(hf.decode_ms(args.steps))

    plain_ms = skipped_ms = None
    if 1 in batches:  # batch-1 steps untimed inside, then with the linear layers skipped
        plain_ms, skipped_ms = step_ms_without_linear_layers(llm, timer, workload[0][0], params, args.repeats)

    results: dict = {"dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "linear_weight_bytes": weight_bytes, "batches": {}}
    for batch in batches:
        medians = {key: 1000 * statistics.median(s.get(key, 0.0) for s in steps[batch])
                   for key in ("step", "linear", "attention")}
        medians["rest"] = medians["step"] - medians["linear"] - medians["attention"]
        results["batches"][batch] = {"decode_steps": len(steps[batch]), **{f"{k}_ms": v for k, v in medians.items()}}
        print(f"batch {batch:>2}: decode step {medians['step']:.1f} ms (median of {len(steps[batch])}) = "
              f"linear layers {medians['linear']:.1f} + attention {medians['attention']:.1f} + rest {medians['rest']:.1f}")

    bandwidth = weight_bytes / min(read_times)
    floor_ms = 1000 * weight_bytes / bandwidth
    results |= {"read_bandwidth_gb_s": bandwidth / 1e9, "linear_floor_ms": floor_ms}
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (torch's sum, best pass): the linear layers' weights "
          f"take {floor_ms:.1f} ms at that rate")
    memory = memory_sized.numel() * 4 / min(memory_times)
    results["memory_read_gb_s"] = memory / 1e9
    print(f"memory read bandwidth {memory / 1e9:.1f} GB/s (torch's sum over {memory_sized.numel() * 4 >> 20} MiB, "
          "best pass)")
    if 1 in results["batches"]:
        streamed = weight_bytes / results["batches"][1]["linear_ms"] / 1e6
        results["batch1_linear_gb_s"] = streamed
        results["batch1_linear_fraction_of_memory_read"] = streamed / (memory / 1e9)
        print(f"batch-1 linear layers streamed {streamed:.1f} GB/s: {streamed / (memory / 1e9):.2f} of memory's "
              f"read bandwidth, {streamed / (bandwidth / 1e9):.2f} of the weights-sized pass's")
    if plain_ms is not None:
        linear_ms = plain_ms - skipped_ms
        streamed = weight_bytes / linear_ms / 1e6
        results |= {"batch1_plain_step_ms": plain_ms, "batch1_step_without_linear_ms": skipped_ms,
                    "batch1_linear_by_difference_gb_s": streamed,
                    "batch1_linear_by_difference_fraction_of_memory_read": streamed / (memory / 1e9)}
        print(f"batch 1 untimed inside: step {plain_ms:.2f} ms, {skipped_ms:.2f} with the linear layers skipped: they "
              f"take {linear_ms:.2f} ms, {streamed:.1f} GB/s, {streamed / (memory / 1e9):.2f} of memory's read bandwidth")
    if hf_times and 1 in results["batches"]:
        hf_ms = statistics.median(hf_times)
        one = results["batches"][1]
        # Linear layers already faster than the summing pass keep their own time.
        best_ms = one["step_ms"] - one["linear_ms"] + min(one["linear_ms"], floor_ms)
        results |= {"hf_batch1_decode_ms": hf_ms, "batch1_over_hf": hf_ms / one["step_ms"],
                    "batch1_over_hf_at_linear_floor": hf_ms / best_ms}
        print(f"transformers batch 1: {hf_ms:.1f} ms per decode token; helix {hf_ms / one['step_ms']:.2f}x now, "
              f"{hf_ms / best_ms:.2f}x if its linear layers ran at least at the summing pass's rate")
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
