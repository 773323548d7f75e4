"""`StructuredOutputManager`: the engine's matchers, one per constrained sequence, kept in step.

Before each forward the engine asks for the bitmasks of the constrained sequences it scheduled: the
matcher first accepts the tokens the sequence gained since last time (so preemption, stop strings
and rejected drafts need no bookkeeping here), then writes one mask per position the runner samples
at: the next token, and with speculative decoding each draft position (the matcher advances through
the drafts, then rolls back). Drafts are truncated at the first token the grammar forbids when they
are proposed. A matcher failure ends only its own sequence: its masks allow only EOS and the engine
fails that request after the step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from helix_server.engine.structured.backend import StructuredOutputBackend
from helix_server.engine.structured.matcher import GrammarMatcher
from helix_server.scheduler.request import Request
from helix_server.step_contract import ScheduledRequest

logger = logging.getLogger("helix_server")


class StructuredOutputManager:
    """Per-sequence `GrammarMatcher`s for the requests whose params carry a `structured_output`."""

    def __init__(self, backend: StructuredOutputBackend) -> None:
        self.backend = backend
        self._matchers: dict[str, GrammarMatcher] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._matchers)

    def bitmasks(self, scheduled: Iterable[ScheduledRequest]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Per constrained sequence that samples this step, int32 `[num_spec_tokens + 1, num_words]`
        masks (row i: the position after the first i drafts); and the errors of failed matchers."""
        masks: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        for s in scheduled:
            request = s.request
            if not s.samples or request.sampling_params.structured_output is None:
                continue
            try:
                matcher = self._synced(request)
                drafts = request.spec_token_ids[: s.num_spec_tokens]
                # Rows past a forbidden draft are never used: left all-allowed (-1), never all-banned.
                out = np.full((len(drafts) + 1, matcher.num_words), -1, dtype=np.int32)
                matcher.fill_bitmask(out[0])
                num_valid = matcher.valid_prefix(drafts)
                for i, token_id in enumerate(drafts[:num_valid]):
                    # Past a forbidden draft nothing is verified: the draft is rejected there.
                    if not matcher.accept_tokens([token_id]):
                        matcher.rollback(i)
                        break
                    matcher.fill_bitmask(out[i + 1])
                else:
                    matcher.rollback(num_valid)
                masks[s.request_id] = out
                if matcher.error is not None:
                    errors[s.request_id] = matcher.error
            except Exception as exc:
                logger.exception("structured output failed for request %s", s.request_id)
                errors[s.request_id] = str(exc)
                masks[s.request_id] = self._eos_only(s.num_spec_tokens + 1)
        return masks, errors

    def valid_drafts(self, request: Request, drafts: list[int]) -> list[int]:
        """`drafts` cut before the first token the grammar forbids (unchanged when unconstrained)."""
        if request.sampling_params.structured_output is None or not drafts:
            return drafts
        try:
            return drafts[: self._synced(request).valid_prefix(drafts)]
        except Exception:  # noqa: BLE001 - the next `bitmasks` reports the failure
            return []

    def draft_bitmask(self, request: Request, drafts: list[int]) -> np.ndarray | None:
        """For a model drafter: int32 `[num_words]`, the tokens allowed after `drafts` (None when
        the request is unconstrained or its drafts already left the grammar)."""
        if request.sampling_params.structured_output is None:
            return None
        try:
            matcher = self._synced(request)
            if matcher.valid_prefix(drafts) < len(drafts) or not matcher.accept_tokens(drafts):
                return None
            out = np.empty(matcher.num_words, dtype=np.int32)
            matcher.fill_bitmask(out)
            matcher.rollback(len(drafts))
            return out
        except Exception:  # noqa: BLE001 - the next `bitmasks` reports the failure
            return None

    def _synced(self, request: Request) -> GrammarMatcher:
        """The request's matcher, having accepted every output token the request has."""
        matcher = self._matchers.get(request.request_id)
        output = request.output_token_ids
        if matcher is None or matcher.num_accepted > len(output):
            matcher = self.backend.new_matcher(request.sampling_params.structured_output)
            self._matchers[request.request_id] = matcher
        matcher.accept_tokens(output[matcher.num_accepted :])
        return matcher

    def _eos_only(self, num_rows: int) -> np.ndarray:
        out = np.zeros((num_rows, self.backend.num_words), dtype=np.int32)
        eos = self.backend.eos_token_id
        out[:, eos // 32] = np.uint32(1 << (eos % 32)).view(np.int32)
        return out
