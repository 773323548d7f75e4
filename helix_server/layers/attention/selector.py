"""Which attention backend a device gets, and the swap that installs it on a loaded model.

* CPU: the portable backend, or helix's fused CPU kernels where they build (`layers.fused_cpu`,
  chosen at load by `helix_server.models.cpu_kernel_choice`);
* CUDA (NVIDIA) with the `triton` package importable: `TritonAttention`, the paged kernels that read
  K/V in place through the block tables;
* CUDA without triton, ROCm (torch's `cuda` device with `torch.version.hip`), Intel XPU, DirectML:
  the portable backend (gather through the block tables, then SDPA; torch 2.4's operators only).

triton is imported only to check a CUDA device: importing it leaves nanobind objects that print
"leaked" lines at exit, which a CPU process never shows (tests/models/test_cpu_load_imports.py).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

TRITON = "triton"
PORTABLE = "portable"
CPU = "cpu"


@functools.cache
def triton_available() -> bool:
    """Whether the `triton` package imports (it ships with torch's CUDA wheels; never required)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 (an installed but broken triton must not stop the portable path)
        return False
    return True


def attention_backend(device: torch.device | str) -> str:
    """`TRITON`, `PORTABLE` or `CPU` (the loader's CPU choice) for a model on `device`."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU
    if device.type == "cuda" and torch.version.hip is None and triton_available():
        return TRITON
    return PORTABLE


def describe_attention_backend(device: torch.device | str) -> str:
    """One line for the start-up log: what attention `device` gets, and why when it is not the fast one."""
    device = torch.device(device)
    backend = attention_backend(device)
    if backend == TRITON:
        return "Triton paged attention (K/V read in place through the block tables)"
    if backend == CPU:
        return "CPU attention"
    if device.type == "cuda" and torch.version.hip is not None:
        reason = "helix's Triton kernels are enabled on NVIDIA CUDA only"
    elif device.type == "cuda":
        reason = "the triton package is not installed"
    else:
        reason = f"no paged kernels for {device.type} devices"
    return f"portable attention (K/V gathered, then SDPA): {reason}"


def use_device_attention(model: nn.Module, device: torch.device | str) -> int:
    """Install `device`'s attention backend on `model` in place (CUDA + triton: `TritonAttention`;
    elsewhere nothing changes); returns how many layers were swapped."""
    if attention_backend(device) != TRITON:
        return 0
    from helix_server.layers.attention.triton_backend import use_triton_attention

    return use_triton_attention(model)
