"""The `auto` draft depth: more drafts when they pay, none when they don't."""

from __future__ import annotations

from helix_server.spec_decode.depth_policy import DepthPolicy, expected_tokens


def _policy(alpha_hits: int, alpha_misses: int, draft_step: float, slope: float) -> DepthPolicy:
    policy = DepthPolicy(num_speculative_tokens=5, adaptive=True)
    for n in (1, 4, 16, 64):  # step time = 10 ms + slope * tokens
        policy.observe_step(n, 0.010 + slope * n)
    policy.observe_proposal(1, draft_step)
    for _ in range(alpha_hits):
        policy.observe_verification("r", 4, 4)
    for _ in range(alpha_misses):
        policy.observe_verification("r", 4, 0)
    return policy


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 3) == 4.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12


def test_step_time_fit_recovers_a_line():
    policy = _policy(0, 0, 0.001, 0.0005)
    assert abs(policy.step_time(100) - (0.010 + 0.05)) < 1e-6


def test_cheap_accurate_drafts_go_deep():
    policy = _policy(alpha_hits=40, alpha_misses=0, draft_step=0.0005, slope=0.0)
    assert policy.num_spec_tokens({"r": 5}, num_batch_tokens=1) == {"r": 5}


def test_drafts_that_keep_failing_are_switched_off():
    policy = _policy(alpha_hits=0, alpha_misses=40, draft_step=0.0005, slope=0.0)
    assert policy.num_spec_tokens({"r": 5}, num_batch_tokens=1) == {}


def test_expensive_verification_in_big_batches_switches_off():
    # Each extra token costs as much as a whole small step: verifying drafts is never worth it.
    policy = _policy(alpha_hits=10, alpha_misses=10, draft_step=0.0005, slope=0.010)
    assert policy.num_spec_tokens({f"r{i}": 5 for i in range(16)} | {"r": 5}, num_batch_tokens=17) == {}


def test_limits_and_fixed_depth():
    fixed = DepthPolicy(num_speculative_tokens=3, adaptive=False)
    assert fixed.num_spec_tokens({"a": 5, "b": 1, "c": 0}, num_batch_tokens=3) == {"a": 3, "b": 1}
    policy = _policy(alpha_hits=40, alpha_misses=0, draft_step=0.0005, slope=0.0)
    assert policy.num_spec_tokens({"r": 2}, num_batch_tokens=1) == {"r": 2}
    assert DepthPolicy(num_speculative_tokens=0, adaptive=True).num_spec_tokens({"r": 3}, 1) == {}


def test_a_policy_that_stopped_drafting_explores_now_and_then():
    policy = _policy(alpha_hits=0, alpha_misses=40, draft_step=0.0005, slope=0.0)
    decisions = [policy.num_spec_tokens({"r": 5}, num_batch_tokens=1) for _ in range(200)]
    explored = [i for i, d in enumerate(decisions) if d]
    assert explored and all(decisions[i] == {"r": 1} for i in explored)
    assert len(explored) <= 200 // 50


def test_only_the_oldest_request_explores():
    policy = _policy(alpha_hits=0, alpha_misses=40, draft_step=0.0005, slope=0.0)
    limits = {"old": 0, "r": 5, "young": 5}  # "old" may not draft (no room left)
    decisions = [policy.num_spec_tokens(limits, num_batch_tokens=3) for _ in range(200)]
    explored = [d for d in decisions if d]
    assert explored and all(d == {"r": 1} for d in explored)
    assert not any(policy.num_spec_tokens({"a": 0, "b": 0}, num_batch_tokens=2) for _ in range(300))


def test_explorations_that_change_nothing_grow_further_apart():
    policy = _policy(alpha_hits=0, alpha_misses=40, draft_step=0.0005, slope=0.0)
    decisions = [policy.num_spec_tokens({"r": 5}, num_batch_tokens=1) for _ in range(5000)]
    explored = [i for i, d in enumerate(decisions) if d]
    gaps = [b - a for a, b in zip(explored, explored[1:])]
    assert gaps[:4] == [128, 256, 512, 1024] and set(gaps[4:]) == {1024}
    # Once drafting pays again, the next exploration is back to the short wait.
    for _ in range(200):
        policy.observe_verification("r", 4, 4)
    assert policy.num_spec_tokens({"r": 5}, num_batch_tokens=1)
    assert policy._explore_interval == 64


