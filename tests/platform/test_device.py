"""Device and dtype resolution rules (no accelerator needed: devices are only described, not used)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from helix_server.errors import ParameterError
from helix_server.platform import device as device_module
from helix_server.platform import (
    cpu_has_fast_half,
    device_description,
    free_device_memory,
    resolve_device,
    resolve_dtype,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
DIRECTML = torch.device("privateuseone", 0)


@pytest.fixture
def cpu_amx(monkeypatch):
    """Pretend the CPU has (or lacks) AMX tiles for bfloat16 and float16 (and no AVX512-BF16)."""

    def set_amx(available: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: available, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: available, raising=False)
        monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset())

    return set_amx


@pytest.mark.parametrize(
    "name,expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
    ],
)
def test_explicit_dtype_and_aliases_are_kept(name, expected, cpu_amx):
    cpu_amx(False)
    assert resolve_dtype(name, LlamaConfig(dtype="float32"), CPU) == expected


def test_unknown_dtype_is_a_parameter_error():
    with pytest.raises(ParameterError, match="float64") as info:
        resolve_dtype("float64", LlamaConfig(), CPU)
    assert info.value.param == "dtype"


def test_auto_uses_the_config_dtype_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), CUDA) == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(dtype="float16"), CUDA) == torch.float16
    assert resolve_dtype("auto", LlamaConfig(), CUDA) == torch.float32  # no dtype recorded
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), CUDA) == torch.float16


def test_auto_on_cpu_depends_on_fast_half_precision(cpu_amx):
    cpu_amx(False)
    assert not cpu_has_fast_half(torch.bfloat16)
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), CPU) == torch.float32
    assert resolve_dtype("auto", LlamaConfig(dtype="float16"), CPU) == torch.float32
    cpu_amx(True)
    assert cpu_has_fast_half(torch.bfloat16)
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), CPU) == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(dtype="float16"), CPU) == torch.float16
    assert resolve_dtype("auto", LlamaConfig(dtype="float32"), CPU) == torch.float32


def test_avx512_bf16_counts_as_fast_bfloat16_but_not_float16(cpu_amx, monkeypatch):
    cpu_amx(False)
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert cpu_has_fast_half(torch.bfloat16)
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), CPU) == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(dtype="float16"), CPU) == torch.float32


def test_auto_reads_the_v4_torch_dtype_attribute(cpu_amx):
    cpu_amx(True)
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="bfloat16"), CPU) == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(), CPU) == torch.float32


def test_directml_uses_float16_and_refuses_bfloat16():
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), DIRECTML) == torch.float16
    assert resolve_dtype("auto", LlamaConfig(dtype="float32"), DIRECTML) == torch.float32
    assert resolve_dtype("fp16", LlamaConfig(), DIRECTML) == torch.float16
    with pytest.raises(ParameterError, match="DirectML"):
        resolve_dtype("bfloat16", LlamaConfig(), DIRECTML)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cuda", "privateuseone", "cpu")
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(ParameterError) as info:
            resolve_device(bad)
        assert info.value.param == "device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ParameterError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unavailable_directml_is_a_clear_error():
    try:
        import torch_directml  # noqa: F401
    except Exception:
        with pytest.raises(ParameterError, match="torch_directml"):
            resolve_device("directml")
    else:
        pytest.skip("torch_directml is installed")


def test_cpu_memory_and_description():
    assert free_device_memory(CPU) is None
    assert device_description(CPU).startswith("CPU (")


def test_unavailable_xpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    with pytest.raises(ParameterError, match="no Intel XPU") as info:
        resolve_device("xpu")
    assert info.value.param == "device"


def test_auto_picks_an_xpu_after_cuda_and_xpu_n_is_checked(monkeypatch):
    """Intel XPUs that torch exposes are selectable (they run the portable attention path)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "current_device", lambda: 0)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("xpu", 0)
    assert resolve_device("xpu:1") == torch.device("xpu", 1)
    with pytest.raises(ParameterError, match="only 2 XPU"):
        resolve_device("xpu:2")
