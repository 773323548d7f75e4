"""helix's own float32 / bfloat16 CPU kernel (`helix::panel_linear`) and the `PanelLinear` layer on it."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helix_server.layers import cpu_kernels
from helix_server.layers.cpu_kernels import cpu_kernels_supported, load_cpu_kernels
from helix_server.layers.panel_linear import (
    PANEL_WIDTH,
    PanelLinear,
    amx_available,
    pack_amx_panels,
    pack_panels,
    panel_linear_supported,
)
from helix_server.models import load_model
from tests.fixtures.tiny_models import make_tiny_model

needs_kernels = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="helix's CPU kernels need x86-64 Linux, AVX-512F and a C++ compiler"
)
# A property of the CPU (Intel Sapphire Rapids and later), not of the build: the suite's AMX tests
# run wherever AMX is there.
needs_amx = pytest.mark.skipif(
    not (cpu_kernels_supported() and "amx_bf16" in open("/proc/cpuinfo").read()), reason="this CPU has no AMX"
)


def test_the_kernels_build_wherever_the_platform_supports_them():
    # Not a skip: on a machine that should run them, a broken build must fail the suite.
    assert load_cpu_kernels() == cpu_kernels_supported()
    assert panel_linear_supported(torch.device("cpu"), torch.float32) == cpu_kernels_supported()
    assert panel_linear_supported(torch.device("cpu"), torch.bfloat16) == cpu_kernels_supported()
    assert not panel_linear_supported(torch.device("cpu"), torch.float16)


def test_pack_panels_puts_16_outputs_of_one_input_side_by_side():
    weight = torch.arange(35 * 3, dtype=torch.float32).view(35, 3)  # 35 outputs: 3 panels, the last 3 wide
    panels = pack_panels(weight)
    assert panels.shape == (3, 3, PANEL_WIDTH) and panels.is_contiguous()
    for n in range(35):
        for k in range(3):
            assert panels[n // PANEL_WIDTH, k, n % PANEL_WIDTH] == weight[n, k]
    assert not panels[2, :, 3:].any()  # padding outputs are zero


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
# (out, in): a partial last panel; every panel-group remainder of the tile shapes; the benchmark
# model's widest reduction.
@pytest.mark.parametrize("shape", [(35, 24), (16 * 13 + 5, 96), (768, 2048)])
def test_panel_linear_matches_a_float64_reference_for_every_tile_shape(shape, bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    b = torch.randn(shape[0], generator=generator) if bias else None
    layer = PanelLinear(weight, b)
    x = torch.randn(64, shape[1], generator=generator)
    reference = nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    # A float32 sum's error bound scales with the sum of the magnitudes it adds: allow 16 ulps of it
    # (observed: a few ulps; a wrong weight or input is off by whole products).
    tolerance = 16 * 2**-23 * (x.abs().double() @ weight.abs().double().T + (0 if b is None else b.abs().double()))
    with torch.inference_mode():
        # 1-8 rows: one tile of that many rows; 9-24: tiles of 12; more: tiles of 6 (and remainders).
        for rows in [*range(1, 27), 37, 64]:
            got = layer(x[:rows])
            assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
            assert ((got.double() - reference[:rows]).abs() <= tolerance[:rows]).all(), rows


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=80),
    start=st.integers(min_value=0, max_value=79),
    out_features=st.sampled_from([16, 50, 200]),
    in_features=st.sampled_from([8, 300, 1100]),
)
def test_a_rows_bits_do_not_depend_on_the_other_rows_of_the_call(rows, start, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 1000 + start)
    layer = PanelLinear(torch.randn(out_features, in_features, generator=generator), None)
    x = torch.randn(80, in_features, generator=generator)
    start = min(start, 80 - rows)
    with torch.inference_mode():
        batch = layer(x)
        assert torch.equal(layer(x[start : start + rows]), batch[start : start + rows])
        assert torch.equal(layer(x[start : start + 1]), batch[start : start + 1])


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])  # 3: runs of panels that split the tiles' groups unevenly
def test_one_row_gets_the_same_bits_whatever_the_thread_count(threads):
    generator = torch.Generator().manual_seed(2)
    layer = PanelLinear(torch.randn(1000, 256, generator=generator), torch.randn(1000, generator=generator))
    x = torch.randn(20, 256, generator=generator)
    default_threads = torch.get_num_threads()
    with torch.inference_mode():
        expected = layer(x)
        try:
            torch.set_num_threads(threads)
            got = [layer(x[:rows]) for rows in (1, 5, 20)]
        finally:
            torch.set_num_threads(default_threads)
    for rows, result in zip((1, 5, 20), got):
        assert torch.equal(result, expected[:rows]), rows


@needs_kernels
def test_bad_operands_are_refused_with_a_message():
    layer = PanelLinear(torch.randn(32, 8), None)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="x has 9 features, W 8"):
            layer(torch.randn(2, 9))
        with pytest.raises(RuntimeError, match="of W's dtype"):
            layer(torch.randn(2, 8, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="of W's dtype"):
            layer(torch.randn(2, 8, dtype=torch.bfloat16))
        assert layer(torch.randn(0, 8)).shape == (0, 32)
        # Non-contiguous rows (a transposed view) are copied, not misread.
        x = torch.randn(8, 3).t()
        torch.testing.assert_close(layer(x), nn.functional.linear(x, pack_panels_inverse(layer)))


def pack_panels_inverse(layer: PanelLinear) -> torch.Tensor:  # [panels, in, 16] -> [out, in]
    return layer.panels.transpose(1, 2).reshape(-1, layer.in_features)[: layer.out_features]


@needs_kernels
def test_a_float32_model_on_the_cpu_runs_its_projections_on_the_panel_kernel(tmp_path):
    model_dir = make_tiny_model(tmp_path, "qwen2")  # q/k/v biases
    model = load_model(model_dir, torch.float32, "cpu")
    plain = load_model(model_dir, torch.float32, "cpu", pack_for_cpu=False)
    layers = [m for m in model.modules() if isinstance(m, PanelLinear)]
    assert len(layers) == sum(isinstance(m, nn.Linear) for m in plain.modules())
    assert any(layer.bias is not None for layer in layers)
    hidden = torch.randn(3, 64)
    torch.testing.assert_close(model.compute_logits(hidden), plain.compute_logits(hidden), atol=1e-5, rtol=1e-5)
    # bfloat16: the same layers on the kernel's bfloat16 panels.
    bf16 = load_model(model_dir, torch.bfloat16, "cpu")
    bf16_layers = [m for m in bf16.modules() if isinstance(m, PanelLinear)]
    assert len(bf16_layers) == len(layers) and all(m.panels.dtype == torch.bfloat16 for m in bf16_layers)
    plain_bf16 = load_model(model_dir, torch.bfloat16, "cpu", pack_for_cpu=False)
    hidden = torch.randn(3, 64).bfloat16()
    with torch.inference_mode():
        logits = bf16.compute_logits(hidden)
        # Logits are the float32 sums, not rounded to bfloat16 (bfloat16 rounding makes ties).
        assert logits.dtype == torch.float32 and bf16.lm_head.float_out
        rounded = torch.ops.helix.amx_linear if bf16.lm_head.use_amx else torch.ops.helix.panel_linear
        rounded = rounded(hidden, bf16.lm_head.panels, None, bf16.lm_head.out_features, False)
        assert logits.dtype == torch.float32 and torch.equal(logits.bfloat16(), rounded)
        assert not torch.equal(logits, rounded.float())
        torch.testing.assert_close(logits, plain_bf16.compute_logits(hidden).float(), atol=2e-2, rtol=2e-2)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_panels_sum_in_float32_and_round_once(bias):
    """Each bfloat16 output is the float32 sum of exact products, in input order, rounded to nearest
    even once: bitwise the float32 kernel's result on the widened operands, rounded by torch."""
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16 * 9 + 7, 300, generator=generator).bfloat16()
    b = torch.randn(weight.shape[0], generator=generator).bfloat16() if bias else None
    x = torch.randn(40, 300, generator=generator).bfloat16()
    x[3, 5] = float("nan")  # a NaN row stays NaN (rounded to the quiet NaN), the others are untouched
    with torch.inference_mode():
        got = PanelLinear(weight, b, use_amx=False)(x)
        widened = PanelLinear(weight.float(), None if b is None else b.float())(x.float())
    assert got.dtype == torch.bfloat16
    finite = [row for row in range(x.shape[0]) if row != 3]
    assert torch.equal(got[finite].view(torch.int16), widened[finite].to(torch.bfloat16).view(torch.int16))
    assert got[3].isnan().all() and not got[finite].isnan().any()


