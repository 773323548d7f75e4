"""Engine `TokenLogprob`s -> OpenAI's two logprobs formats (legacy completions, and chat)."""

from __future__ import annotations

import math

from helix_server.api.protocol.chat import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob
from helix_server.api.protocol.completions import CompletionLogprobs
from helix_server.engine.tokenizer import Tokenizer
from helix_server.runner.output import TokenLogprob


def _finite(value: float) -> float:
    """JSON has no -inf: a token the filters ruled out reports the most negative float."""
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprob], top_n: int) -> ChatLogprobs:
    """`{"content": [{token, logprob, bytes, top_logprobs: [...]}]}` for these tokens."""
    content = []
    for entry in logprobs:
        top = [
            ChatTopLogprob(
                token=tokenizer.token_text(token_id),
                logprob=_finite(logprob),
                bytes=list(tokenizer.token_bytes(token_id)),
            )
            for token_id, logprob in entry.top[:top_n]
        ]
        content.append(
            ChatTokenLogprob(
                token=tokenizer.token_text(entry.token_id),
                logprob=_finite(entry.logprob),
                bytes=list(tokenizer.token_bytes(entry.token_id)),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


class LegacyLogprobsBuilder:
    """Builds the completions API's parallel lists, keeping `text_offset` running across chunks.

    Offsets are character positions in the text the choice returns (the prompt too, with echo).
    """

    def __init__(self, tokenizer: Tokenizer, top_n: int) -> None:
        self._tokenizer = tokenizer
        self._top_n = top_n
        self.offset = 0

    def build(self, logprobs: list[TokenLogprob | None], token_ids: list[int]) -> CompletionLogprobs:
        """Entries for `token_ids`; a None logprob (the first prompt token) gives null entries."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs):
            text = self._tokenizer.token_text(token_id)
            result.tokens.append(text)
            result.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_finite(entry.logprob))
            top: dict[str, float] = {}
            for top_id, logprob in entry.top[: self._top_n]:
                top.setdefault(self._tokenizer.token_text(top_id), _finite(logprob))
            result.top_logprobs.append(top)
        return result


def merge_legacy(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    """Append `more`'s entries to `into`."""
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
    into.text_offset.extend(more.text_offset)
