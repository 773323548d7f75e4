"""Device and dtype resolution: CUDA, DirectML (`torch_directml`) or the CPU.

DirectML tensors live on torch's `privateuseone` device type. Nothing here imports the rest of
helix_server (only `errors`), so every layer above may use it.
"""

from __future__ import annotations

from typing import Any

import torch

from helix_server.errors import ParameterError

_DTYPE_ALIASES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

_DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, xpu, xpu:N, directml, directml:N"


def _import_directml() -> Any | None:
    """The `torch_directml` module, or None when it is not installed (or fails to load)."""
    try:
        import torch_directml  # type: ignore[import-not-found]
    except Exception:  # an installed but broken DirectML must not stop CPU/CUDA users
        return None
    return torch_directml


def _xpu_available() -> bool:
    """Whether this torch build sees an Intel XPU (`torch.xpu`, torch >= 2.4)."""
    xpu = getattr(torch, "xpu", None)
    return xpu is not None and xpu.is_available()


def is_directml(device: torch.device) -> bool:
    """True for a DirectML device (torch's `privateuseone` type)."""
    return device.type == "privateuseone"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `--device`: auto | cpu | cuda | cuda:N | directml | directml:N.

    `auto` picks CUDA (NVIDIA, or AMD through ROCm builds) when available, else an Intel XPU, else
    DirectML when `torch_directml` imports, else the CPU.
    Asking for a device that is not available raises `ParameterError` (param "device").
    """
    spec = name.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _xpu_available():
            return torch.device("xpu", torch.xpu.current_device())
        dml = _import_directml()
        if dml is not None and dml.is_available():
            return dml.device(dml.default_device())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")

    kind, _, index_text = spec.partition(":")
    if index_text and not index_text.isdigit():
        raise ParameterError(f"invalid device {name!r}; expected one of {_DEVICE_CHOICES}", param="device")
    index = int(index_text) if index_text else None

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(
                f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda})",
                param="device",
            )
        index = torch.cuda.current_device() if index is None else index
        if index >= torch.cuda.device_count():
            raise ParameterError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
                param="device",
            )
        return torch.device("cuda", index)
    if kind == "xpu":
        if not _xpu_available():
            raise ParameterError(f"device {name!r} requested but torch sees no Intel XPU", param="device")
        index = torch.xpu.current_device() if index is None else index
        if index >= torch.xpu.device_count():
            raise ParameterError(
                f"device {name!r} requested but only {torch.xpu.device_count()} XPU device(s) exist",
                param="device",
            )
        return torch.device("xpu", index)
    if kind in ("directml", "dml"):
        dml = _import_directml()
        if dml is None or not dml.is_available():
            raise ParameterError(
                f"device {name!r} requested but torch_directml is not installed or finds no device "
                "(pip install 'helix-server[directml]')",
                param="device",
            )
        index = dml.default_device() if index is None else index
        if index >= dml.device_count():
            raise ParameterError(
                f"device {name!r} requested but only {dml.device_count()} DirectML device(s) exist",
                param="device",
            )
        return dml.device(index)
    raise ParameterError(f"unknown device {name!r}; expected one of {_DEVICE_CHOICES}", param="device")


def cpu_has_fast_half(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` (bfloat16 / float16) models faster than float32.

    bfloat16: Intel AMX tiles, or AVX512-BF16 with torch's oneDNN (mkldnn) backend, which the CPU
    linear fast path (pre-packed oneDNN weights) uses. Measured on an AVX512-BF16 CPU without AMX:
    a bfloat16 decode step was 1.4x faster than float32 (half the weight bytes to stream), while
    oneDNN's bfloat16 kernel computes prompts about 1.5x slower than its float32 one, which the
    linear layers avoid by computing long prompt chunks in float32 there (see
    `helix_server.layers.linear`). float16: AMX-FP16 only. Probes missing from older torch builds,
    or CPU flags that can't be read, count as "no".
    """
    if dtype == torch.bfloat16:
        if cpu_has_amx():
            return True
        return "avx512_bf16" in cpu_flags() and torch.backends.mkldnn.is_available()
    if dtype == torch.float16:
        return _probe("_is_amx_fp16_supported")
    return False


def cpu_has_amx() -> bool:
    """Whether torch sees Intel AMX tiles (then its bfloat16 matmuls outrun float32 at any size)."""
    return _probe("_is_amx_tile_supported")


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _probe(name: str) -> bool:
    check = getattr(torch.cpu, name, None)
    if check is None:
        return False
    try:
        return bool(check())
    except Exception:  # a private probe that misbehaves means "unknown", i.e. not fast
        return False


def _config_dtype(hf_config: Any) -> torch.dtype | None:
    """The checkpoint dtype a transformers config records: `dtype` (v5) or `torch_dtype` (v4)."""
    value = getattr(hf_config, "dtype", None)
    if value is None and "torch_dtype" in getattr(hf_config, "__dict__", {}):
        value = hf_config.__dict__["torch_dtype"]  # v4 attribute; read directly to skip v5's warning
    if isinstance(value, str):
        value = _DTYPE_ALIASES.get(value.lower())
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    """The model dtype for `--dtype`: float32 | bfloat16 | float16 | auto (or fp32/bf16/fp16/half/float).

    `auto` takes the checkpoint's dtype (float32 when the config records none), then adapts it to
    the device: CUDA without bfloat16 support gets float16; DirectML, which has no bfloat16
    kernels, gets float16; a CPU without fast half precision (see `cpu_has_fast_half`) gets float32.
    An explicit dtype is kept, except bfloat16 on DirectML, which is refused.
    """
    key = name.strip().lower()
    if key not in _DTYPE_ALIASES:
        choices = ", ".join(_DTYPE_ALIASES)
        raise ParameterError(f"unknown dtype {name!r}; expected one of {choices}", param="dtype")
    requested = _DTYPE_ALIASES[key]
    if requested is not None:
        if requested == torch.bfloat16 and is_directml(device):
            raise ParameterError(
                "bfloat16 is not supported on DirectML; use float16 or float32", param="dtype"
            )
        return requested

    dtype = _config_dtype(hf_config)
    if dtype not in (torch.bfloat16, torch.float16):
        return torch.float32
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return dtype
    if is_directml(device):
        return torch.float16
    if device.type == "cpu":
        return dtype if cpu_has_fast_half(dtype) else torch.float32
    return dtype


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes on a CUDA device after returning the caching allocator's unused blocks to
    the driver; None where there is no reliable query (CPU, DirectML)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()  # what loading freed is not ours to keep
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None where there is no reliable query (CPU, DirectML)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def device_description(device: torch.device) -> str:
    """A one-line human description of `device` for start-up logs and /health."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        runtime = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"{props.name} ({runtime}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "xpu":
        return f"{torch.xpu.get_device_name(device)} (Intel XPU {device.index or 0})"
    if is_directml(device):
        dml = _import_directml()
        index = device.index or 0
        name = dml.device_name(index) if dml is not None else "unknown adapter"
        return f"{name} (DirectML device {index})"
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        return f"CPU ({capability}, {torch.get_num_threads()} threads)"
    return str(device)
