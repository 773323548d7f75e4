"""Turning a request's output tokens into text as they arrive, and finding its stop strings.

`IncrementalDetokenizer.add_tokens()` returns only text that is final: it never splits a multi-byte
character (a character spread over byte-level or `<0xNN>` byte-fallback tokens is held back until
its last byte arrives) and never emits the beginning of a stop string before it is known not to be
one. Concatenating every delta (and `flush()`'s) gives the same text as decoding all output tokens at
once (as they read after the prompt, see below), truncated at the stop string when one matched; the
only exception is a last character whose bytes never all arrived, which `flush()` drops.

Cost per token is constant: each step decodes a small window of recent tokens, `[prefix_offset,
read_offset)` for text already emitted and `[prefix_offset, end)` for that plus the new tokens, and
emits the difference. The window always starts on a whole character, and its first token is decoded
the same way in both halves, so a sentencepiece decoder stripping the leading space of a sequence's
first token cannot add or drop a space in the middle of the output.

The first output tokens are decoded after the last few prompt tokens, which is how they read in the
full text: "The capital of France is" + " Paris", not + "Paris". (With an empty prompt, or a
byte-level tokenizer, this is simply the decode of the output tokens.)
"""

from __future__ import annotations

from collections.abc import Sequence

from helix_server.engine.tokenizer import BYTE_LEVEL, OTHER, Tokenizer

# Prompt tokens decoded ahead of the output so its first token renders as it does after the prompt.
PROMPT_CONTEXT_TOKENS = 5
# For tokenizers whose token bytes are unknown: how many tokens a trailing U+FFFD may be held for.
_MAX_HELD_TOKENS = 4
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Incremental decoding of one sequence's output, with stop strings.

    `add_tokens()` returns the newly final text. Once a stop string appears, the text is cut right
    before it (right after it with `include_stop_str_in_output`), `stop_reason` holds it, `finished`
    becomes True and later calls return "". When the sequence ends for another reason (EOS, length),
    `flush()` returns what was held back, dropping only a trailing character whose bytes never
    completed. When several stop strings match, the one that is complete first in the text wins
    (ties: the one that starts first), so the result does not depend on how text is split into tokens.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self.finished = False
        self.stop_reason: str | None = None
        # Off while a request's `min_tokens` are not yet generated: text then passes unchecked.
        self.stop_strings_active = True

        context = self._prompt_context(prompt_token_ids)
        self._ids: list[int] = list(context)  # prompt context + output tokens
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(0, len(context))
        self._held = ""  # final text kept back because it may be the start of a stop string
        self._pieces: list[str] = []

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Take newly generated token ids; return the text that became final (possibly "")."""
        if self.finished or not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        end = len(self._ids)
        text = self._decode(self._prefix_offset, end)
        if text.endswith(_REPLACEMENT) and self._ends_mid_character():
            return ""
        delta = text[len(self._prefix_text) :]
        self._advance(end, text)
        return self._emit(delta, final=False)

    def flush(self) -> str:
        """End the sequence: return all text still held back (the sequence stopped on EOS or length)."""
        if self.finished:
            return ""
        delta = ""
        if self._read_offset < len(self._ids):
            text = self._decode(self._prefix_offset, len(self._ids))
            if text.endswith(_REPLACEMENT) and self._tail_is_incomplete_utf8():
                text = self._drop_incomplete_tail(text)
            delta = text[len(self._prefix_text) :]
            self._read_offset = len(self._ids)
        out = self._emit(delta, final=True)
        self.finished = True
        return out

    # -- internals ----------------------------------------------------------------------------------

    def _advance(self, end: int, text: str) -> None:
        """Mark tokens up to `end` as read; `text` is the decode of `[prefix_offset, end)`.

        The window moves to start at the old read offset (a whole character) only when the tokens
        from there decode to visible text. Otherwise the first visible token would be the window's
        first, and a sentencepiece decoder would strip its leading space; so the window grows instead
        (only across tokens that decode to nothing, such as skipped special tokens).
        """
        new_prefix_text = self._decode(self._read_offset, end)
        if new_prefix_text:
            self._prefix_offset, self._prefix_text = self._read_offset, new_prefix_text
        else:
            self._prefix_text = text
        self._read_offset = end

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The last few prompt tokens, not starting inside a multi-byte character."""
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._tokenizer.kind == OTHER:
            return context
        while context and _starts_with_continuation_byte(self._tokenizer.token_bytes(context[0])):
            context.pop(0)
        return context

    def _unread_bytes(self) -> bytes:
        special = self._tokenizer.all_special_ids if self._skip_special_tokens else ()
        token_bytes = self._tokenizer.token_bytes
        return b"".join(token_bytes(t) for t in self._ids[self._read_offset :] if t not in special)

    def _tail_is_incomplete_utf8(self) -> bool:
        return _incomplete_utf8_tail(self._unread_bytes()) > 0

    def _ends_mid_character(self) -> bool:
        """Whether the decoded window's trailing U+FFFD is a character whose other bytes may still come.

        For tokenizers of unknown byte layout, a trailing U+FFFD is held for a few tokens only.
        """
        if self._tokenizer.kind == OTHER:
            return len(self._ids) - self._read_offset < _MAX_HELD_TOKENS
        return self._tail_is_incomplete_utf8()

    def _drop_incomplete_tail(self, text: str) -> str:
        """`text` without the trailing character whose bytes never completed."""
        if self._tokenizer.kind == BYTE_LEVEL:
            return text[:-1]  # byte-level decoders render an incomplete tail as one U+FFFD
        # Byte-fallback decoders turn a whole run of byte tokens into U+FFFDs when it does not decode,
        # so drop the unfinished byte tokens themselves.
        for end in range(len(self._ids) - 1, self._read_offset - 1, -1):
            shorter = self._decode(self._prefix_offset, end)
            if not shorter.endswith(_REPLACEMENT) or end == self._read_offset:
                return shorter
        return text

    def _emit(self, delta: str, final: bool) -> str:
        """Apply stop strings to newly final text; record and return what may be shown."""
        if not self._stop or not self.stop_strings_active:
            out = self._held + delta
            self._held = ""
        else:
            text = self._held + delta
            match = self._find_stop(text)
            if match is not None:
                start, stop = match
                out = text[: start + len(stop)] if self._include_stop else text[:start]
                self._held = ""
                self.stop_reason = stop
                self.finished = True
            else:
                keep = 0 if final else self._partial_stop_len(text)
                out = text[: len(text) - keep]
                self._held = text[len(text) - keep :]
        if out:
            self._pieces.append(out)
        return out

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that is complete earliest in `text` (ties: the earliest start)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        if not text:
            return 0
        last, longest = text[-1], 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop[size - 1] == last and text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def _starts_with_continuation_byte(data: bytes) -> bool:
    return bool(data) and data[0] & 0xC0 == 0x80


def _incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of `data` begin a multi-byte UTF-8 character without finishing it."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: the lead byte is further back
        if byte & 0xE0 == 0xC0:
            needed = 2
        elif byte & 0xF0 == 0xE0:
            needed = 3
        elif byte & 0xF8 == 0xF0:
            needed = 4
        else:
            return 0  # ASCII or an invalid byte: nothing is waiting for more bytes
        return back if back < needed else 0
    return 0
