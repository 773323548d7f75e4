"""Incremental detokenization: whole characters only, exact stop strings, deltas that add up.

Runs against a byte-level BPE (characters split across tokens holding parts of several characters)
and two Llama-2-style sentencepiece tokenizers whose CJK and emoji fall back to `<0xNN>` byte tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helix_server.engine.detokenizer import IncrementalDetokenizer
from helix_server.engine.tokenizer import Tokenizer
from tests.engine.test_tokenizer import build_byte_level, build_sentencepiece

MULTIBYTE_TEXT = "中文字符 こんにちは 😀😃 👍🏽 🇫🇷 👨‍👩‍👧 café 𝔘𝔫𝔦 Привет"


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    return build_byte_level(tmp_path_factory.mktemp("byte_level"))


@pytest.fixture(scope="module", params=["byte_level", "llama", "metaspace"])
def tok(request, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        return build_byte_level(path)
    return build_sentencepiece(path, request.param)


def stream(
    tok: Tokenizer, prompt: Sequence[int], ids: Sequence[int], chunk: int = 1, **kwargs
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `ids` `chunk` at a time, then flush; return every delta (flush's last)."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas = [detok.add_tokens(list(ids[i : i + chunk])) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas, detok


def reference(tok: Tokenizer, prompt: Sequence[int], ids: Sequence[int], skip: bool = True) -> str:
    """The output's text as it reads after the prompt, decoded all at once."""
    before = tok.decode(list(prompt), skip_special_tokens=skip)
    full = tok.decode(list(prompt) + list(ids), skip_special_tokens=skip)
    assert full.startswith(before)
    return full[len(before) :]


