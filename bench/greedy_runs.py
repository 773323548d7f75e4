"""Timed greedy runs of an `LLM`, and the speculation counters between two `engine.stats()`."""

from __future__ import annotations

import time

from helix_server import LLM, SamplingParams


def timed_greedy(
    llm: LLM, prompts: list[list[int]], max_tokens: int, concurrent: bool
) -> tuple[float, list[list[int]]]:
    """Seconds to complete every prompt (greedy, exactly `max_tokens` each), and the output token ids;
    `concurrent` submits the prompts together, else one after another."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    if concurrent:
        outputs = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    else:
        outputs = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    return time.perf_counter() - start, outputs


def drafted_accepted(before, after) -> tuple[int, int]:
    """Draft tokens proposed and accepted between two `engine.stats()` snapshots."""
    drafted = after.spec_num_draft_tokens_total - before.spec_num_draft_tokens_total
    accepted = after.spec_num_accepted_tokens_total - before.spec_num_accepted_tokens_total
    return drafted, accepted