def test_drafting_that_measurably_loses_is_stopped_at_that_batch_size():
    # The model predicts a gain (cheap, accurate drafts, flat step time)...
    policy = _policy(alpha_hits=40, alpha_misses=0, draft_step=0.0005, slope=0.0)
    limits = {f"r{i}": 5 for i in range(16)}
    assert policy.num_spec_tokens(limits, num_batch_tokens=16)
    # ...but at 16 requests, steps with drafts generated 20 tokens in 30 ms, steps without 16 in 10 ms.
    policy.observe_outcome(num_requests=16, num_drafting=16, num_tokens=20, seconds=0.030)
    policy.observe_outcome(num_requests=16, num_drafting=0, num_tokens=16, seconds=0.010)
    assert policy.drafting_measurably_loses(16)
    assert policy.num_spec_tokens(limits, num_batch_tokens=16) == {}
    # Other batch sizes are not affected, and an exploration (1 of 16 drafting) records nothing.
    assert not policy.drafting_measurably_loses(1) and policy.num_spec_tokens({"r": 5}, num_batch_tokens=1)
    policy.observe_outcome(num_requests=16, num_drafting=1, num_tokens=17, seconds=0.011)
    assert policy._outcomes[(4, True)][0] == 20.0
    # A measured win keeps it drafting.
    for _ in range(60):
        policy.observe_outcome(num_requests=16, num_drafting=16, num_tokens=40, seconds=0.012)
    assert not policy.drafting_measurably_loses(16) and policy.num_spec_tokens(limits, num_batch_tokens=16)


def test_while_drafting_one_step_in_32_runs_without_drafts():
    policy = _policy(alpha_hits=40, alpha_misses=0, draft_step=0.0005, slope=0.0)
    decisions = [policy.num_spec_tokens({"r": 5}, num_batch_tokens=1) for _ in range(96)]
    assert [i for i, d in enumerate(decisions) if not d] == [31, 63, 95]


def test_a_stale_losing_measurement_expires():
    policy = _policy(alpha_hits=40, alpha_misses=0, draft_step=0.0005, slope=0.0)
    policy.observe_outcome(num_requests=16, num_drafting=16, num_tokens=20, seconds=0.030)
    policy.observe_outcome(num_requests=16, num_drafting=0, num_tokens=16, seconds=0.010)
    assert policy.drafting_measurably_loses(16)
    for _ in range(1100):
        policy.observe_outcome(num_requests=16, num_drafting=0, num_tokens=16, seconds=0.010)
    assert not policy.drafting_measurably_loses(16)


def test_steps_at_other_batch_sizes_do_not_age_a_losing_measurement():
    policy = _policy(alpha_hits=40, alpha_misses=0, draft_step=0.0005, slope=0.0)
    policy.observe_outcome(num_requests=16, num_drafting=16, num_tokens=20, seconds=0.030)
    policy.observe_outcome(num_requests=16, num_drafting=0, num_tokens=16, seconds=0.010)
    for _ in range(3000):  # a long stretch of one-at-a-time work, drafting and winning
        policy.observe_outcome(num_requests=1, num_drafting=1, num_tokens=3, seconds=0.004)
    assert policy.drafting_measurably_loses(16)
    assert policy.num_spec_tokens({f"r{i}": 5 for i in range(16)}, num_batch_tokens=16) == {}


def test_catching_up_on_long_prompts_for_short_answers_is_not_worth_it():
    # Cheap, accurate drafts and a flat step time: drafting wins once the proposer is caught up...
    policy = _policy(alpha_hits=40, alpha_misses=0, draft_step=0.0005, slope=0.0)
    limits = {f"r{i}": 3 for i in range(16)}
    caught_up = {rid: 1 for rid in limits}
    assert policy.num_spec_tokens(limits, num_batch_tokens=16, backlogs=caught_up, remaining={rid: 20 for rid in limits})
    # ...but a draft model must first read 500 prompt tokens per request (measured: 20 us each,
    # 160 ms for the batch, 16 steps' worth): for 20 tokens left each, that never pays back.
    policy.observe_catch_up(num_tokens=8000, seconds=0.160)
    long_prompts = {rid: 500 for rid in limits}
    assert policy.num_spec_tokens(limits, num_batch_tokens=16, backlogs=long_prompts, remaining={rid: 20 for rid in limits}) == {}
    # For long answers the same catch-up is spread thin enough.
    assert policy.num_spec_tokens(limits, num_batch_tokens=16, backlogs=long_prompts, remaining={rid: 5000 for rid in limits})
