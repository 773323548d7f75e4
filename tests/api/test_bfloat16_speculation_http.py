"""Lossless speculation in bfloat16 through HTTP, with the `openai` client: on a model of SmolLM2-135M's
widths (`tests/engine/test_bfloat16_speculation.py` says why that shape: a 49,152-token vocabulary
in bfloat16 is full of near-ties), a server with a draft model and one with layer-skip drafts answer
greedy completions with the same token ids and the same logprobs, bit for bit, as a server without
speculation."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from helix_server.layers.cpu_kernels import cpu_kernels_supported
from tests.api.conftest import MODEL_NAME, start_live_server
from tests.api.test_metrics import families, value

pytestmark = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="bfloat16 decode attention is exact on helix's CPU kernels (AVX-512)"
)

# A draft model that is the target itself drafts (and verifies) at every step; layer-skip drafts
# what its first layers guess. A random model copies nothing from its context, so n-gram lookup
# would draft nothing here: its drafts are verified by the same k + 1-row steps as these.
PROPOSERS = {
    "draft": lambda model_dir: {"draft_model": str(model_dir)},
    "layer-skip": lambda model_dir: {"draft_layers": 2},
}


@pytest.fixture
def plain_server(smollm2_shaped_dir):
    """A fresh server per test, so that both servers see each prompt once: a prompt found in the
    prefix cache recomputes only its last token, as a one-token query, whose bfloat16 bits differ
    from the same row computed within the prompt's chunk (see docs/prefix-caching.md)."""
    server = start_live_server(smollm2_shaped_dir, dtype="bfloat16", speculative_method="none")
    yield server
    server.stop()


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    prompts = []
    for _ in range(4):
        chunk = [rng.randrange(3, 49152) for _ in range(rng.randint(3, 8))]
        prompts.append((chunk * 5)[:36])  # repeats, as in a copy-heavy prompt
    return prompts


def _greedy(url: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Token ids and their logprobs of a greedy 24-token completion (ids as the server returns
    them: most of this vocabulary decodes to no text with the tests' small tokenizer)."""
    client = OpenAI(base_url=url + "/v1", api_key="none", timeout=120)
    response = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = response.choices[0]
    return choice.model_extra["token_ids"], choice.logprobs.token_logprobs


@pytest.mark.parametrize("method", sorted(PROPOSERS))
def test_each_proposer_answers_what_the_plain_server_answers_bit_for_bit(smollm2_shaped_dir, plain_server, method):
    server = start_live_server(
        smollm2_shaped_dir, dtype="bfloat16", speculative_method=method, num_speculative_tokens=3,
        **PROPOSERS[method](smollm2_shaped_dir),
    )
    try:
        prompts = _prompts()
        # The plain server answers one request at a time, the speculative one all at once: its rows
        # share steps with other requests' drafts (with torch's kernels this test fails on a CPU
        # with AMX, whose oneDNN bfloat16 GEMMs change a row's bits with the row count).
        expected = [_greedy(plain_server.url, prompt) for prompt in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda prompt: _greedy(server.url, prompt), prompts))
        assert all(len(ids) == 24 for ids, _ in expected)
        assert got == expected
        with httpx.Client(base_url=server.url, timeout=30) as client:
            metrics = families(client)
        drafted = value(metrics, "helix:spec_decode_num_draft_tokens", "helix:spec_decode_num_draft_tokens_total")
        assert drafted > 0  # the proposer drafted, so verification rows ran
    finally:
        server.stop()
