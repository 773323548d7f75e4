"""Helix's own CPU kernels (C++ sources beside this file), compiled on first use and cached.

`load_cpu_kernels()` builds the sources once for this machine's torch into the cache folder
(`$HELIX_CACHE_DIR/kernels`, default `~/.cache/helix_server/kernels`; ~15 s with two cores), loads
them as torch ops (`torch.ops.helix.*`) and says whether that worked. They need x86-64 Linux, a CPU
with AVX-512F and a GCC-compatible C++ compiler (`$CXX`, else `c++` or `g++`). Anywhere else, or
when the build fails (logged once, with the compiler's message), it returns False and the callers
keep torch's own kernels (the `cpu_kernels` setting turns them off: `--no-cpu-kernels`).

Ops: `helix::panel_linear` (`panel_gemm.cpp`, used by `helix_server.layers.panel_linear`);
`rms_norm`, `add_rms_norm_`, `silu_and_mul`, `rotary_`, `store_kv_` (`fused_ops.cpp`) and
`paged_query_attention` (`paged_attention.cpp`), used by `helix_server.layers.fused_cpu`; `quant_linear`
(`quant_gemm.cpp`: GGUF Q8_0, Q4_0, Q4_1 blocks), used by `helix_server.layers.quantized_linear`.
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
from pathlib import Path

import torch

from helix_server.platform.device import cpu_flags

logger = logging.getLogger("helix_server")

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / name for name in ("panel_gemm.cpp", "fused_ops.cpp", "paged_attention.cpp", "quant_gemm.cpp"))
HEADERS = (_HERE / "vec_math.h",)


def cache_dir() -> Path:
    """Where built kernels are kept: `$HELIX_CACHE_DIR/kernels` (default `~/.cache/helix_server`)."""
    root = os.environ.get("HELIX_CACHE_DIR") or Path.home() / ".cache" / "helix_server"
    return Path(root) / "kernels"


def cpu_kernels_supported() -> bool:
    """Whether this platform can run the kernels at all (before trying to build them)."""
    return (
        sys.platform.startswith("linux")
        and platform.machine().lower() in ("x86_64", "amd64")
        and "avx512f" in cpu_flags()
        and _compiler() is not None
    )


@functools.cache
def load_cpu_kernels() -> bool:
    """Build (once per machine and torch) and load the kernels; False where they cannot run."""
    if not cpu_kernels_supported():
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
    compiled into it (written under a temporary name and renamed, so concurrent builds are safe)."""
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
    for part in (torch.__version__, str(torch_dir), compiler, *flags, *libs):
        digest.update(part.encode() + b"\0")
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    target = cache_dir() / f"helix_cpu_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.so")
    logger.info("compiling helix CPU kernels into %s (once per machine and torch)", target.parent)
    try:
        command = [compiler, *flags, *map(str, SOURCES), "-o", str(partial), *libs]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
