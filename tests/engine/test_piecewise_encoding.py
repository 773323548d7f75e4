"""A long text encoded in pieces (`piecewise_encoding`) gives exactly the ids of one encode of the
whole text, for the byte-level and sentencepiece tokenizers the tests build and for SmolLM2's real
tokenizer; where a tokenizer would not give the same ids, the text is not cut."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import normalizers, processors

from helix_server.default_model.smollm2 import smollm2_gguf_file
from helix_server.engine import piecewise_encoding
from helix_server.engine.piecewise_encoding import PIECE_CHARS, encode_in_pieces
from helix_server.engine.tokenizer import Tokenizer
from helix_server.engine.tokenizer_spec import read_tokenizer_spec
from tests.engine.test_tokenizer import build_byte_level, build_sentencepiece

WORDS = [
    "the", "a", "tokenizer", "pieces", "def", "return", "x", "42", "3.14", "(", ")", "==", "{",
    "}", "中文", "日本語", "😀", "café", "<s>", "</s>", "<|im_start|>", "'s", "don't", "\t", "\n",
    "\n\n", "  ", "   ", " ", "Ġ", "\u2581", "naïve", "-", "--", "...",
]  # fmt: skip


def _long_text(rng: random.Random, chars: int) -> str:
    """Words, mostly single-spaced, with runs of spaces, newlines, tabs, unicode and special-token text."""
    parts, size = [], 0
    while size < chars:
        word = (
            rng.choice(WORDS)
            if rng.random() < 0.4
            else "".join(rng.choices("abcdefghij", k=rng.randint(1, 8)))
        )
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_llama", "metaspace", "smollm2"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        return build_byte_level(out)
    if request.param == "smollm2":
        return Tokenizer(read_tokenizer_spec(smollm2_gguf_file()))
    return build_sentencepiece(out, "llama" if request.param == "sentencepiece_llama" else "metaspace")


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_a_long_text_encodes_to_the_ids_of_the_whole(tokenizer: Tokenizer, add_special_tokens: bool) -> None:
    text = _long_text(random.Random(0), 6 * PIECE_CHARS)
    whole = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens).ids
    assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == whole


def test_a_long_text_as_plain_text_encodes_to_the_ids_of_the_whole(tokenizer: Tokenizer) -> None:
    text = _long_text(random.Random(1), 6 * PIECE_CHARS)
    plain = RustTokenizer.from_str(tokenizer.backend.to_str())
    plain.encode_special_tokens = True
    assert tokenizer.encode_as_text(text) == plain.encode(text, add_special_tokens=False).ids


def test_which_tokenizers_are_cut(tokenizer: Tokenizer) -> None:
    """The pre-tokenizing tokenizers are cut about every PIECE_CHARS characters. Llama-2's legacy
    normalizer prepends "▁" to every text it sees, so a piece would not encode as it does inside the
    whole, except right after a special token (the text after one is normalized on its own anyway):
    it is cut only there."""
    text = _long_text(random.Random(2), 6 * PIECE_CHARS)
    cuts = piecewise_encoding._cuts(tokenizer.backend, text)
    if "sentencepiece_llama" in tokenizer.name:
        assert cuts and all(text[:cut].endswith(("<s>", "</s>")) for cut in cuts)
    else:
        assert 4 <= len(cuts) <= 6
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert all(PIECE_CHARS // 2 <= n <= PIECE_CHARS * 3 // 2 for n in lengths), lengths


def test_a_text_without_spaces_is_not_cut(tokenizer: Tokenizer) -> None:
    text = "x" * (3 * PIECE_CHARS)
    assert piecewise_encoding._cuts(tokenizer.backend, text) == []
    assert tokenizer.encode(text) == tokenizer.backend.encode(text).ids


def test_a_stripping_normalizer_refuses_every_cut(tmp_path: Path) -> None:
    backend = build_byte_level(tmp_path).backend
    backend.normalizer = normalizers.Strip()  # a piece's leading space would be lost
    text = _long_text(random.Random(3), 4 * PIECE_CHARS)
    assert piecewise_encoding._cuts(backend, text) == []
    assert encode_in_pieces(backend, text, add_special_tokens=True) == backend.encode(text).ids


def test_special_tokens_wrap_the_joined_pieces(tmp_path: Path) -> None:
    """A post-processor that puts BOS before and EOS after a sequence puts them around the whole."""
    backend = build_sentencepiece(tmp_path, "metaspace").backend
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))],
    )
    text = _long_text(random.Random(4), 4 * PIECE_CHARS)
    ids = encode_in_pieces(backend, text, add_special_tokens=True)
    assert ids == backend.encode(text).ids
    assert ids[0] == backend.token_to_id("<s>") and ids[-1] == backend.token_to_id("</s>")
    assert piecewise_encoding._cuts(backend, text)  # the text was cut: the wrapping was put around pieces


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(
        st.sampled_from(WORDS) | st.text(alphabet="ab é中\n", min_size=1, max_size=6), max_size=120
    )
)
def test_short_pieces_give_the_ids_of_the_whole(tokenizer: Tokenizer, monkeypatch, words: list[str]) -> None:
    """With pieces of 16 characters, any text of these words is cut in many places: same ids."""
    monkeypatch.setattr(piecewise_encoding, "PIECE_CHARS", 16)
    text = " ".join(words)
    for add_special_tokens in (True, False):
        whole = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens).ids
        assert encode_in_pieces(tokenizer.backend, text, add_special_tokens) == whole
