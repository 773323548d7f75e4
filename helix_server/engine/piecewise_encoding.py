"""Encoding a long text in pieces, so the GIL is never held for long by one tokenizer object.

`tokenizers` releases the GIL while it encodes, but not while it frees what it made: an `Encoding`
of a million tokens holds a million token strings (and offsets, masks, word ids), and freeing it
took 0.1-0.2 s on a 2-core machine (3.9 MB of text, 1.2M ids), during which no other Python thread
runs: not the event loop, not the engine thread. Converting its ids into a Python list is another
such stretch.

So a text longer than `PIECE_CHARS * 2` characters is cut into pieces of about `PIECE_CHARS`
characters, each encoded, read and freed on its own (a few milliseconds each), and the ids joined.
The result is the same ids as one `encode` of the whole text: a text is cut only before a single
space between two non-space characters (where the pre-tokenizers of the BPE and SentencePiece
tokenizers we serve split anyway), and only where the tokenizer itself agrees: the few dozen
characters around the cut encode to the same ids whole as in two parts. A text with no such place
(no spaces, a normalizer that strips) is encoded whole, as before. The special tokens the
tokenizer adds (BOS, or whatever its post-processor wraps a sequence in) are added once, around the
joined ids, as they are around a whole text.
"""

from __future__ import annotations

from typing import Any

PIECE_CHARS = 32_768
# Characters on each side of a cut that are encoded to check it.
_CHECK_CHARS = 48
# Cuts checked in one stretch of text before looking further on.
_CHECKS_PER_STRETCH = 8


def encode_in_pieces(backend: Any, text: str, add_special_tokens: bool) -> list[int]:
    """The ids of `backend.encode(text, add_special_tokens)`, encoded piece by piece when long.

    `backend` is a `tokenizers.Tokenizer`; every call goes through `encode_batch`, which releases
    the GIL while it works.
    """
    if len(text) <= PIECE_CHARS * 2 or backend.truncation is not None or backend.padding is not None:
        return _encode(backend, text, add_special_tokens)
    wrapping = _special_wrapping(backend) if add_special_tokens else ([], [])
    cuts = _cuts(backend, text) if wrapping is not None else []
    if not cuts:
        return _encode(backend, text, add_special_tokens)
    prefix, suffix = wrapping
    ids = list(prefix)
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        # One piece's Encoding is built, read and freed here, before the next one exists.
        ids += _encode(backend, text[start:end], add_special_tokens=False)
    ids += suffix
    return ids


def _encode(backend: Any, text: str, add_special_tokens: bool) -> list[int]:
    # encode_batch, not encode: it releases the GIL while it works (encode holds it).
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def _cuts(backend: Any, text: str) -> list[int]:
    """Where to cut `text`: increasing offsets, each the start of a piece after the first."""
    cuts: list[int] = []
    start, search_end = 0, PIECE_CHARS
    while search_end < len(text) - PIECE_CHARS // 2:
        cut = _last_cut_in(backend, text, max(start + 1, search_end - PIECE_CHARS // 2), search_end)
        if cut is None:  # no place to cut here: look further on (this piece grows)
            search_end += PIECE_CHARS // 2
            continue
        cuts.append(cut)
        start, search_end = cut, cut + PIECE_CHARS
    return cuts


def _last_cut_in(backend: Any, text: str, low: int, high: int) -> int | None:
    """The last offset in [low, high) that is a space between two non-space characters and that
    the tokenizer encodes the same across as in two parts; None if the first few candidates fail."""
    checks = 0
    at = text.rfind(" ", low, high)
    while at > low and checks < _CHECKS_PER_STRETCH:
        if not text[at - 1].isspace() and not text[at + 1].isspace():
            checks += 1
            if _cut_keeps_ids(backend, text, at):
                return at
        at = text.rfind(" ", low, at)
    return None


def _cut_keeps_ids(backend: Any, text: str, at: int) -> bool:
    left, right = text[max(0, at - _CHECK_CHARS) : at], text[at : at + _CHECK_CHARS]
    whole, first, second = backend.encode_batch([left + right, left, right], add_special_tokens=False)
    return whole.ids == first.ids + second.ids


def _special_wrapping(backend: Any) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer's post-processor puts before and after a sequence's own ids; None if
    they are not simply around them."""
    plain = _encode(backend, "a", add_special_tokens=False)
    wrapped = _encode(backend, "a", add_special_tokens=True)
    for at in range(len(wrapped) - len(plain) + 1):
        if wrapped[at : at + len(plain)] == plain:
            return wrapped[:at], wrapped[at + len(plain) :]
    return None
