"""One decode row through each quantized-weight kernel, one thread: median microseconds per call.

    .venv/bin/python bench/quant_kernels.py [TYPES]     # TYPES: comma-separated, default all

Shapes (out x in) are SmolLM2-135M's projections and LM head; K-quants need inputs in multiples of
256, so they run only where that holds. Weights are random (gguf's quantizer for 32-weight blocks,
random super-blocks for K-quants); the float32 panel kernel is the reference row. Both instruction
sets are timed (AVX2 forced on an AVX-512 CPU). Results move with other load on the machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import gguf
import numpy as np
import torch

from helix_server.layers.cpu_kernels import load_cpu_kernels
from helix_server.layers.int8_linear import Int8Linear
from helix_server.layers.panel_linear import PanelLinear
from helix_server.layers.quantized_linear import QuantizedLinear, QuantizedWeight

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]
TYPES = ["f32", "int8", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def median_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def random_super_blocks(rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant rows with small finite float16 scales (d, dmin) so sums stay finite."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
    offsets = (208,) if qtype == gguf.GGMLQuantizationType.Q6_K else (0, 2)
    for offset in offsets:
        blocks[:, offset : offset + 2] = rng.uniform(5e-4, 4e-3, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def layer_call(name: str, n: int, k: int, isa: str):
    """A function computing one [1, k] row through `name`'s kernel of n outputs."""
    x = torch.randn(1, k)
    if name == "f32":
        layer = PanelLinear(torch.randn(n, k), None)
        return lambda: layer(x)
    if name == "int8":
        layer = Int8Linear(torch.randn(n, k))
        layer.use_cpu_kernels(isa)
        return lambda: layer(x)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    if name.endswith("_K"):
        raw = random_super_blocks(n, k, qtype)
    else:
        raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32), qtype)
    layer = QuantizedLinear([QuantizedWeight(qtype, torch.from_numpy(np.ascontiguousarray(raw)), k)])
    layer.use_cpu_kernels(isa)  # 32-weight blocks: repacked, integer dot products; K-quants: float kernel
    return lambda: layer(x)


def main() -> None:
    if not load_cpu_kernels():
        sys.exit("helix's CPU kernels do not build here (x86-64 Linux, AVX-512F and a C++ compiler)")
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else TYPES
    for name in names:
        for n, k in SHAPES:
            if name.endswith("_K") and k % 256:
                continue
            reps = 15 if n > 10_000 else 200
            with torch.inference_mode():
                isas = ("avx512",) if name == "f32" else ("avx512", "avx2")
                times = [median_us(layer_call(name, n, k, isa), reps) for isa in isas]
            avx2 = f"   avx2 {times[1]:9.1f} us" if len(times) > 1 else ""
            print(f"{name:5s} {n:6d}x{k:<5d} avx512 {times[0]:9.1f} us{avx2}", flush=True)


if __name__ == "__main__":
    main()
