"""The CPU kernels chosen at load (`models.cpu_kernel_choice`): the choice for each setting, dtype
and instruction set (what the platform supports is faked here, so every branch runs on any CPU),
and a tied model's swaps on this CPU."""

from __future__ import annotations

import pytest
import torch

from helix_server.layers.cpu_kernels import load_quant_kernels
from helix_server.layers.linear import PackedLinear
from helix_server.layers.panel_linear import PanelLinear, panel_linear_supported
from helix_server.models import cpu_kernel_choice
from helix_server.models.cpu_kernel_choice import CpuKernelChoice, choose_cpu_kernels
from helix_server.models.loader import load_model
from tests.fixtures.tiny_models import make_tiny_model

CPU = torch.device("cpu")


def fake_platform(monkeypatch, panel: bool, onednn: bool, amx: bool, quant: bool) -> None:
    """This CPU as one with (or without) helix's panel kernel, oneDNN, AMX and the quantized kernels."""
    def supported(available: bool):
        return lambda device, dtype: available and device.type == "cpu" and dtype != torch.float16

    monkeypatch.setattr(cpu_kernel_choice, "panel_linear_supported", supported(panel))
    monkeypatch.setattr(cpu_kernel_choice, "cpu_packing_supported", supported(onednn))
    monkeypatch.setattr(cpu_kernel_choice, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(cpu_kernel_choice, "bulk_float32_supported", lambda: True)
    monkeypatch.setattr(cpu_kernel_choice, "load_quant_kernels", lambda: quant)


@pytest.mark.parametrize(
    "dtype,cpu_kernels,pack,platform,expected",
    [
        # AVX-512 + AMX: helix's kernels for everything, unless --no-cpu-kernels (then oneDNN).
        (torch.float32, True, True, (True, True, True, True), CpuKernelChoice(True, True, False, True)),
        (torch.bfloat16, True, True, (True, True, True, True), CpuKernelChoice(True, True, False, True)),
        (torch.bfloat16, False, True, (True, True, True, True), CpuKernelChoice(True, False, False, False)),
        # No AMX: a bfloat16 model on oneDNN computes its long prompt chunks in float32.
        (torch.bfloat16, False, True, (True, True, False, True), CpuKernelChoice(True, False, True, False)),
        (torch.float32, False, True, (True, True, False, True), CpuKernelChoice(True, False, False, False)),
        (torch.bfloat16, True, True, (True, True, False, True), CpuKernelChoice(True, True, False, True)),
        # AVX2 only: no panel kernel, oneDNN for the float layers, the quantized kernels still.
        (torch.bfloat16, True, True, (False, True, False, True), CpuKernelChoice(True, False, True, True)),
        (torch.float32, True, True, (False, True, False, True), CpuKernelChoice(True, False, False, True)),
        # float16: torch's modules, quantized layers on helix's kernels.
        (torch.float16, True, True, (True, True, True, True), CpuKernelChoice(False, False, False, True)),
        # Not packed: only the quantized layers change.
        (torch.float32, True, False, (True, True, True, True), CpuKernelChoice(False, False, False, True)),
        # Neither helix's kernels nor oneDNN: the portable path.
        (torch.float32, True, True, (False, False, False, False), CpuKernelChoice()),
    ],
    ids=[
        "f32-amx", "bf16-amx", "bf16-amx-no-cpu-kernels", "bf16-avx512-no-cpu-kernels",
        "f32-avx512-no-cpu-kernels", "bf16-avx512", "bf16-avx2", "f32-avx2", "f16", "not-packed", "portable",
    ],
)
def test_the_choice_for_each_setting_dtype_and_cpu(monkeypatch, dtype, cpu_kernels, pack, platform, expected):
    fake_platform(monkeypatch, *platform)
    assert choose_cpu_kernels(CPU, dtype, cpu_kernels, pack) == expected


def test_other_devices_keep_torchs_modules(monkeypatch):
    fake_platform(monkeypatch, True, True, True, True)
    for device in ("cuda", "xpu", "privateuseone"):
        choice = choose_cpu_kernels(torch.device(device), torch.float32, cpu_kernels=True, pack=True)
        assert choice == CpuKernelChoice() and choice.describe() is None


def test_a_tied_lm_head_gets_its_own_packed_copy_with_float32_logits(tmp_path):
    model_dir = make_tiny_model(tmp_path / "tied", "llama3_rope")  # tie_word_embeddings
    plain = load_model(model_dir, torch.bfloat16, "cpu", pack_for_cpu=False)
    model = load_model(model_dir, torch.bfloat16, "cpu")
    choice = choose_cpu_kernels(CPU, torch.bfloat16, cpu_kernels=True, pack=True)
    assert plain.lm_head is None
    if not choice.packed:
        pytest.skip("neither helix's kernels nor oneDNN run here")
    assert isinstance(model.lm_head, PanelLinear if choice.helix_kernels else PackedLinear)
    assert choice.helix_kernels == panel_linear_supported(CPU, torch.bfloat16)
    assert choice.quantized == load_quant_kernels()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the lookup keeps the original
    hidden = torch.randn(3, model.arch.hidden_size).bfloat16()
    with torch.inference_mode():
        logits = model.compute_logits(hidden)
    assert logits.dtype == (torch.float32 if choice.helix_kernels else torch.bfloat16)
    expected = hidden.float() @ plain.model.embed_tokens.weight.float().T
    torch.testing.assert_close(logits.float(), expected, atol=3e-2, rtol=3e-2)
