"""Randomness of seeded requests: a function of (seed, position), never of how draws were made.

A seeded request's token at position p (its index in prompt + output) is drawn with the exponential
race over V exponentials from a generator seeded with a hash of (seed, p) alone. So the text does not
depend on the batch, preemption, chunking, or how many draws speculation made before p: three
identical seeded requests give the same text whatever depth `auto` speculation chooses, and the
same text as with speculation off. Verification keeps that (see `spec_decode.verifier`): a seeded
row's target token at a draft position is its noisy argmax with that position's noise, and a draft
is accepted iff it equals it (exact for the target's distribution: it *is* the target's sample). A
model proposer drafts with the same noise (Gumbel coupling), so a draft that agrees with the target
is accepted with the probability that both noisy argmaxes agree.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from helix_server.sample.sampler import Sampler

if TYPE_CHECKING:
    from helix_server.scheduler.request import Request


def position_seed(seed: int, position: int) -> int:
    """A 64-bit seed for the draw at `position` of a request seeded with `seed` (any Python int)."""
    message = f"helix-seed:{int(seed)}:{int(position)}".encode()
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little")


class RequestGenerators:
    """Per-position generators for seeded requests on one device (no state is kept between draws)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def get(self, request: Request, position: int) -> torch.Generator | None:
        """The generator for `request`'s draw at `position`, or None when the request is greedy or
        has no seed (it then draws from the sampler's shared stream)."""
        params = request.sampling_params
        if params.seed is None or params.greedy:
            return None
        return Sampler.make_generator(position_seed(params.seed, position), self.device)
