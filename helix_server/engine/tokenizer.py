"""The engine's view of a Hugging Face tokenizer: text <-> ids, chat templates, EOS ids, token bytes.

`load_tokenizer(path)` has transformers read the tokenizer of a local model directory or GGUF file
(`tokenizer_spec`; never the hub, never remote code) and serves it from its Rust backend
(`tokenizers`) and its chat template (`chat_template`, rendered as transformers renders it).
Decoding never applies transformers' `clean_up_tokenization_spaces` heuristic (it rewrites " ."
into "." and the like, which corrupts code and breaks incremental decoding), so `decode` is a pure
function of the ids.

Chat prompts are encoded so that user text cannot make control tokens (`encode_chat`, see
`chat_encoding`). The `*_async` methods are for the event loop: large inputs (past `INLINE_CHARS`
characters) are tokenized, rendered or decoded in the tokenizer's own worker thread, through the
Rust calls that release the GIL, and long texts are encoded in pieces (`piecewise_encoding`), so a
megabyte prompt does not stall every other request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from helix_server.engine.chat_encoding import ControlTokens, unmark
from helix_server.engine.chat_template import render_chat, select_template
from helix_server.engine.piecewise_encoding import encode_in_pieces
from helix_server.engine.tokenizer_spec import TokenizerSpec
from helix_server.errors import ParameterError
from helix_server.platform.child_process import ChildCall

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
OTHER = "other"

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"
# Inputs up to this many characters are tokenized inline by the `*_async` methods (well under a
# millisecond); larger ones go to the worker thread.
INLINE_CHARS = 4096


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
    """A tokenizer served from its `TokenizerSpec`: the Rust backend, special tokens, chat template.

    `eos_token_ids` is the union of the tokenizer's EOS token and the ids the model directory's
    `config.json` / `generation_config.json` declare. `vocab_size` counts added tokens too (it can be
    smaller than the model's embedding rows; ids the tokenizer does not know decode to "").

    Safe to share between threads (the server's event loop, its tokenizer worker and the engine
    thread use one instance): after construction nothing changes the Rust backend's settings.
    """

    def __init__(self, spec: TokenizerSpec) -> None:
        self.name = spec.name
        self.backend = RustTokenizer.from_str(spec.backend_json)
        self.eos_token_ids: set[int] = set(spec.eos_token_ids)
        self.all_special_ids: set[int] = set(spec.all_special_ids)
        self.all_special_tokens: tuple[str, ...] = spec.all_special_tokens
        self.special_tokens: dict[str, str] = dict(spec.special_tokens)
        self.vocab_size: int = spec.vocab_size
        self.chat_template: str | dict[str, str] | None = spec.chat_template
        self._added: dict[int, str] = {token.id: token.content for token in spec.added_tokens}
        self._special_added = tuple(token.content for token in spec.added_tokens if token.special)
        self.kind: str = _detect_kind(self.backend)
        self._bytes_cache: dict[int, bytes] = {}
        # Encode control tokens in chat messages' text as plain text (`encode_chat`); False only
        # for trusted clients (`allow_special_tokens_in_content`).
        self.sanitize_chat_content = True
        self._control_tokens: ControlTokens | None = None
        self._plain_backend: Any = None  # the backend with special tokens split, for user text
        self._plain_backend_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def bos_token_id(self) -> int | None:
        """The id of the tokenizer's BOS token, if it has one."""
        bos = self.special_tokens.get("bos_token")
        return None if bos is None else self.token_to_id(bos)

    @property
    def eos_token_id(self) -> int | None:
        """The id of the tokenizer's own EOS token, if it has one (`eos_token_ids` may hold more)."""
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self.token_to_id(eos)

    def token_to_id(self, token: str) -> int | None:
        """The id of the vocabulary string `token`; None if it is not one."""
        return self.backend.token_to_id(token)

    # -- text <-> ids -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the model's BOS/EOS the way it was trained."""
        return encode_in_pieces(self.backend, text, add_special_tokens)

    def encode_as_text(self, text: str) -> list[int]:
        """Token ids of `text` with every special token in it split into ordinary tokens."""
        with self._plain_backend_lock:  # built once, set up before any thread encodes with it
            if self._plain_backend is None:
                plain = RustTokenizer.from_str(self.backend.to_str())
                plain.encode_special_tokens = True
                self._plain_backend = plain
        return encode_in_pieces(self._plain_backend, text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (no tokenization-space clean-up). Unknown ids contribute nothing."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

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
            source = select_template(self.chat_template, has_tools=template_kwargs.get("tools") is not None)
            variables = {**self.special_tokens, **template_kwargs}  # the caller's win over the tokens'
            text = render_chat(source, messages, add_generation_prompt=add_generation_prompt, **variables)
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
        return self.encode_chat(messages, add_generation_prompt, **template_kwargs)[1]

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> tuple[str, list[int]]:
        """The rendered chat prompt and its token ids, with the control tokens (special tokens) in
        user strings (messages and template variables) encoded as plain text: only the template's own
        markers become control tokens. Raises `ParameterError` like `render_chat_template`."""
        control = self._chat_control_tokens()
        marked_messages, in_messages = control.mark(messages)
        marked_kwargs, in_kwargs = control.mark(template_kwargs)
        if not self.sanitize_chat_content or not (in_messages or in_kwargs):  # the plain encoding
            text = self.render_chat_template(messages, add_generation_prompt, **template_kwargs)
            return text, self.encode(text, add_special_tokens=False)
        rendered = self.render_chat_template(marked_messages, add_generation_prompt, **marked_kwargs)
        ids: list[int] = []
        for index, piece in enumerate(control.split(rendered)):
            piece_ids = self._encode_piece(piece.text, piece.as_text, first=index == 0)
            if piece.as_text and self.token_to_id(piece.text) in piece_ids:
                raise ParameterError(
                    f"The text {piece.text!r} can't be sent in a message: this tokenizer makes the "
                    "control token from plain text too.",
                    "messages",
                )
            ids += piece_ids
        return unmark(rendered), ids

    def _encode_piece(self, text: str, as_text: bool, first: bool) -> list[int]:
        encode = self.encode_as_text if as_text else functools.partial(self.encode, add_special_tokens=False)
        if first:
            return encode(text)
        # After a newline that is then dropped, so SentencePiece adds no prefix space mid-prompt.
        newline = self.encode("\n", add_special_tokens=False)
        ids = encode("\n" + text)
        if ids[: len(newline)] == newline:
            return ids[len(newline) :]
        return encode(text)

    def _chat_control_tokens(self) -> ControlTokens:
        if self._control_tokens is None:
            self._control_tokens = ControlTokens(self._special_added)
        return self._control_tokens

    # -- off the event loop -------------------------------------------------------------------------

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`encode`, in the worker thread when `text` is large."""
        return await self._call(len(text), self.encode, text, add_special_tokens=add_special_tokens)

    async def decode_async(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """`decode`, in the worker thread (through a GIL-releasing call) when there are many ids."""
        decode = functools.partial(self._decode_releasing_gil, skip_special_tokens=skip_special_tokens)
        return await self._call(len(ids), decode, ids)

    async def encode_chat_async(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> tuple[str, list[int]]:
        """`encode_chat`, in the worker thread when the conversation is large."""
        size = _text_size(messages) + _text_size(template_kwargs)
        return await self._call(
            size, self.encode_chat, messages, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def close(self) -> None:
        """Stop the worker thread (a later `*_async` call starts a new one)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _call(self, size: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if size <= INLINE_CHARS:
            return fn(*args, **kwargs)
        if self._executor is None:
            # One thread: large inputs are tokenized one at a time, beside the engine thread.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helix-tokenizer")
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _decode_releasing_gil(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    # -- single tokens ------------------------------------------------------------------------------

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of `token_id` (e.g. "Ġthe", "▁the", "<0xE4>"); "" if unknown."""
        token = self.backend.id_to_token(int(token_id))
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
        return f"Tokenizer({self.name!r}, kind={self.kind}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of the local model directory `path`, or of a GGUF file (or a directory
    holding one) from its metadata (no hub access, no remote code).

    transformers reads it (`read_tokenizer_spec`), in a child process unless this one has imported
    transformers already, so that the process does not hold transformers' modules for good. (An
    engine reads it with the model's config: `engine.checkpoint_reading`.)
    """
    spec = ChildCall("helix_server.engine.tokenizer_spec", "read_tokenizer_spec", str(path), keep_out="transformers")
    return Tokenizer(spec.result())


def _text_size(obj: Any) -> int:
    """Characters in the strings of `obj` (nested lists and dicts), to size the work on it."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_text_size(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_text_size(value) for value in obj)
    return 0


def _detect_kind(backend: Any) -> str:
    """How the tokenizer's token strings map to bytes, read from its decoder (and model) settings."""
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
