"""Speculation must never make a default setup much slower (issue 15, section 5).

With a fixed `--num-speculative-tokens` whose drafts are rarely accepted, the engine logs a WARNING
that gives the rate and suggests `auto` (rate-limited); `auto` is the default depth for every
method, and needs no warning since it stops drafting where drafting does not pay.
"""

from __future__ import annotations

import logging
import random

from helix_server import LLM, SamplingParams
from helix_server.config import SpeculativeConfig
from helix_server.spec_decode.acceptance_monitor import (
    LOW_ACCEPTANCE_MIN_DRAFTED,
    LOW_ACCEPTANCE_WARN_EVERY_S,
    AcceptanceMonitor,
)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "accepted" in r.getMessage()]


def test_the_monitor_warns_once_per_interval_about_a_low_rate(caplog):
    now = [100.0]
    monitor = AcceptanceMonitor(num_speculative_tokens=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="helix_server"):
        for _ in range(LOW_ACCEPTANCE_MIN_DRAFTED // 3 + 1):
            monitor.observe(3, 0)
        assert len(_warnings(caplog)) == 1
        message = _warnings(caplog)[0]
        assert "0%" in message and "auto" in message and "--num-speculative-tokens 3" in message
        for _ in range(10 * LOW_ACCEPTANCE_MIN_DRAFTED):  # more bad windows within the interval
            monitor.observe(3, 0)
        assert len(_warnings(caplog)) == 1
        now[0] += LOW_ACCEPTANCE_WARN_EVERY_S + 1
        for _ in range(LOW_ACCEPTANCE_MIN_DRAFTED):
            monitor.observe(3, 0)
        assert len(_warnings(caplog)) == 2


def test_the_monitor_is_quiet_when_drafts_are_accepted(caplog):
    monitor = AcceptanceMonitor(num_speculative_tokens=3)
    with caplog.at_level(logging.WARNING, logger="helix_server"):
        for _ in range(20 * LOW_ACCEPTANCE_MIN_DRAFTED):
            monitor.observe(3, 1)  # a third accepted
    assert _warnings(caplog) == []


def test_auto_is_the_default_depth_for_every_method():
    for method in ("draft", "ngram", "layer-skip"):
        spec = SpeculativeConfig(speculative_method=method, draft_model="x" if method == "draft" else None)
        assert spec.num_speculative_tokens_or_auto == "auto" and spec.adaptive
        assert spec.resolved_num_speculative_tokens == spec.max_speculative_tokens


def _generate(llm: LLM) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(8)] for _ in range(4)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))


def test_layer_skip_on_a_random_model_at_a_fixed_depth_warns(tiny_model_dir, caplog):
    # The tiny model's first layer disagrees with the whole model on most tokens (random weights).
    llm = LLM(
        model=str(tiny_model_dir), dtype="float32", num_kv_blocks=256, cpu_kernels=False,
        speculative_method="layer-skip", draft_layers=1, num_speculative_tokens=3,
    )
    with caplog.at_level(logging.WARNING, logger="helix_server"):
        _generate(llm)
    stats = llm.engine.stats()
    assert stats.spec_num_accepted_tokens_total < 0.25 * stats.spec_num_draft_tokens_total
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings  # rate-limited: once, though several windows were bad
    assert "--num-speculative-tokens auto" in warnings[0]


def test_the_default_depth_does_not_warn(tiny_model_dir, caplog):
    llm = LLM(
        model=str(tiny_model_dir), dtype="float32", num_kv_blocks=256, cpu_kernels=False,
        speculative_method="layer-skip", draft_layers=1,
    )
    assert llm.engine.config.speculative.adaptive
    with caplog.at_level(logging.WARNING, logger="helix_server"):
        _generate(llm)
    assert _warnings(caplog) == []
