"""The engine's view of a Hugging Face tokenizer: text <-> ids, chat templates, EOS ids, token bytes.

`load_tokenizer(path)` wraps `transformers.AutoTokenizer` loaded from a local directory (never the
hub, never remote code). Decoding never applies transformers' `clean_up_tokenization_spaces`
heuristic (it rewrites " ." into "." and the like, which corrupts code and breaks incremental
decoding), so `decode` is a pure function of the ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from helix_server.errors import ParameterError

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
OTHER = "other"

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    Printable latin-1 bytes map to themselves; the other 68 bytes (control characters, space, ...)
    map, in byte order, to the characters from U+0100 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1)]
    printable += range(ord("\xae"), ord("\xff") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


class Tokenizer:
    """A loaded tokenizer plus the facts the engine needs about it.

    `eos_token_ids` is the union of the tokenizer's EOS token and the ids the model directory's
    `config.json` / `generation_config.json` declare. `vocab_size` counts added tokens too (it can be
    smaller than the model's embedding rows; ids the tokenizer does not know decode to "").
    """

    def __init__(self, hf: Any, eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        eos = set(int(i) for i in eos_token_ids)
        if getattr(hf, "eos_token_id", None) is not None:
            eos.add(int(hf.eos_token_id))
        self.eos_token_ids: set[int] = eos
        self.all_special_ids: set[int] = set(int(i) for i in hf.all_special_ids)
        self.vocab_size: int = len(hf)
        self._backend = getattr(hf, "backend_tokenizer", None)
        self._added: dict[int, str] = {int(i): str(tok) for i, tok in hf.added_tokens_decoder.items()}
        self.kind: str = _detect_kind(self._backend)
        self._bytes_cache: dict[int, bytes] = {}

    # -- text <-> ids -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the model's BOS/EOS the way it was trained."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (no tokenization-space clean-up). Unknown ids contribute nothing."""
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    # -- chat ---------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def render_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The prompt text the model's chat template makes of `messages` (dicts with role/content).

        Extra keyword arguments (`tools`, `documents`, template switches) reach the template.
        Raises `ParameterError` (a ValueError, param "messages") when the model has no chat template
        or the template rejects the conversation.
        """
        if not self.has_chat_template:
            raise ParameterError(
                "This model's tokenizer has no chat template, so chat requests are not supported; "
                "use the completions API with a plain prompt instead.",
                "messages",
            )
        try:
            text = self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs
            )
        except ParameterError:
            raise
        except Exception as exc:  # jinja2 errors, including the template's own raise_exception()
            raise ParameterError(
                f"The chat template could not render these messages: {exc}", "messages"
            ) from exc
        return text

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat prompt (the template supplies any BOS itself)."""
        text = self.render_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    # -- single tokens ------------------------------------------------------------------------------

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of `token_id` (e.g. "Ġthe", "▁the", "<0xE4>"); "" if unknown."""
        token = self.hf.convert_ids_to_tokens(int(token_id))
        return token if isinstance(token, str) else ""

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes `token_id` stands for (OpenAI's logprobs `bytes`); b"" if unknown.

        Byte-level BPE tokens are mapped back through GPT-2's byte-to-unicode table; sentencepiece
        tokens turn "▁" into a space and `<0xNN>` into the single byte NN; added tokens (special or
        not) are their literal text. Other tokenizers fall back to the token's own decoded text.
        """
        token_id = int(token_id)
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            cached = self._compute_token_bytes(token_id)
            self._bytes_cache[token_id] = cached
        return cached

    def token_text(self, token_id: int) -> str:
        """The token as text, with a U+FFFD for each part of a character it holds only partly."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _compute_token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self.id_to_token(token_id)
        if not token:
            return b""
        if self.kind == BYTE_LEVEL:
            if all(char in _UNICODE_TO_BYTE for char in token):
                return bytes(_UNICODE_TO_BYTE[char] for char in token)
            return token.encode("utf-8")
        if self.kind == SENTENCEPIECE:
            match = _BYTE_TOKEN.fullmatch(token)
            if match:
                return bytes([int(match.group(1), 16)])
            return token.replace(_METASPACE, " ").encode("utf-8")
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def __repr__(self) -> str:
        name = getattr(self.hf, "name_or_path", "")
        return f"Tokenizer({name!r}, kind={self.kind}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of the local model directory `path` (no hub access, no remote code)."""
    from transformers import AutoTokenizer

    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"Tokenizer directory {str(model_dir)!r} does not exist.")
    hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    eos: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        eos |= _eos_ids_from_json(model_dir / name)
    return Tokenizer(hf, eos)


def _eos_ids_from_json(path: Path) -> set[int]:
    """The `eos_token_id` entry (an int or a list of ints) of a JSON config file, if present."""
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    value = data.get("eos_token_id") if isinstance(data, dict) else None
    if value is None and isinstance(data, dict) and isinstance(data.get("text_config"), dict):
        value = data["text_config"].get("eos_token_id")  # multimodal configs nest the LM's config
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _detect_kind(backend: Any) -> str:
    """How the tokenizer's token strings map to bytes, read from its decoder (and model) settings."""
    if backend is None:
        return OTHER
    types: set[str] = set()
    decoder = getattr(backend, "decoder", None)
    if decoder is not None:
        try:
            _collect_types(json.loads(decoder.__getstate__()), types)
        except (AttributeError, TypeError, ValueError):
            pass
    if "ByteLevel" in types:
        return BYTE_LEVEL
    if types & {"ByteFallback", "Metaspace"} or getattr(backend.model, "byte_fallback", False):
        return SENTENCEPIECE
    return OTHER


def _collect_types(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            out.add(node["type"])
        for value in node.values():
            _collect_types(value, out)
    elif isinstance(node, list):
        for value in node:
            _collect_types(value, out)
