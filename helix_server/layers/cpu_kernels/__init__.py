"""Helix's own CPU kernels (C++ sources beside this file), compiled on first use and cached.

`load_cpu_kernels()` builds the sources once for this machine's torch into the cache folder
(`$HELIX_CACHE_DIR/kernels`, default `~/.cache/helix_server/kernels`), loads them as torch ops
(`torch.ops.helix.*`) and says whether that worked. The build compiles each source in its own
compiler process (in parallel, up to the number of CPUs) and logs how long it took; it is done once
per machine, torch and source version. `helix-server serve` starts it in the background
(`start_building_cpu_kernels()`) before the weights load, and the first layer that needs the
kernels waits for it; `helix-server build-kernels` (run by `make install`) builds them ahead of
time. They need x86-64 Linux, a CPU
with AVX-512F (the quantized-weight kernels: AVX2, FMA and F16C are enough, see `load_quant_kernels`)
and a GCC-compatible C++ compiler (`$CXX`, else `c++` or `g++`). Anywhere else, or
when the build fails (logged once, with the compiler's message), it returns False and the callers
keep torch's own kernels (the `cpu_kernels` setting turns them off: `--no-cpu-kernels`).

Ops: `helix::panel_linear` (`panel_gemm.cpp`) and `amx_linear` / `amx_supported` (`amx_linear.cpp`,
bfloat16 on AMX), used by `helix_server.layers.panel_linear`;
`rms_norm`, `add_rms_norm_`, `silu_and_mul`, `rotary_`, `store_kv_` (`fused_ops.cpp`) and
`paged_query_attention` (`paged_attention.cpp`) and `paged_query_attention_amx`
(`paged_attention_amx.cpp`, bfloat16 on AMX), used by `helix_server.layers.fused_cpu`;
`quant_linear_k` (`quant_gemm_k.cpp`: GGUF Q4_K, Q5_K, Q6_K super-blocks), used by
`helix_server.layers.quantized_linear`;
`quant_dot_linear` (`quant_dot.cpp`: Q8_0, Q4_0, Q4_1 repacked by `helix_server.layers.quant_repack`,
integer dot products on AVX-512 VNNI), used by `helix_server.layers.quantized_linear`;
`int8_linear` (`quant_gemm_int8.cpp`: int8 weights, a scale per output row), used by
`helix_server.layers.int8_linear`; and the same for CPUs without AVX-512,
`quant_linear_k_avx2`, `int8_linear_avx2` (`quant_gemm_avx2.cpp`) and `quant_dot_linear_avx2`
(`quant_dot_avx2.cpp`, also for AVX-512 CPUs without VNNI), compiled with AVX2 + FMA + F16C only
(`quant_kernel_isa()` says which set a CPU runs).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from helix_server.platform.device import cpu_flags

logger = logging.getLogger("helix_server")

_HERE = Path(__file__).parent
SOURCES = tuple(
    _HERE / name
    for name in (
        "panel_gemm.cpp",
        "amx_linear.cpp",
        "fused_ops.cpp",
        "paged_attention.cpp",
        "paged_attention_amx.cpp",
        "quant_gemm_k.cpp",
        "quant_gemm_int8.cpp",
        "quant_gemm_avx2.cpp",
        "quant_dot.cpp",
        "quant_dot_avx2.cpp",
    )
)
HEADERS = (_HERE / "vec_math.h", _HERE / "quant_common.h", _HERE / "amx_common.h", _HERE / "task_runs.h", _HERE / "paged_query_common.h")
# Sources for CPUs without AVX-512, compiled without it (so that no AVX-512 instruction can slip in).
AVX2_SOURCES = frozenset({"quant_gemm_avx2.cpp", "quant_dot_avx2.cpp"})
AVX2_FLAGS = ("-mavx2", "-mf16c")
# Measured with g++ (torch 2.13): compiling all sources takes ~65 s of CPU time (quant_gemm_k.cpp,
# quant_gemm_int8.cpp and quant_gemm_avx2.cpp ~7 s each), the largest one (panel_gemm.cpp) ~20 s. Used
# only to tell the user how long a first build should take on idle CPUs.
BUILD_CPU_S = 65.0
LARGEST_SOURCE_CPU_S = 20.0
# One build at a time in this process: a background build and the first layer that needs the kernels
# wait for each other.
_BUILD_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where built kernels are kept: `$HELIX_CACHE_DIR/kernels` (default `~/.cache/helix_server`)."""
    root = os.environ.get("HELIX_CACHE_DIR") or Path.home() / ".cache" / "helix_server"
    return Path(root) / "kernels"


def cpu_kernels_supported() -> bool:
    """Whether this platform can run the kernels at all, AVX-512 ones included (before trying to
    build them)."""
    return _library_supported() and "avx512f" in cpu_flags()


