"""Engine `TokenLogprob`s -> OpenAI's two logprobs formats (legacy completions, and chat), and
vLLM's `prompt_logprobs`."""

from __future__ import annotations

import math

from helix_server.api.protocol.chat import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob
from helix_server.api.protocol.common import PromptLogprob, PromptLogprobs
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

    Offsets are character positions in the text the choice returns (the prompt too, with echo); a
    token left out of that text takes no room in it: a generated special token under
    `skip_special_tokens`, or an echoed special token the tokenizer added to a text prompt (a BOS).
    Each `top_logprobs` entry holds the `top_n` most likely tokens plus the chosen one (as OpenAI
    and vLLM do), so it has `top_n + 1` items when the chosen token is not among the most likely
    (fewer when tokens share a text, e.g. parts of one UTF-8 character).
    """

    def __init__(self, tokenizer: Tokenizer, top_n: int, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._top_n = top_n
        self._special = tokenizer.all_special_ids
        self._skip_special = skip_special_tokens
        self.offset = 0

    def build(
        self, logprobs: list[TokenLogprob | None], token_ids: list[int], echoed_text: str | None = None
    ) -> CompletionLogprobs:
        """Entries for `token_ids`; a None logprob (the first prompt token) gives null entries.
        `echoed_text`: these are the echoed prompt's tokens and this its text (the choice's start);
        a special token among them takes room only where its text stands in `echoed_text`."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs):
            text = self._tokenizer.token_text(token_id)
            result.tokens.append(text)
            result.text_offset.append(self.offset)
            if token_id not in self._special:
                in_text = True
            elif echoed_text is not None:
                in_text = echoed_text.startswith(text, self.offset)
            else:
                in_text = not self._skip_special
            if in_text:
                self.offset += len(text)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_finite(entry.logprob))
            top: dict[str, float] = {}
            for top_id, logprob in entry.top[: self._top_n]:
                top.setdefault(self._tokenizer.token_text(top_id), _finite(logprob))
            # The chosen token's own entry wins over an alternative with the same text (split bytes).
            top[text] = _finite(entry.logprob)
            result.top_logprobs.append(top)
        return result


def merge_legacy(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    """Append `more`'s entries to `into`."""
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
    into.text_offset.extend(more.text_offset)


def prompt_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprob | None] | None, top_n: int
) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt position, null (the first token) or token id ->
    `{logprob, rank, decoded_token}` for the prompt token and the `top_n` most likely tokens."""
    result: PromptLogprobs = []
    for entry in logprobs or []:
        if entry is None:
            result.append(None)
            continue
        text = tokenizer.token_text(entry.token_id)
        position = {entry.token_id: PromptLogprob(_finite(entry.logprob), entry.rank, text)}
        for rank, (token_id, logprob) in enumerate(entry.top[:top_n], start=1):
            alternative = PromptLogprob(_finite(logprob), rank, tokenizer.token_text(token_id))
            position.setdefault(token_id, alternative)
        result.append(position)
    return result
