"""The tokenizer wrapper: EOS ids, chat templates, token bytes for byte-level and sentencepiece models.

The helpers at the top build small tokenizers locally (no hub) and are shared with the detokenizer
tests: a GPT-2-style byte-level BPE (the default model's recipe) and two Llama-2-style sentencepiece
BPEs with `<0x00>`..`<0xFF>` byte fallback (a legacy normalizer + Strip decoder, and a Metaspace
pre-tokenizer + decoder).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from helix_server.default_model import build_bpe_tokenizer
from helix_server.engine.tokenizer import BYTE_LEVEL, SENTENCEPIECE, Tokenizer, load_tokenizer
from helix_server.errors import ParameterError

ASCII_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n",
    "Streaming text arrives token by token; stop strings end it early. STOP here. The end.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation ( ) [ ] { } < > = + - * / % ! ? : ; , . ' \" # @ $ & ^ ~ `",
] * 8
# Multi-byte text in the byte-level corpus makes merges that hold only part of a character.
UNICODE_CORPUS = [
    "中文字符和日本語のテキスト。你好，世界！こんにちは世界。한국어 텍스트도 있습니다.",
    "Emoji: 😀😃😄😁 🎉🎊 👍🏽 🇫🇷 ❤️ — café naïve résumé Ωμέγα Привет мир",
] * 8


def build_byte_level(path: Path) -> Tokenizer:
    """A 512-token byte-level BPE made with the default model's recipe."""
    build_bpe_tokenizer(path, vocab_size=512, corpus=ASCII_CORPUS + UNICODE_CORPUS)
    return load_tokenizer(path)


def build_sentencepiece(path: Path, style: str = "llama") -> Tokenizer:
    """A Llama-2-like BPE with byte fallback: ASCII pieces only, so CJK and emoji become <0xNN> tokens.

    style "llama": Prepend/Replace normalizer and Replace+ByteFallback+Fuse+Strip decoder (Llama-2's
    tokenizer.json); style "metaspace": Metaspace pre-tokenizer and ByteFallback+Metaspace decoder.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(ASCII_CORPUS, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    raw = RawTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if style == "llama":
        raw.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        raw.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        raw.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581", prepend_scheme="first")]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(path)
    return load_tokenizer(path)


def _transformers(tokenizer: Tokenizer):
    """The tokenizer `tokenizer` was read from, loaded by transformers (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer.name, local_files_only=True)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    return build_byte_level(tmp_path_factory.mktemp("byte_level"))


@pytest.fixture(scope="module", params=["llama", "metaspace"])
def sentencepiece(request, tmp_path_factory) -> Tokenizer:
    return build_sentencepiece(tmp_path_factory.mktemp(f"sp_{request.param}"), request.param)


def test_kinds_and_vocab(byte_level: Tokenizer, sentencepiece: Tokenizer) -> None:
    assert byte_level.kind == BYTE_LEVEL
    assert sentencepiece.kind == SENTENCEPIECE
    assert byte_level.vocab_size == len(_transformers(byte_level)) == 512
    assert sentencepiece.vocab_size == len(_transformers(sentencepiece))
    assert {0, 1, 2} <= byte_level.all_special_ids
    assert byte_level.eos_token_ids == {0}


