"""Lossless speculation in bfloat16 on a model of a real small model's shape (SmolLM2-135M's widths:
hidden 576, 9 query / 3 KV heads of 64, MLP 1,536, a tied 49,152-token vocabulary; 4 of its 30
layers, to keep the test short).

bfloat16 logits of a large vocabulary are full of near-ties, so a position must get the same bits
whether it is computed as a decode step or as a draft being verified (k + 1 rows): every layer's
rows must not depend on how many rows there are. helix's bfloat16 panel kernel and attention kernels
(AVX-512's, or AMX's where the CPU has it) keep that by construction (`layers.panel_linear`,
`layers.fused_cpu`), and the LM head gives float32 logits. oneDNN's bfloat16 linear layers do not on CPUs with AMX: with `cpu_kernels=False` this test
fails there (checked on a Sapphire Rapids machine), and torch's SDPA promises nothing either."""

from __future__ import annotations

import random

import pytest

from helix_server import LLM, SamplingParams
from helix_server.layers.cpu_kernels import cpu_kernels_supported
from helix_server.layers.fused_cpu import FusedAttention
from helix_server.layers.panel_linear import amx_available

pytestmark = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="bfloat16 decode attention is exact on helix's CPU kernels (AVX-512)"
)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    prompts = []
    for _ in range(6):
        chunk = [rng.randrange(3, 49152) for _ in range(rng.randint(3, 10))]
        prompts.append((chunk * 4)[:40])
    return prompts


# A random model copies nothing, so n-gram lookup would draft nothing here; a draft model that is
# the target itself drafts (and verifies) at every step, layer-skip drafts what its layers guess.
@pytest.mark.parametrize("method", ["draft", "layer-skip"])
def test_bfloat16_greedy_is_token_identical_with_speculation(smollm2_shaped_dir, method):
    settings = {"speculative_method": method, "num_speculative_tokens": 3}
    if method == "draft":
        settings["draft_model"] = str(smollm2_shaped_dir)
    else:
        settings["draft_layers"] = 2
    # Every sampled token's logprob too, bitwise: a random model rarely meets a near-tie in a few
    # dozen tokens, but any position whose bits change with the query length shows up here.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    prompts = _prompts()

    def tokens_and_logprobs(output) -> list[tuple[int, float]]:
        return [(t.token_id, t.logprob) for t in output.outputs[0].logprobs]

    plain = LLM(model=str(smollm2_shaped_dir), dtype="bfloat16", num_kv_blocks=256)
    expected = [tokens_and_logprobs(plain.generate([p], params)[0]) for p in prompts]
    spec = LLM(model=str(smollm2_shaped_dir), dtype="bfloat16", num_kv_blocks=256, **settings)
    got = [tokens_and_logprobs(r) for r in spec.generate(prompts, params)]
    assert got == expected
    # The attention kernel this CPU runs in bfloat16 (AMX's where present) is the one under test.
    attention = [m for m in spec.engine.runner.model.modules() if isinstance(m, FusedAttention)]
    assert attention and all(m.use_amx == amx_available() for m in attention)
    stats = spec.engine.stats()
    assert stats.spec_num_draft_tokens_total > 0 and stats.spec_num_accepted_tokens_total > 0
