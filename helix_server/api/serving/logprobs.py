"""Engine `TokenLogprob`s -> OpenAI's two logprobs formats (legacy completions, and chat), and
vLLM's `prompt_logprobs`."""

from __future__ import annotations

import math

from helix_server.api.protocol.chat import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob
from helix_server.api.protocol.common import PromptLogprob, PromptLogprobs
from helix_server.api.protocol.completions import CompletionLogprobs
from helix_server.engine.tokenizer import Tokenizer
from helix_server.step_contract import TokenLogprob


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
    Echoed tokens are placed by their bytes in the echoed text (see `echo_offsets`).
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
        `echoed_text`: these are the echoed prompt's tokens and this its text (the choice's start)."""
        result = CompletionLogprobs()
        if echoed_text is not None:
            result.text_offset = echo_offsets(self._tokenizer, token_ids, echoed_text)
            self.offset = len(echoed_text)
        for token_id, entry in zip(token_ids, logprobs):
            text = self._tokenizer.token_text(token_id)
            result.tokens.append(text)
            if echoed_text is None:
                result.text_offset.append(self.offset)
                if token_id not in self._special or not self._skip_special:
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


# Bytes that start a UTF-8 character (all but the continuation bytes 0b10xxxxxx).
_LEAD_BYTES = bytes(b for b in range(256) if b & 0xC0 != 0x80)


def echo_offsets(tokenizer: Tokenizer, token_ids: list[int], echoed_text: str) -> list[int]:
    """The character offset of each prompt token in `echoed_text`, found by walking its UTF-8 bytes.

    A token whose bytes come next takes them; a special token whose text is not there (a BOS the
    tokenizer added) takes none; a token whose leading space the text lacks (sentencepiece's first
    word) takes the rest. A token that starts inside a character (a split UTF-8 character) points at
    that character. Anything else takes its length, so offsets never stall.
    """
    data = echoed_text.encode("utf-8")
    offsets = []
    position = 0  # byte position in data
    counted, chars = 0, 0  # chars = characters started in data[:counted]
    for token_id in token_ids:
        token = tokenizer.token_bytes(token_id)
        segment = data[counted:position]
        chars += len(segment) - len(segment.translate(None, _LEAD_BYTES))  # lead bytes start characters
        counted = position
        inside = position < len(data) and data[position] & 0xC0 == 0x80
        offsets.append(chars - 1 if inside else chars)
        if data.startswith(token, position):
            position += len(token)
        elif token_id in tokenizer.all_special_ids:
            continue
        elif token[:1] == b" " and data.startswith(token[1:], position):
            position += len(token) - 1
        else:
            position = min(len(data), position + len(token))
    return offsets


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
