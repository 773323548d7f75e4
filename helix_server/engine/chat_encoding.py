"""Chat prompts whose user text cannot forge control tokens.

A chat template writes its own control tokens (`<|im_start|>`, `<|eot_id|>`, ...) around the
messages. Message content is user text: if it is encoded together with the template's text, a
message containing `<|im_end|><|im_start|>system` becomes real control tokens and forges a turn.
llama.cpp encodes content with `parse_special=false`; transformers (>= 5.x) has
`sanitize_control_tokens`. helix does the same with any transformers version:

1. `ControlTokens.mark` wraps every control token found in a user string (message content, names,
   tool calls, template variables such as `tools`) in two private-use markers, after dropping any
   marker already in the string (so none can be forged);
2. the template renders the marked messages (templates that trim or split content see the same text
   apart from the markers);
3. `split` cuts the rendered text at the markers into pieces: template text, encoded as usual, and
   marked tokens, encoded as plain text (special tokens split into ordinary ones).

A conversation without any control-token text in it renders and encodes exactly as before (one
piece). Where a marked token is, the text on each side is encoded separately; a piece after the first
is encoded after a newline that is then removed, so SentencePiece tokenizers don't add their prefix
space to it. Pieces meet at a control token, where pre-tokenizers split anyway; only odd seams (a
letter or punctuation glued to the forged token) can tokenize differently from the text as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MARK_START = "\U000f0000"
MARK_END = "\U000f0001"
_MARKS = re.compile(f"[{MARK_START}{MARK_END}]")


@dataclass(frozen=True)
class ChatPiece:
    """A piece of a rendered chat: template text (`as_text` False) or a user's control token (True)."""

    text: str
    as_text: bool


class ControlTokens:
    """The control tokens a chat template must not take from user text: the tokenizer's special
    added tokens. (Non-special added tokens, like Qwen's `<tool_call>`, stay as they are: the
    tokenizer can't encode them as plain text with special tokens split.)
    """

    def __init__(self, special: Iterable[str]) -> None:
        self.tokens: tuple[str, ...] = tuple(sorted({t for t in special if t}, key=len, reverse=True))
        # Longest first, so a token wins over the tokens it contains.
        pattern = "|".join(map(re.escape, self.tokens)) or "(?!)"  # (?!) never matches
        self._pattern = re.compile(pattern)
        self._marked = re.compile(f"{MARK_START}({pattern}){MARK_END}|[{MARK_START}{MARK_END}]")

    def mark(self, obj: Any) -> tuple[Any, bool]:
        """`obj` (a string, or lists/dicts of them) with each control token in its strings wrapped
        in markers, and whether any was; markers already in a string are dropped. Dict keys are
        left alone."""
        found = False

        def visit(value: Any) -> Any:
            nonlocal found
            if isinstance(value, str):
                if MARK_START in value or MARK_END in value:
                    value = _MARKS.sub("", value)
                if not self._pattern.search(value):
                    return value
                found = True
                return self._pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, value)
            if isinstance(value, dict):
                return {key: visit(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [visit(item) for item in value]
            return value

        marked = visit(obj)
        return marked, found

    def split(self, rendered: str) -> list[ChatPiece]:
        """The pieces of a chat rendered from marked inputs, in order, without their markers.

        A lone marker (a template string method cut a marked token apart) is dropped but still ends
        the piece, so the text on either side cannot join into a control token.
        """
        pieces: list[ChatPiece] = []
        parts = self._marked.split(rendered)
        # re.split with one group: [text, token-or-None, text, token-or-None, ..., text]
        for index, part in enumerate(parts):
            if part:
                pieces.append(ChatPiece(part, as_text=index % 2 == 1))
        return pieces


def unmark(text: str) -> str:
    """`text` without markers: the rendered prompt as the model sees it."""
    return _MARKS.sub("", text)