def quant_kernel_isa() -> str | None:
    """Which quantized-weight kernels this CPU runs: "avx512" (AVX-512F: `quant_dot_linear`,
    `quant_linear_k`, `int8_linear`), "avx2" (AVX2 + FMA + F16C: their `_avx2` twins, same results
    bit for bit), or None."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return None


def load_cpu_kernels() -> bool:
    """Build (once per machine and torch) and load the kernels; False where they cannot run (no
    AVX-512: see `load_quant_kernels` for the quantized-weight ones).

    Waits for a build already under way in this process (see `start_building_cpu_kernels`)."""
    return cpu_kernels_supported() and _load_library()


def load_quant_kernels() -> bool:
    """`load_cpu_kernels` for the quantized-weight kernels only, which also run on AVX2 CPUs (the
    library loads there; only the ops `quant_kernel_isa` names may be called)."""
    return quant_kernel_isa() is not None and _load_library()


def _library_supported() -> bool:
    return (
        sys.platform.startswith("linux")
        and platform.machine().lower() in ("x86_64", "amd64")
        and quant_kernel_isa() is not None
        and _compiler() is not None
    )


def _load_library() -> bool:
    if not _BUILD_LOCK.acquire(blocking=False):
        logger.info("waiting for helix's CPU kernels (being built or loaded in the background) ...")
        _BUILD_LOCK.acquire()
    try:
        return _load_once()
    finally:
        _BUILD_LOCK.release()


def start_building_cpu_kernels() -> threading.Thread | None:
    """Build and load the kernels in a background thread (None where they cannot run here)."""
    if not _library_supported():
        return None
    thread = threading.Thread(target=_load_library, name="helix-cpu-kernels-build", daemon=True)
    thread.start()
    return thread


def build_cpu_kernels() -> Path:
    """Build the kernels into the cache now (`helix-server build-kernels`): the library's path.

    Raises `RuntimeError` where they cannot run, `subprocess.CalledProcessError` when the compiler fails."""
    if not _library_supported():
        raise RuntimeError("helix's CPU kernels need x86-64 Linux, AVX-512F or AVX2 and a C++ compiler")
    with _BUILD_LOCK:
        return _build()


@functools.cache
def _load_once() -> bool:
    if not _library_supported():
        return False
    try:
        torch.ops.load_library(str(_build()))
        return True
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr[-2000:] if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.warning("helix CPU kernels unavailable, using torch's (build or load failed): %s", detail)
        return False


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build() -> Path:
    """The shared library for these sources, this torch and this compiler: from the cache, or
    compiled into it (built in a private temporary folder and renamed, so concurrent builds by
    several processes are safe)."""
    compiler = _compiler()
    torch_dir = Path(torch.__file__).parent
    flags = [
        "-O3", "-std=c++20", "-shared", "-fPIC", "-mavx512f", "-mfma",
        # Every product and sum rounded on its own, as torch's separate ops do (fused multiply-adds
        # only where a kernel asks for them).
        "-ffp-contract=off",
        # at::parallel_for runs on torch's OpenMP threads only when compiled with OpenMP; the
        # library then uses the libgomp torch already loaded (same soname).
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    libs = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch_dir), compiler, *flags, *libs, *sorted(AVX2_SOURCES), *AVX2_FLAGS):
        digest.update(part.encode() + b"\0")
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    target = cache_dir() / f"helix_cpu_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "compiling helix's CPU kernels (first run only, ~%.0f s on idle CPUs) into %s ...",
        max(LARGEST_SOURCE_CPU_S, BUILD_CPU_S / _build_workers()),
        target.parent,
    )
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        partial = Path(work) / target.name
        _compile_and_link(compiler, flags, libs, partial)
        os.replace(partial, target)
    logger.info("compiled helix's CPU kernels in %.1f s", time.monotonic() - start)
    return target


def _build_workers() -> int:
    """Compiler processes at once: one per source, at most one per CPU."""
    return max(1, min(len(SOURCES), os.cpu_count() or 1))


def _compile_and_link(compiler: str, flags: list[str], libs: list[str], output: Path) -> None:
    """Compile each source to an object file (one compiler process per source, as many at once as
    there are CPUs), then link them into the shared library `output`."""
    compile_flags = [flag for flag in flags if flag != "-shared"]
    objects = [output.with_name(f"{source.stem}.o") for source in SOURCES]

    def compile_one(pair: tuple[Path, Path]) -> None:
        source, obj = pair
        own_flags = compile_flags
        if source.name in AVX2_SOURCES:
            own_flags = [flag for flag in compile_flags if flag != "-mavx512f"] + list(AVX2_FLAGS)
        command = [compiler, *own_flags, "-c", str(source), "-o", str(obj)]
        subprocess.run(command, check=True, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=_build_workers()) as pool:
        list(pool.map(compile_one, zip(SOURCES, objects)))
    link = [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(output), *libs]
    subprocess.run(link, check=True, capture_output=True, text=True)
