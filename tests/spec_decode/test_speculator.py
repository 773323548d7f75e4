"""The `Speculator` on its own: lookahead caps, counters fed by a step's outcome, n-gram drafts
within the room a request has left, and forgetting a request's drafts."""

from __future__ import annotations

import torch

from helix_server.sample.generators import RequestGenerators
from helix_server.sample.sampler import Sampler
from helix_server.sampling_params import SamplingParams
from helix_server.scheduler import Request
from helix_server.spec_decode.depth_policy import DepthPolicy
from helix_server.spec_decode.ngram import NgramProposer
from helix_server.spec_decode.speculator import Speculator
from helix_server.step_contract import ModelRunnerOutput, ScheduledRequest, SchedulerOutput

CPU = torch.device("cpu")


def _speculator(num_speculative_tokens: int = 3) -> Speculator:
    sampler = Sampler(64, {0}, CPU)
    policy = DepthPolicy(num_speculative_tokens=num_speculative_tokens, adaptive=False)
    return Speculator(NgramProposer(1, 3), sampler, RequestGenerators(CPU), policy)


def _request(prompt: list[int], num_tokens_limit: int, lookahead: int = 3) -> Request:
    request = Request("r", prompt, SamplingParams(temperature=0.0))
    request.num_tokens_limit = num_tokens_limit
    request.num_lookahead_tokens = lookahead
    request.num_computed_tokens = len(prompt) - 1
    return request


def test_lookahead_is_capped_by_the_server_maximum():
    speculator = _speculator(num_speculative_tokens=3)
    assert speculator.num_lookahead_tokens(None) == 3
    assert speculator.num_lookahead_tokens(1) == 1
    assert speculator.num_lookahead_tokens(8) == 3


def test_counters_count_drafted_and_accepted_tokens():
    speculator = _speculator()
    request = _request([1, 2, 3, 4], 100)
    request.spec_token_ids = [5, 6, 7]
    scheduled = ScheduledRequest(request, 3, 4, [0], num_spec_tokens=3)  # last token + 3 drafts
    output = ModelRunnerOutput(sampled_token_ids={"r": [5, 6, 9]}, num_draft_tokens={"r": 3})
    speculator.observe_step(SchedulerOutput([scheduled]), output, seconds=0.01)
    counters = speculator.counters
    assert (counters.num_drafts, counters.num_draft_tokens, counters.num_accepted_tokens) == (1, 3, 2)
    assert dict(counters.accepted_per_position) == {0: 1, 1: 1}


def test_ngram_drafts_stay_within_the_room_left():
    speculator = _speculator()
    # ... 1 2 | 3 1 2: the bigram (1, 2) was followed by 3 1 2 before.
    roomy = _request([1, 2, 3, 1, 2], num_tokens_limit=100)
    assert speculator.propose([roomy], num_running=1, block_ids_of=lambda _id: [0, 1]) == [(roomy, [3, 1, 2])]
    # Room for 2 more tokens: one draft, plus the token its verification adds.
    tight = _request([1, 2, 3, 1, 2], num_tokens_limit=7)
    assert speculator.propose([tight], num_running=1, block_ids_of=lambda _id: [0, 1]) == [(tight, [3])]
    full = _request([1, 2, 3, 1, 2], num_tokens_limit=6)
    assert speculator.propose([full], num_running=1, block_ids_of=lambda _id: [0, 1]) == []


def test_release_forgets_the_stored_draft_distributions():
    speculator = _speculator()
    speculator.verifier.store_draft_probs("r", torch.ones(2, 64) / 64)
    speculator.verifier.store_draft_probs("s", torch.ones(2, 64) / 64)
    speculator.release(["r"], ["s"])
    assert speculator.verifier._draft_probs == {}
