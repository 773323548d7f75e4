"""`AcceptanceMonitor`: warns when a fixed speculation depth's drafts are rarely accepted."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("helix_server")

# A fixed depth whose drafts are accepted less often than this is very likely slower than no
# speculation (with k = 3 and a drafter a quarter of the model, alpha = 0.25 yields 1.33 tokens per
# step for 1.75 steps' worth of work), judged over at least this many drafted tokens.
LOW_ACCEPTANCE_RATE = 0.25
LOW_ACCEPTANCE_MIN_DRAFTED = 128
# At most one warning per this many seconds.
LOW_ACCEPTANCE_WARN_EVERY_S = 600.0


class AcceptanceMonitor:
    """Warns (rate-limited) when a fixed speculation depth drafts tokens that are rarely accepted.

    Counts drafted and accepted tokens; every `LOW_ACCEPTANCE_MIN_DRAFTED` drafted tokens it judges
    the acceptance rate of that window and starts a new one. `auto` needs no warning: it stops
    drafting where drafting does not pay.
    """

    def __init__(self, num_speculative_tokens: int, clock=time.monotonic) -> None:
        self.num_speculative_tokens = num_speculative_tokens
        self._clock = clock
        self._drafted = 0
        self._accepted = 0
        self._last_warning: float | None = None

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """A request's `num_drafts` drafted tokens were verified and `num_accepted` kept."""
        self._drafted += num_drafts
        self._accepted += num_accepted
        if self._drafted < LOW_ACCEPTANCE_MIN_DRAFTED:
            return
        rate = self._accepted / self._drafted
        drafted, accepted = self._drafted, self._accepted
        self._drafted = self._accepted = 0
        now = self._clock()
        if rate >= LOW_ACCEPTANCE_RATE:
            return
        if self._last_warning is not None and now - self._last_warning < LOW_ACCEPTANCE_WARN_EVERY_S:
            return
        self._last_warning = now
        logger.warning(
            "speculative decoding: only %.0f%% of drafted tokens are accepted (%d of the last %d) at a "
            "fixed --num-speculative-tokens %d, so it is probably slower than no speculation; use "
            "--num-speculative-tokens auto (drafts only where it measures a gain) or "
            "--speculative-method none",
            100 * rate,
            accepted,
            drafted,
            self.num_speculative_tokens,
        )
