"""Per-request random generators for requests that asked for a `seed`."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from helix_server.runner.sampler import Sampler
from helix_server.scheduler.request import Request


class RequestGenerators:
    """A seeded request's generator lives from its first random draw until it ends, preemptions
    included, so its random stream depends only on its own history (never on the batch)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def get(self, request: Request) -> torch.Generator | None:
        """The request's generator, or None when it is greedy or has no seed (shared stream)."""
        params = request.sampling_params
        if params.seed is None or params.greedy:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = Sampler.make_generator(params.seed, self.device)
            self._generators[request.request_id] = generator
        return generator

    def drop(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._generators.pop(request_id, None)