@needs_kernels
@pytest.mark.parametrize("use_amx", [False, pytest.param(True, marks=needs_amx)])
def test_a_bfloat16_row_is_bitwise_the_same_in_any_batch(use_amx):
    """The reason for the bfloat16 kernels: oneDNN's bfloat16 rows change with the row count on CPUs
    with AMX; these never do (2,048 inputs: the widest reduction of a wide MLP)."""
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(2)
    layer = PanelLinear(torch.randn(512, 2048, generator=generator).bfloat16(), None, use_amx=use_amx)
    x = torch.randn(48, 2048, generator=generator).bfloat16()
    with torch.inference_mode():
        together = layer(x)
        for rows in (1, 2, 3, 5, 8, 12, 16, 24, 33):
            assert torch.equal(layer(x[:rows]), together[:rows]), f"{rows} rows"


@needs_kernels
def test_the_cpu_kernels_setting_turns_them_off(make_model_dir):
    from helix_server import LLM, SamplingParams
    from helix_server.layers.fused_cpu import FusedRMSNorm
    from helix_server.layers.linear import PackedLinear
    from helix_server.settings import build_config

    assert build_config(env={}).engine.model.cpu_kernels is True
    assert build_config(env={"HELIX_CPU_KERNELS": "false"}).engine.model.cpu_kernels is False
    model_dir = str(make_model_dir("llama"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = []
    for enabled in (True, False):
        llm = LLM(model=model_dir, dtype="float32", cpu_kernels=enabled, num_kv_blocks=64)
        modules = list(llm.engine.runner.model.modules())
        assert any(isinstance(m, (PanelLinear, FusedRMSNorm)) for m in modules) == enabled
        assert any(isinstance(m, PackedLinear) for m in modules) != enabled
        outputs.append(llm.generate([[5, 6, 7, 8, 9]], params)[0].outputs[0].token_ids)
    assert outputs[0] == outputs[1]  # the tiny model's greedy tokens do not hang on last bits


@needs_kernels
def test_a_failed_build_falls_back_with_the_compilers_message(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("HELIX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "SOURCES", (broken,))
    with caplog.at_level(logging.WARNING, logger="helix_server"):
        assert cpu_kernels._load_once.__wrapped__() is False
    assert "build or load failed" in caplog.text and "broken.cpp" in caplog.text
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-written is kept


def test_pack_amx_panels_puts_input_pairs_of_16_outputs_side_by_side():
    weight = torch.arange(35 * 40, dtype=torch.float32).view(35, 40) + 1  # 3 panels; inputs padded to 64
    panels = pack_amx_panels(weight)
    assert panels.shape == (3, 32, PANEL_WIDTH, 2) and panels.is_contiguous()
    for n in range(35):
        for k in range(40):
            assert panels[n // PANEL_WIDTH, k // 2, n % PANEL_WIDTH, k % 2] == weight[n, k]
    assert not panels[2, :, 3:].any() and not panels[:, 20:].any()  # padding outputs and inputs are zero


@needs_amx
def test_amx_is_found_where_the_cpu_has_it():
    # Not a skip inside: on an AMX CPU, a kernel that cannot get AMX must fail the suite.
    assert amx_available()
    assert PanelLinear(torch.randn(16, 32).bfloat16(), None).use_amx
    assert not PanelLinear(torch.randn(16, 32), None).use_amx  # float32 keeps the panel kernel


@needs_amx
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(35, 24), (16 * 13 + 5, 96), (576, 1536)])  # padded inputs; 1, 2, 3-panel groups
def test_amx_sums_are_float32_close_to_a_float64_reference_and_rounded_once(shape, bias):
    assert amx_available()
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(*shape, generator=generator).bfloat16()
    b = torch.randn(shape[0], generator=generator) if bias else None
    x = torch.randn(70, shape[1], generator=generator).bfloat16()
    x[5, 3] = float("nan")  # a NaN row stays NaN, the others are untouched
    rounded, sums = PanelLinear(weight, b, use_amx=True), PanelLinear(weight, b, float_out=True, use_amx=True)
    reference = nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    # float32 sums of exact bfloat16 products: 16 ulps of the sum of magnitudes (observed: a few).
    tolerance = 16 * 2**-23 * (x.abs().double() @ weight.abs().double().T + (0 if b is None else b.abs().double()))
    finite = [row for row in range(70) if row != 5]
    with torch.inference_mode():
        for rows in (1, 2, 15, 16, 17, 31, 32, 33, 70):
            got, exact = rounded(x[:rows]), sums(x[:rows])
            assert got.dtype == torch.bfloat16 and exact.dtype == torch.float32
            keep = [row for row in finite if row < rows]
            assert torch.equal(got[keep], exact[keep].bfloat16())  # one rounding of the float32 sum
            assert ((exact[keep].double() - reference[keep]).abs() <= tolerance[keep]).all(), rows
            if rows > 5:
                assert exact[5].isnan().all() and got[5].isnan().all()


@needs_amx
def test_amx_rows_do_not_depend_on_the_other_rows_or_the_thread_count():
    assert amx_available()
    generator = torch.Generator().manual_seed(4)
    layer = PanelLinear(torch.randn(200, 1100, generator=generator).bfloat16(), None, float_out=True, use_amx=True)
    # 1,100 inputs (1,120 padded): rows go in blocks of 160 (384 KB of inputs), so 400 rows make 3 blocks.
    x = torch.randn(400, 1100, generator=generator).bfloat16()
    threads = torch.get_num_threads()
    with torch.inference_mode():
        batch = layer(x)
        for start, rows in ((0, 1), (7, 1), (3, 16), (20, 17), (40, 40), (1, 33), (150, 20), (5, 330), (0, 400)):
            assert torch.equal(layer(x[start : start + rows]), batch[start : start + rows]), (start, rows)
        try:
            torch.set_num_threads(1)
            single = layer(x)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(single, batch)


@needs_amx
def test_amx_refuses_bad_operands_with_a_message():
    assert amx_available()
    layer = PanelLinear(torch.randn(32, 40).bfloat16(), None, use_amx=True)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="x has 65 features, W 64"):
            layer(torch.randn(2, 65).bfloat16())
        with pytest.raises(RuntimeError, match="x must be 2-D bfloat16"):
            layer(torch.randn(2, 40))
        assert layer(torch.randn(0, 40).bfloat16()).shape == (0, 32)
        x = torch.randn(40, 3).bfloat16().t()  # non-contiguous rows are copied, not misread
        torch.testing.assert_close(layer(x).float(), nn.functional.linear(x.float(), layer.unpacked_weight().float()),
                                   atol=2e-2, rtol=2e-2)