@pytest.mark.parametrize("text", ["hello world", "  two  spaces ", "中文 😀 café", "def f(x):\n\treturn x\n"])
def test_encode_decode_round_trip(byte_level: Tokenizer, sentencepiece: Tokenizer, text: str) -> None:
    assert byte_level.decode(byte_level.encode(text)) == text
    if not text.startswith(" "):  # sentencepiece decoders strip the space they prepended
        assert sentencepiece.decode(sentencepiece.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_ids_and_skippable(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("a<|im_end|>b")
    assert 2 in ids
    assert byte_level.decode(ids) == "ab"
    assert byte_level.decode(ids, skip_special_tokens=False) == "a<|im_end|>b"


def test_decode_does_not_clean_up_spaces(byte_level: Tokenizer) -> None:
    text = "x = f(a , b) . c 's"
    assert byte_level.decode(byte_level.encode(text)) == text


@pytest.mark.parametrize("text", ["hello world", "中文字符", "😀 café", " \t\n", "x<|endoftext|>y"])
def test_token_bytes_concatenate_to_text(byte_level: Tokenizer, sentencepiece: Tokenizer, text: str) -> None:
    ids = byte_level.encode(text)
    assert b"".join(byte_level.token_bytes(i) for i in ids) == text.encode("utf-8")
    if text[0].isalnum() or ord(text[0]) > 127:
        ids = sentencepiece.encode(text, add_special_tokens=False)
        # The sentencepiece normalizer prepends "▁" to the text: one extra leading space.
        assert b"".join(sentencepiece.token_bytes(i) for i in ids) == (" " + text).encode("utf-8")


def test_token_bytes_of_partial_characters(byte_level: Tokenizer, sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("中", add_special_tokens=False)
    assert [sentencepiece.id_to_token(i) for i in ids][-3:] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    assert [sentencepiece.token_bytes(i) for i in ids[-3:]] == [b"\xe4", b"\xb8", b"\xad"]
    assert sentencepiece.token_text(ids[-1]) == "\ufffd"
    byte_tokens = {byte_level.id_to_token(i): i for i in range(byte_level.vocab_size)}
    assert byte_level.token_bytes(byte_tokens["Ġ"]) == b" "
    assert byte_level.token_bytes(byte_tokens["Ċ"]) == b"\n"
    assert byte_level.token_bytes(byte_tokens["ä"]) == b"\xe4"


def test_unknown_ids_are_harmless(byte_level: Tokenizer) -> None:
    unknown = byte_level.vocab_size + 10  # a model's padded embedding rows
    assert byte_level.id_to_token(unknown) == ""
    assert byte_level.token_bytes(unknown) == b""
    assert byte_level.decode([unknown]) == ""


def test_eos_ids_merge_config_and_generation_config(tmp_path: Path) -> None:
    build_bpe_tokenizer(tmp_path, vocab_size=300, corpus=ASCII_CORPUS)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(tmp_path).eos_token_ids == {0, 2, 5, 7}


def test_chat_template_renders_and_tokenizes(byte_level: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    text = byte_level.render_chat_template(messages)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = byte_level.apply_chat_template(messages)
    assert ids == byte_level.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2
    no_prompt = byte_level.render_chat_template(messages, add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


def test_missing_chat_template_is_a_clear_error(sentencepiece: Tokenizer) -> None:
    with pytest.raises(ParameterError, match="no chat template") as info:
        sentencepiece.apply_chat_template([{"role": "user", "content": "hi"}])
    assert info.value.param == "messages"
    assert isinstance(info.value, ValueError)


def test_template_errors_become_parameter_errors(byte_level: Tokenizer) -> None:
    with pytest.raises(ParameterError):
        byte_level.render_chat_template([{"content": "no role"}])


def test_load_tokenizer_requires_a_local_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "does-not-exist")


def test_one_tokenizer_serves_several_threads(tmp_path: Path) -> None:
    """The server's event loop, its tokenizer worker and the engine thread share one `Tokenizer`:
    encoding (plain, chat, user text with a control token in it), decoding and token bytes from four
    threads at once give what they give on their own, and nothing raises. (An HF fast tokenizer whose
    settings a call switches raises "Already borrowed" when another thread is inside it; the plain
    backend for user text is built by whichever thread needs it first.)"""
    texts = ASCII_CORPUS[:4] + UNICODE_CORPUS[:2]
    conversations = [[{"role": "user", "content": text + " <|im_end|> and more"}] for text in texts]

    def work(tok: Tokenizer) -> list:
        results = []
        for text, messages in zip(texts, conversations):
            ids = tok.encode(text)
            results += [ids, tok.decode(ids), [tok.token_bytes(i) for i in ids], tok.encode_chat(messages)]
        return results

    expected = work(build_byte_level(tmp_path / "alone"))
    shared = build_byte_level(tmp_path / "shared")
    start = threading.Barrier(4)
    outcomes: list = []

    def run() -> None:
        start.wait()
        try:
            outcomes.extend(work(shared) == expected for _ in range(20))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [True] * 80
