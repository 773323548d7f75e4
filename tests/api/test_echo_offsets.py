"""`echo_offsets`: where each echoed prompt token starts in the echoed text, for tokenizers whose
token texts don't simply add up to it (sentencepiece's dropped leading space, an added BOS)."""

from __future__ import annotations

import pytest

from helix_server.api.serving.logprobs import echo_offsets
from tests.engine.test_tokenizer import build_sentencepiece


@pytest.fixture(scope="module", params=["llama", "metaspace"])
def sentencepiece(request, tmp_path_factory):
    return build_sentencepiece(tmp_path_factory.mktemp(f"sp_{request.param}"), request.param)


def test_sentencepiece_first_word_without_its_space(sentencepiece):
    text = "def f(x): return x"
    ids = sentencepiece.encode(text, add_special_tokens=False)
    tokens = [sentencepiece.token_text(t) for t in ids]
    assert tokens[0] == " def" and "".join(tokens) == " " + text
    offsets = echo_offsets(sentencepiece, ids, text)
    assert offsets[0] == 0
    for token, offset in zip(tokens[1:], offsets[1:]):
        assert text[offset : offset + len(token)] == token, (token, offset)


def test_a_bos_the_text_does_not_show_takes_no_room(sentencepiece):
    text = "x = 1"
    bos = sentencepiece.bos_token_id
    ids = [bos, *sentencepiece.encode(text, add_special_tokens=False)]
    offsets = echo_offsets(sentencepiece, ids, text)
    assert offsets[:2] == [0, 0]
    with_bos = sentencepiece.decode(ids, skip_special_tokens=False)
    assert with_bos.startswith("<s>") and echo_offsets(sentencepiece, ids, with_bos)[1] == 3
