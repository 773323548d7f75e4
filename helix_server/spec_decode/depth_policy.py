"""How many tokens to draft for each request this step (`--num-speculative-tokens N | auto`).

Names: the configured maximum is `num_speculative_tokens` (N, or `max_speculative_tokens` with
`auto`); what one request drafts in one step, at most that, is its `num_spec_tokens`; a request's own
cap is its public `SamplingParams.speculation_depth`.

With a fixed N every request drafts min(N, its own `speculation_depth`, what it has left to
generate). With `auto` the depth is chosen every step from measurements, to maximise generated
tokens per second:

* per request, the acceptance rate alpha (a smoothed count of accepted vs rejected drafts, starting
  from the batch-wide rate), so a request whose drafts keep failing stops drafting;
* the target's step time as a function of the tokens in the batch, T(n), which is what verifying
  more tokens costs: nearly nothing when decoding is memory-bound (small batches), a lot when it is
  compute-bound (large batches). Measured steps are averaged per power-of-two range of n and T is
  interpolated between those points (a single global line would be dominated by long prompt
  steps and says little about n = 16 versus n = 32);
* the proposer's time per drafting step, D, and per token it must catch up on, C: a draft model
  processes every token of a request it has not drafted for yet (the whole prompt, or everything
  since it last drafted) before its first draft. That one-off cost is spread over the steps the
  request has left (its remaining tokens over its expected yield per step), so a batch of short
  answers to long prompts does not start drafting when the catch-up would eat the gain.

With depth k a request yields on average E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens per step
(Leviathan et al. 2022). For each candidate depth K the step would take
T(n0 + sum k_r) + K * D and yield sum E_r(k_r), with k_r = min(K, the request's own limits); the
policy picks the K with the best ratio, and K = 0 (no speculation) unless speculating is expected to
beat it by a margin; while at 0 it still drafts one token for one request now and then (after
`_EXPLORE_EVERY` steps, then twice as long after each exploration that changed nothing, up to
`_EXPLORE_MAX`) to keep its acceptance estimate current.

The prediction can be wrong (step times are noisy, and a step's cost depends on how many requests
it holds, not only on its tokens), so it is checked against what happened: per range of batch
sizes, the realised tokens per second of steps where the batch drafted and of steps where it did
not (each including the drafting that fed it). Where drafting measurably lost, the policy does not
draft, until `_EXPLORE_MAX` more steps of that batch size have run (steps of other sizes do not
age it: a stretch of one-at-a-time work says nothing about 24 requests at once); while drafting,
one step in `_REFRESH_EVERY` runs without drafts so the comparison stays current. Pure Python: no
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Smoothing of the measured times and acceptance counts (weight of the newest observation).
_EMA = 0.1
# Pseudo-observations of the prior when a request's own acceptance is not known yet.
_PRIOR_WEIGHT = 4.0
# Speculate only when it is expected to be at least this much faster than not speculating.
_MARGIN = 1.05
# While the policy keeps choosing depth 0 it still drafts one token every this many steps, so the
# acceptance estimate keeps up with the workload (a step of exploration every 64 costs little if
# drafting does not pay, and finds out when it starts to). Only one request explores: a proposer
# must first catch up on every token since it last drafted for a request, which for a whole batch
# of a small model can cost more than the target's step (measured: 6% of a 24-request run). Each
# exploration after which drafting still does not pay doubles the wait, up to _EXPLORE_MAX (one
# exploration still cost ~4% of a 62-step run with the default pair).
_EXPLORE_EVERY = 64
_EXPLORE_MAX = 1024
# While drafting, one step in this many runs without drafts, to measure the realised rate without.
_REFRESH_EVERY = 32


def expected_tokens(alpha: float, depth: int) -> float:
    """Mean tokens per step with `depth` drafts accepted independently with probability alpha:
    1 + alpha + ... + alpha^depth (the accepted prefix, plus the recovered or bonus token)."""
    if alpha >= 1.0:
        return depth + 1.0
    return (1.0 - alpha ** (depth + 1)) / (1.0 - alpha)


@dataclass
class _Acceptance:
    accepted: float = 0.0
    rejected: float = 0.0


@dataclass
class DepthPolicy:
    """Chooses each request's `num_spec_tokens` per step, at most `num_speculative_tokens` (the
    configured maximum); fed with acceptance counts and step timings."""

    num_speculative_tokens: int
    adaptive: bool
    # Prior guess of the proposer's step time relative to the target's (before any measurement).
    prior_draft_cost: float = 0.1
    _global: _Acceptance = field(default_factory=lambda: _Acceptance(accepted=1.0, rejected=1.0))
    _requests: dict[str, _Acceptance] = field(default_factory=dict)
    # Target step times: per power-of-two range of tokens, the smoothed (tokens, seconds) of its steps.
    _steps: dict[int, tuple[float, float]] = field(default_factory=dict)
    _draft_step_seconds: float | None = None
    # Seconds per token of a proposer catching up (None until measured).
    _catch_up_token_seconds: float | None = None
    _steps_without_drafts: int = 0
    _steps_with_drafts: int = 0
    _explore_interval: int = _EXPLORE_EVERY
    # Realised outcome per (power-of-two range of batch size, whether the batch drafted): smoothed
    # (tokens generated, seconds) per step, and that range's step count when last observed.
    _outcomes: dict[tuple[int, bool], tuple[float, float, int]] = field(default_factory=dict)
    # Steps observed per power-of-two range of batch size (the clock that ages `_outcomes`).
    _outcome_clock: dict[int, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ measurements

    def observe_verification(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """A request's drafts were verified: `num_accepted` of `num_drafts` (a prefix) were kept."""
        if num_drafts <= 0:
            return
        rejected = 1.0 if num_accepted < num_drafts else 0.0
        stats = self._requests.setdefault(request_id, _Acceptance())
        stats.accepted += num_accepted
        stats.rejected += rejected
        self._global.accepted = (1 - _EMA) * self._global.accepted + _EMA * num_accepted
        self._global.rejected = (1 - _EMA) * self._global.rejected + _EMA * rejected

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """The target model ran a step over `num_tokens` tokens in `seconds`."""
        if num_tokens <= 0:
            return
        bucket = (num_tokens - 1).bit_length()  # 1 | 2 | 3-4 | 5-8 | 9-16 | ...
        previous = self._steps.get(bucket)
        if previous is None:
            self._steps[bucket] = (float(num_tokens), seconds)
        else:
            n, t = previous
            self._steps[bucket] = ((1 - _EMA) * n + _EMA * num_tokens, (1 - _EMA) * t + _EMA * seconds)

    def observe_proposal(self, num_steps: int, seconds: float) -> None:
        """The proposer drafted `num_steps` tokens per request (for the whole batch) in `seconds`."""
        if num_steps <= 0:
            return
        per_step = seconds / num_steps
        previous = self._draft_step_seconds
        self._draft_step_seconds = per_step if previous is None else (1 - _EMA) * previous + _EMA * per_step

    def observe_catch_up(self, num_tokens: int, seconds: float) -> None:
        """A proposal spent `seconds` with `num_tokens` tokens to catch up on (drafting included,
        so this overestimates a little; it matters only when catch-up dominates)."""
        if num_tokens <= 0:
            return
        per_token = seconds / num_tokens
        previous = self._catch_up_token_seconds
        self._catch_up_token_seconds = per_token if previous is None else (1 - _EMA) * previous + _EMA * per_token

    def observe_outcome(self, num_requests: int, num_drafting: int, num_tokens: int, seconds: float) -> None:
        """A step generated `num_tokens` tokens for `num_requests` requests, `num_drafting` of which
        had drafts, in `seconds` (its forward and sampling, plus the drafting that fed it). Steps
        where only a few requests drafted (explorations) are neither kind and are not recorded."""
        if num_requests <= 0 or seconds <= 0.0:
            return
        bucket = (num_requests - 1).bit_length()
        clock = self._outcome_clock[bucket] = self._outcome_clock.get(bucket, 0) + 1
        if num_drafting == 0:
            drafted = False
        elif 2 * num_drafting >= num_requests:
            drafted = True
        else:
            return
        key = (bucket, drafted)
        previous = self._outcomes.get(key)
        if previous is None or clock - previous[2] > _EXPLORE_MAX:
            self._outcomes[key] = (float(num_tokens), seconds, clock)
        else:
            tokens, secs, _ = previous
            self._outcomes[key] = ((1 - _EMA) * tokens + _EMA * num_tokens, (1 - _EMA) * secs + _EMA * seconds, clock)

    def drafting_measurably_loses(self, num_requests: int) -> bool:
        """Whether, at this batch size, steps with drafts recently generated fewer tokens per second
        than steps without."""
        bucket = (max(num_requests, 1) - 1).bit_length()
        with_drafts = self._outcomes.get((bucket, True))
        without = self._outcomes.get((bucket, False))
        if with_drafts is None or without is None or self._outcome_clock[bucket] - with_drafts[2] > _EXPLORE_MAX:
            return False
        return with_drafts[0] / with_drafts[1] < without[0] / without[1]

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    # ------------------------------------------------------------------ estimates

    def acceptance_rate(self, request_id: str | None = None) -> float:
        """Smoothed probability that a draft is accepted (batch-wide, or for one request)."""
        prior = self._global.accepted / max(self._global.accepted + self._global.rejected, 1e-9)
        if request_id is None:
            return prior
        stats = self._requests.get(request_id)
        if stats is None:
            return prior
        total = stats.accepted + stats.rejected + _PRIOR_WEIGHT
        return (stats.accepted + _PRIOR_WEIGHT * prior) / total

    def step_time(self, num_tokens: int) -> float | None:
        """Predicted target step time for `num_tokens` tokens, or None before any measurement:
        linear between the nearest measured points below and above, along the nearest two outside
        them, flat when only one point is known; never decreasing with n. A point measured slower
        than a point of more tokens (a stall, or a stale point: while every step verifies drafts,
        the point without them is not refreshed) raises the larger ones, so verifying drafts is
        never predicted to make a step faster."""
        if not self._steps:
            return None
        points, slowest = [], 0.0
        for n, t in sorted(self._steps.values()):
            slowest = max(slowest, t)
            points.append((n, slowest))
        below = [p for p in points if p[0] <= num_tokens]
        above = [p for p in points if p[0] > num_tokens]
        if below and above:
            (n0, t0), (n1, t1) = below[-1], above[0]
        elif len(points) == 1:
            return points[0][1]
        elif above:  # below every point
            (n0, t0), (n1, t1) = points[0], points[1]
        else:  # above every point
            (n0, t0), (n1, t1) = points[-2], points[-1]
        slope = max((t1 - t0) / (n1 - n0), 0.0) if n1 > n0 else 0.0
        return max(t0 + slope * (num_tokens - n0), 0.0)

    # ------------------------------------------------------------------ the decision

    def num_spec_tokens(
        self,
        limits: dict[str, int],
        num_batch_tokens: int,
        backlogs: dict[str, int] | None = None,
        remaining: dict[str, int] | None = None,
    ) -> dict[str, int]:
        """The drafts each request makes this step (its `num_spec_tokens`). `limits[request_id]` caps
        each request (its own speculation_depth and what it has left to generate); `num_batch_tokens`
        is the number of tokens the next step would compute without any drafts. `backlogs[request_id]`: tokens the
        proposer must catch up on before drafting for it; `remaining[request_id]`: tokens it may
        still generate (both default to no catch-up)."""
        if self.num_speculative_tokens <= 0:
            return {}
        if not self.adaptive:
            return {rid: min(self.num_speculative_tokens, limit) for rid, limit in limits.items() if limit > 0}
        base = self.step_time(num_batch_tokens)
        if base is None or base <= 0.0:
            # Nothing measured yet: draft one token, to start measuring.
            return {rid: min(1, limit) for rid, limit in limits.items() if limit > 0}
        if self.drafting_measurably_loses(num_batch_tokens):
            return self._not_drafting(limits)
        draft_step = self._draft_step_seconds
        if draft_step is None:
            draft_step = self.prior_draft_cost * base
        alphas = {rid: self.acceptance_rate(rid) for rid in limits}
        catch_up = self._catch_up_per_step(limits, backlogs or {}, remaining or {}, alphas)
        baseline_rate = len(limits) / base  # tokens per second without speculation
        # One more verified token costs the target `per_token` seconds; a request's j-th draft is
        # worth it only if its expected yield alpha^j beats what that time produces without drafts.
        per_token = self.step_time(num_batch_tokens + 1) - base
        threshold = per_token * baseline_rate
        caps = {
            rid: min(limit, _depth_cap(alphas[rid], threshold, self.num_speculative_tokens))
            for rid, limit in limits.items()
        }

        best_rate, best = baseline_rate, {}
        for depth in range(1, self.num_speculative_tokens + 1):
            chosen = {rid: min(depth, cap) for rid, cap in caps.items() if cap > 0}
            if not chosen:
                break
            tokens = sum(expected_tokens(alphas[rid], k) for rid, k in chosen.items())
            tokens += len(limits) - len(chosen)  # the others still get their one token
            seconds = self.step_time(num_batch_tokens + sum(chosen.values())) + draft_step * depth
            seconds += sum(catch_up[rid] for rid in chosen)
            rate = tokens / max(seconds, 1e-9)
            if rate > best_rate:
                best_rate, best = rate, chosen
        if best_rate >= baseline_rate * _MARGIN:
            self._explore_interval = _EXPLORE_EVERY
            self._steps_without_drafts = 0
            self._steps_with_drafts += 1
            if self._steps_with_drafts % _REFRESH_EVERY == 0:
                return {}  # one step without drafts keeps the realised comparison current
            return best
        return self._not_drafting(limits)

    def _not_drafting(self, limits: dict[str, int]) -> dict[str, int]:
        """A step the policy does not draft for: nothing, or now and then one exploring request."""
        self._steps_with_drafts = 0
        self._steps_without_drafts += 1
        if self._steps_without_drafts < self._explore_interval:
            return {}
        # The first (oldest) request explores: usually the one that explored last time, so its
        # proposer has the fewest tokens to catch up on.
        explorer = next((rid for rid, limit in limits.items() if limit > 0), None)
        if explorer is None:
            return {}
        self._explore_interval = min(2 * self._explore_interval, _EXPLORE_MAX)
        self._steps_without_drafts = 0
        return {explorer: 1}

    def _catch_up_per_step(
        self, limits: dict[str, int], backlogs: dict[str, int], remaining: dict[str, int], alphas: dict[str, float]
    ) -> dict[str, float]:
        """Per request, its proposer's catch-up time spread over the steps it has left if it drafts
        (at least one token per step, more the better its drafts are accepted)."""
        per_token = self._catch_up_token_seconds
        if per_token is None:
            # Not measured yet: the prior cost ratio times what a target token costs in a long step.
            longest = max(self._steps.values(), default=None)
            per_token = self.prior_draft_cost * longest[1] / longest[0] if longest else 0.0
        out = {}
        for rid, limit in limits.items():
            backlog = backlogs.get(rid, 0)
            steps_left = max(remaining.get(rid, 1) / expected_tokens(alphas[rid], limit), 1.0)
            out[rid] = backlog * per_token / steps_left
        return out


def _depth_cap(alpha: float, threshold: float, num_speculative_tokens: int) -> int:
    """The largest j <= num_speculative_tokens whose expected yield alpha^j exceeds `threshold`."""
    depth, gain = 0, 1.0
    while depth < num_speculative_tokens:
        gain *= alpha
        if gain <= threshold:
            break
        depth += 1
    return depth