def cut_at_stop(text: str, stops: Sequence[str], include: bool = False) -> tuple[str, str | None]:
    """Independent reference: scan end positions; the first stop string completed there wins."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)  # same end: the one starting earliest
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# -- whole characters ---------------------------------------------------------------------------------


def test_multibyte_characters_are_never_split(tok: Tokenizer) -> None:
    ids = encode(tok, MULTIBYTE_TEXT)
    partial = [i for i in ids if "\ufffd" in tok.token_text(i)]
    assert partial, "the text must exercise tokens holding part of a character"
    for chunk in (1, 2, 3):
        deltas, detok = stream(tok, [], ids, chunk=chunk)
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == detok.output_text == reference(tok, [], ids)
    assert tok.decode(ids).strip() == MULTIBYTE_TEXT


def test_characters_are_emitted_as_soon_as_complete(tok: Tokenizer) -> None:
    ids = encode(tok, "ab 中")
    detok = IncrementalDetokenizer(tok, [])
    out = [detok.add_tokens([i]) for i in ids]
    assert out[-1].endswith("中") and "".join(out).endswith(" 中")


def test_first_output_token_reads_as_after_the_prompt(tok: Tokenizer) -> None:
    prompt = encode(tok, "The capital is")
    ids = encode(tok, " lazy dog")
    deltas, _ = stream(tok, prompt, ids)
    assert "".join(deltas) == reference(tok, prompt, ids)
    assert "".join(deltas).startswith(" ")
    deltas, _ = stream(tok, [], ids)  # no prompt: exactly the output's own decode
    assert "".join(deltas) == tok.decode(ids)


def test_prompt_context_does_not_start_inside_a_character(tok: Tokenizer) -> None:
    prompt = encode(tok, "中文")  # sentencepiece: ▁ <0xE4> <0xB8> <0xAD> <0xE6> <0x96> <0x87>
    ids = [i for i in encode(tok, "字") if tok.token_bytes(i).strip()]  # the character's bytes only
    deltas, _ = stream(tok, prompt, ids)
    assert "".join(deltas) == reference(tok, prompt, ids) == "字"


def test_skipped_special_token_keeps_following_space(tok: Tokenizer) -> None:
    eos = min(tok.eos_token_ids)
    # Sentencepiece encoders prepend the space themselves.
    ids = encode(tok, "hello") + [eos] + encode(tok, " world" if tok.kind == "byte_level" else "world")
    for skip in (True, False):
        deltas, _ = stream(tok, encode(tok, "Say"), ids, skip_special_tokens=skip)
        assert "".join(deltas) == reference(tok, encode(tok, "Say"), ids, skip=skip)
    skipped, _ = stream(tok, [], ids, skip_special_tokens=True)
    assert "".join(skipped).endswith("hello world")
    kept, _ = stream(tok, [], ids, skip_special_tokens=False)
    assert tok.id_to_token(eos) in "".join(kept)


def test_invalid_bytes_are_emitted_not_held(byte_level: Tokenizer) -> None:
    lone = {byte_level.id_to_token(i): i for i in range(byte_level.vocab_size)}["Ģ"]  # byte 0x80
    assert byte_level.token_bytes(lone) == b"\x80"
    detok = IncrementalDetokenizer(byte_level, [])
    assert detok.add_tokens([lone]) == "\ufffd"
    assert detok.add_tokens(encode(byte_level, "ok")) == "ok"


# -- flush --------------------------------------------------------------------------------------------


def test_flush_drops_a_character_that_never_completed(tok: Tokenizer) -> None:
    ids = encode(tok, "ab 𝔘")
    cut = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith("\ufffd"))
    deltas, detok = stream(tok, [], ids[:cut])
    assert deltas[-1] == ""
    assert detok.output_text == tok.decode(ids[:cut]).rstrip("\ufffd") == "ab "
    assert detok.finished and detok.stop_reason is None
    assert detok.add_tokens(encode(tok, "x")) == "" and detok.flush() == ""


def test_flush_releases_a_held_stop_prefix(tok: Tokenizer) -> None:
    ids = encode(tok, "hello fo")
    detok = IncrementalDetokenizer(tok, [], stop=["fox"])
    emitted = "".join(detok.add_tokens([i]) for i in ids)
    assert not emitted.endswith("fo")
    assert emitted + detok.flush() == tok.decode(ids)
    assert detok.stop_reason is None and detok.finished


def test_flush_with_nothing_held_returns_empty(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add_tokens(encode(tok, "hello")) == tok.decode(encode(tok, "hello"))
    assert detok.flush() == ""
    assert IncrementalDetokenizer(tok, []).flush() == ""


# -- stop strings -------------------------------------------------------------------------------------

SENTENCE = "The quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize(
    "stops, expected, reason",
    [
        (["fox jum"], "The quick brown ", "fox jum"),  # spans several tokens
        (["uic"], "The q", "uic"),  # inside one token
        (["brown fox", "brown"], "The quick ", "brown"),  # one stop is a prefix of another
        (["brown", "brown fox"], "The quick ", "brown"),
        (["quick brown", "ick b"], "The qu", "ick b"),  # overlapping: the first to complete wins
        (["zzz"], SENTENCE, None),
    ],
)
def test_stop_strings_cut_exactly(tok: Tokenizer, stops, expected, reason) -> None:
    ids = encode(tok, SENTENCE)
    for chunk in (1, 2, len(ids)):
        deltas, detok = stream(tok, [], ids, chunk=chunk, stop=stops)
        assert "".join(deltas) == detok.output_text == expected
        assert detok.stop_reason == reason
        assert detok.finished


def test_stop_string_is_never_partly_emitted_and_holding_is_minimal(tok: Tokenizer) -> None:
    ids = encode(tok, SENTENCE)
    detok = IncrementalDetokenizer(tok, [], stop=["fox jum"])
    seen = ""
    for k, token_id in enumerate(ids, start=1):
        seen += detok.add_tokens([token_id])
        assert "f" not in seen  # no part of the stop string ever leaves
        if detok.finished:
            break
        full = tok.decode(ids[:k])
        if not any(full.endswith("fox jum"[:size]) for size in range(1, 8)):
            assert seen == full  # nothing is held back without reason
    assert detok.stop_reason == "fox jum" and seen == "The quick brown "
    assert detok.add_tokens(encode(tok, " more")) == "" and detok.flush() == ""


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    ids = encode(tok, SENTENCE)
    deltas, detok = stream(tok, [], ids, stop=["fox jum"], include_stop_str_in_output=True)
    assert "".join(deltas) == "The quick brown fox jum"
    assert detok.stop_reason == "fox jum"


def test_stop_string_across_byte_tokens(tok: Tokenizer) -> None:
    ids = encode(tok, MULTIBYTE_TEXT)
    for stop, include in (("😃 👍", False), ("こんにちは", True)):
        deltas, detok = stream(tok, [], ids, stop=[stop], include_stop_str_in_output=include)
        expected, reason = cut_at_stop(reference(tok, [], ids), [stop], include)
        assert reason == stop
        assert "".join(deltas) == expected
        assert not any("\ufffd" in d for d in deltas)


def test_stop_string_with_special_tokens_kept(byte_level: Tokenizer) -> None:
    ids = encode(byte_level, "answer<|im_end|>junk")
    deltas, detok = stream(byte_level, [], ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(deltas) == "answer" and detok.stop_reason == "<|im_end|>"


# -- cost -------------------------------------------------------------------------------------------


def test_each_step_decodes_a_small_window(tok: Tokenizer, monkeypatch) -> None:
    ids = encode(tok, (SENTENCE + " " + MULTIBYTE_TEXT + "\n") * 60)
    windows: list[int] = []
    real_decode = tok.decode

    def spy(token_ids, skip_special_tokens=True):
        windows.append(len(token_ids))
        return real_decode(token_ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    deltas, _ = stream(tok, encode(tok, "prompt " * 50), ids, stop=["never appears"])
    monkeypatch.undo()
    assert len(ids) > 1500
    assert max(windows) <= 12
    assert len(windows) <= 2 * len(ids) + 10
    assert "".join(deltas) == reference(tok, encode(tok, "prompt " * 50), ids)


# -- properties ---------------------------------------------------------------------------------------

_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), prompt_text=_TEXT, text=_TEXT, chunk=st.integers(1, 4), include=st.booleans())
def test_property_deltas_add_up(tok: Tokenizer, data, prompt_text, text, chunk, include) -> None:
    prompt, ids = encode(tok, prompt_text), encode(tok, text)
    full = reference(tok, prompt, ids)
    stops: list[str] = []
    if full and data.draw(st.booleans(), label="use_stop"):
        start = data.draw(st.integers(0, len(full) - 1), label="stop_start")
        size = data.draw(st.integers(1, min(8, len(full) - start)), label="stop_size")
        stops = [full[start : start + size], data.draw(_TEXT.filter(bool), label="other_stop")]
    deltas, detok = stream(tok, prompt, ids, chunk=chunk, stop=stops, include_stop_str_in_output=include)
    expected, reason = cut_at_stop(full, stops, include)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.output_text == expected
    assert detok.stop_reason == reason


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 511), max_size=60), chunk=st.integers(1, 3))
def test_property_random_ids_byte_level(byte_level: Tokenizer, ids, chunk) -> None:
    """Arbitrary model output (invalid UTF-8 included) still adds up to the full decode."""
    deltas, detok = stream(byte_level, [], ids, chunk=chunk)
    full = byte_level.decode(ids)
    text = "".join(deltas)
    assert text == full or (full.endswith("\ufffd") and text == full[:-1])
