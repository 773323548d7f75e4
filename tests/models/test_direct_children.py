"""The decoder's blocks reach their children through `DirectChildren.direct()`: never a stale module."""

from __future__ import annotations

import torch
from torch import nn

from helix_server.models.direct_children import DirectChildren


class Block(DirectChildren, nn.Module):
    DIRECT_CHILDREN = ("first", "second", "optional")

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, _ = self.direct()
        return second.forward(first.forward(x))


def test_direct_returns_the_children_and_none_for_an_absent_one():
    block = Block()
    assert block.direct() == (block.first, block.second, None)
    assert block.direct() is block.direct()  # built once


def test_replacing_a_child_after_a_forward_is_seen_by_the_next_forward():
    block = Block()
    x = torch.randn(2, 4)
    torch.testing.assert_close(block(x), block.first(x))
    block.second = nn.ReLU()  # as loading swaps a projection for a packed one
    assert block.direct()[1] is block.second
    torch.testing.assert_close(block(x), torch.relu(block.first(x)))
    block.optional = nn.Identity()
    assert block.direct()[2] is block.optional
    del block.optional
    assert block.direct()[2] is None


def test_a_setattr_through_setattr_also_counts():
    block = Block()
    block.direct()
    replacement = nn.Linear(4, 4)
    setattr(block, "first", replacement)  # what pack_linear_layers does
    assert block.direct()[0] is replacement
