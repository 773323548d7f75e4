"""`GrammarMatcher`: one sequence's position in its grammar (llguidance's `LLMatcher`).

The matcher follows the tokens the sequence has accepted; `fill_bitmask` writes which tokens may
come next. llguidance never raises for bad tokens: a matcher that consumed a forbidden token is in
an error state (`error`), and its bitmask then allows only EOS so the sequence ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from llguidance import LLMatcher


class GrammarMatcher:
    """Accepts tokens, computes the next-token bitmask, and rolls back (for rejected drafts).

    The bitmask is int32 words, bit `t % 32` of word `t // 32` set when token t is allowed
    (`num_words = ceil(vocab_size / 32)`).
    """

    def __init__(self, matcher: LLMatcher, eos_token_id: int, num_words: int) -> None:
        self._matcher = matcher
        self._eos_token_id = eos_token_id
        self.num_words = num_words
        # Per accepted token: whether llguidance consumed it (an EOS after a stop is only counted).
        self._consumed: list[bool] = []

    @property
    def num_accepted(self) -> int:
        """Tokens accepted so far."""
        return len(self._consumed)

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a forbidden token, a resource limit), or None."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and EOS was consumed (nothing may follow)."""
        return self._matcher.is_stopped()

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Consume `token_ids` (all of them, or the matcher ends in its error state); True on success."""
        for token_id in token_ids:
            # A complete grammar may stop the matcher by itself; the EOS that follows is then fine.
            consume = not (self._matcher.is_stopped() and token_id == self._eos_token_id)
            if consume:
                self._matcher.consume_token(token_id)
                if self._matcher.is_error():
                    return False
            self._consumed.append(consume)
        return True

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids` the grammar allows in a row from here (nothing is consumed)."""
        return self._matcher.validate_tokens(list(token_ids)) if token_ids else 0

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens."""
        if num_tokens <= 0:
            return
        undone = self._consumed[-num_tokens:]
        del self._consumed[-num_tokens:]
        self._matcher.rollback(sum(undone))

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the next-token bitmask into `out`, int32 `[num_words]`; EOS only after an error."""
        if self._matcher.is_error() or self._matcher.is_stopped():
            out[:] = 0
            out[self._eos_token_id // 32] = np.int32(np.uint32(1 << (self._eos_token_id % 32)).view(np.int32))
            return
        out[:] = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.int32)[: self.num_words]
