"""`auto` must not draft because of a stale or noisy point in its step-time table (issue 15, section 5).

Measured on a heavily loaded 2-core machine with layer-skip on the ~100M random model (alpha 0):
`auto` drafted for half of the request-steps. One slow step of 4 tokens (the machine stalled) stayed
in the table, because every later step verified drafts and so had 8 tokens, measured faster; then
the predicted time of a step with the drafts (8 tokens) was below that of the step without them
(4 tokens), so drafting looked free. The predicted step time must never decrease as tokens are
added, and drafts whose acceptance is ~0 can then never pay.
"""

from __future__ import annotations

from helix_server.spec_decode.depth_policy import DepthPolicy

REQUESTS = {f"r{i}": 5 for i in range(4)}


def _policy_with_a_stale_point() -> DepthPolicy:
    policy = DepthPolicy(num_speculative_tokens=5, adaptive=True, prior_draft_cost=0.25)
    policy.observe_step(1, 0.010)
    policy.observe_step(4, 0.869)  # one slow step of 4 tokens, never refreshed
    for _ in range(20):
        policy.observe_step(8, 0.020)  # the verifying steps since: 4 tokens + 4 drafts
    policy.observe_step(130, 0.300)  # a prefill
    policy.observe_proposal(1, 0.005)
    return policy


def test_predicted_step_time_never_decreases_with_more_tokens():
    policy = _policy_with_a_stale_point()
    times = [policy.step_time(n) for n in range(1, 200)]
    assert all(b >= a for a, b in zip(times, times[1:])), times


def test_no_drafts_for_requests_whose_drafts_are_always_rejected():
    policy = _policy_with_a_stale_point()
    for _ in range(12):
        for request_id in REQUESTS:
            policy.observe_verification(request_id, 1, 0)
    drafted = [policy.num_spec_tokens(dict(REQUESTS), num_batch_tokens=4) for _ in range(20)]
    # At most an exploring request now and then; never the whole batch.
    assert all(len(depths) <= 1 for depths in drafted), drafted
