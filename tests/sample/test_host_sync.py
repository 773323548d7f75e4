"""The sampler and the rejection sampler bring results to the host once per call, whatever the mix
of options (penalties, logit bias, min_tokens, filters, seeds, logprobs): on CUDA every other
device-to-host read would stall the step. Counted on the CPU by instrumenting every tensor method
that reads device memory into Python."""

from __future__ import annotations

import pytest
import torch

from helix_server.sample.sampler import Sampler
from helix_server.sample.sampling_row import SamplingRow
from helix_server.sampling_params import SamplingParams
from helix_server.spec_decode.rejection_sampler import RejectionSamplerInput, rejection_sample

CPU = torch.device("cpu")
VOCAB = 64
# Tensor methods that copy device memory to the host (implicitly, for the dunders).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@pytest.fixture
def host_reads(monkeypatch):
    """A list that gets the name of every host read made while the test runs."""
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _row(seed=None, output=(5, 6, 6), **params) -> SamplingRow:
    generator = Sampler.make_generator(seed, CPU) if seed is not None else None
    return SamplingRow(SamplingParams(seed=seed, **params), [1, 2, 3], list(output), generator)


ROWS = {
    "greedy": lambda: [_row(temperature=0), _row(temperature=0)],
    "everything": lambda: [
        _row(temperature=0, logit_bias={3: 5.0, 9: -100.0}),
        _row(temperature=0.8, top_k=10, top_p=0.9, min_p=0.01, repetition_penalty=1.2),
        _row(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3, seed=7),
        _row(temperature=0.7, min_tokens=8, logprobs=3, seed=11),
        _row(temperature=0, logprobs=0, logit_bias={1: 2.0}),
    ],
    "random_no_logprobs": lambda: [_row(temperature=1.0, top_k=5), _row(temperature=0.5, seed=3)],
}


@pytest.mark.parametrize("mix", list(ROWS))
def test_sample_reads_the_host_once(mix, host_reads):
    sampler = Sampler(VOCAB, {0}, CPU, seed=0)
    rows = ROWS[mix]()
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(1))
    host_reads.clear()
    results = sampler.sample(logits, rows)
    assert len(results) == len(rows)
    assert host_reads == ["tolist"], host_reads


def test_rejection_sampling_reads_the_host_once(host_reads):
    gen = torch.Generator().manual_seed(2)
    rows, slots = 3, 4
    target = torch.softmax(torch.randn(rows, slots + 1, VOCAB, generator=gen), -1)
    draft = torch.softmax(torch.randn(rows, slots, VOCAB, generator=gen), -1)
    drafts = torch.randint(0, VOCAB, (rows, slots), generator=gen)
    generators = [None, Sampler.make_generator(5, CPU), None]
    host_reads.clear()
    batch = RejectionSamplerInput(
        target, draft, drafts, [4, 2, 0], [False, False, True], generators, torch.Generator().manual_seed(0)
    )
    out, accepted = rejection_sample(batch)
    assert len(out) == rows and len(accepted) == rows
    assert host_reads == ["tolist"], host_reads
