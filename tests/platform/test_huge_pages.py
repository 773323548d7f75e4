"""The loaded model's tensors move into one transparent-huge-page region (Linux, CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from helix_server.models import load_model
from helix_server.platform import huge_pages
from helix_server.platform.huge_pages import huge_pages_available, move_to_huge_pages


def _advised_for_huge_pages(pointer: int) -> bool:
    """Whether the mapping holding address `pointer` may take transparent huge pages (smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        match = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if match:
            inside = int(match.group(1), 16) <= pointer < int(match.group(2), 16)
        elif inside and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return False


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(300, 70), requires_grad=False)
        self.register_buffer("table", torch.arange(1000, dtype=torch.int64))
        self.panels = torch.randn(5, 7, 16)  # a plain attribute, as PanelLinear keeps its panels
        self.bytes_view = self.panels.view(torch.uint8)  # same first byte, another dtype and shape
        self.strided = torch.randn(8, 8).t()  # not contiguous: stays


def test_every_tensor_moves_once_with_its_values_and_sharing_kept():
    model = nn.Sequential(Holder(), Holder())
    model[1].weight = model[0].weight  # tied, as an LM head to its embedding
    before = {name: t.clone() for name, t in model.state_dict().items()}
    panels = [h.panels.clone() for h in model]
    strided = [h.strided for h in model]
    if not huge_pages_available():
        assert move_to_huge_pages(model) == 0
        return
    moved = move_to_huge_pages(model)
    assert moved >= sum(t.nbytes for t in before.values()) - model[1].weight.nbytes
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for holder, expected, original in zip(model, panels, strided, strict=True):
        assert torch.equal(holder.panels, expected)
        assert holder.bytes_view.data_ptr() == holder.panels.data_ptr() and holder.bytes_view.dtype == torch.uint8
        assert torch.equal(holder.bytes_view, expected.view(torch.uint8))
        assert holder.strided is original
        for tensor in (holder.weight, holder.table, holder.panels):
            assert tensor.data_ptr() % huge_pages.ALIGN == 0 and _advised_for_huge_pages(tensor.data_ptr())
    assert model[1].weight is model[0].weight and isinstance(model[0].weight, nn.Parameter)


def test_nothing_moves_where_the_kernel_offers_no_huge_pages(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    assert not huge_pages_available()
    model = Holder()
    pointer = model.weight.data_ptr()
    assert move_to_huge_pages(model) == 0 and model.weight.data_ptr() == pointer


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")
def test_a_model_loaded_on_the_cpu_streams_its_weights_from_huge_pages(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32, "cpu")
    layer = model.model.layers[0]
    for tensor in (model.model.embed_tokens.weight, layer.input_layernorm.weight):
        assert _advised_for_huge_pages(tensor.data_ptr())


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")
def test_the_old_memory_goes_back_as_the_copies_are_made(monkeypatch):
    """The peak is the model plus a little, not twice the model: the old tensors are freed and their
    pages returned every RELEASE_EVERY bytes copied."""
    model = nn.Sequential(*(nn.Linear(256, 256) for _ in range(8)))  # 16 tensors, 8 of 256 KiB
    originals = [p.data_ptr() for p in model.parameters()]
    released = []
    monkeypatch.setattr(huge_pages, "RELEASE_EVERY", 512 << 10)
    monkeypatch.setattr(huge_pages, "release_freed_memory", lambda: released.append(len(released)) or True)
    move_to_huge_pages(model)
    assert len(released) >= 4  # every two weights, and once at the end
    assert not set(originals) & {p.data_ptr() for p in model.parameters()}
