"""What helix needs of a model's tokenizer, read by transformers into plain data (`TokenizerSpec`).

transformers loads the tokenizer (`AutoTokenizer` from a local directory, or the fast tokenizer from
a GGUF file's metadata, never the hub, never remote code) and `read_tokenizer_spec` keeps: the Rust
backend as `tokenizer.json` text, the special and added tokens, the chat template(s) and the EOS ids
the model's config files declare. `helix_server.engine.tokenizer.Tokenizer` serves from that alone,
so `load_tokenizer` can run this in a child process (`ChildCall`) and the server never imports
transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from helix_server.errors import UnsupportedModelError
from helix_server.models.gguf_checkpoint import find_gguf_file


class AddedToken(msgspec.Struct, frozen=True):
    """A token added on top of the model's vocabulary (`special`: a control token)."""

    id: int
    content: str
    special: bool


class TokenizerSpec(msgspec.Struct, frozen=True):
    """A tokenizer as plain data: everything `Tokenizer` serves from.

    `backend_json`: the Rust tokenizer (`tokenizers.Tokenizer.to_str()`), with padding and truncation
    off. `vocab_size`: transformers' `len(tokenizer)` (added tokens included). `special_tokens`: the
    named ones (bos_token, eos_token, ...), which chat templates read. `chat_template`: one template,
    a dict of named ones, or None. `eos_token_ids`: the tokenizer's EOS and those of the model's
    `config.json` / `generation_config.json`.
    """

    name: str
    backend_json: str
    vocab_size: int
    special_tokens: dict[str, str]
    all_special_ids: tuple[int, ...]
    all_special_tokens: tuple[str, ...]
    added_tokens: tuple[AddedToken, ...]
    eos_token_ids: tuple[int, ...]
    chat_template: str | dict[str, str] | None = None


def read_tokenizer_spec(path: str) -> TokenizerSpec:
    """Load the tokenizer of the model directory or GGUF file `path` with transformers and describe it.

    Raises FileNotFoundError when there is nothing to load and UnsupportedModelError for a tokenizer
    without a fast (Rust) version.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # in the reading process only

    model_dir = Path(path)
    gguf_file = find_gguf_file(model_dir)
    eos: set[int] = set()
    if gguf_file is not None:
        # The fast tokenizer class directly, not AutoTokenizer: that one builds the model's config
        # class first, whose import costs 60-80 MiB in transformers 5.
        hf = PreTrainedTokenizerFast.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
        )
    else:
        if not model_dir.is_dir():
            raise FileNotFoundError(f"Tokenizer directory {str(model_dir)!r} does not exist.")
        hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
        for name in ("config.json", "generation_config.json"):
            eos |= _eos_ids_from_json(model_dir / name)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(
            f"The tokenizer of {str(model_dir)!r} ({type(hf).__name__}) has no fast (Rust) version; helix "
            "needs one (a tokenizer.json, or files transformers converts to one)."
        )
    if hf.eos_token_id is not None:
        eos.add(int(hf.eos_token_id))
    backend.no_truncation()
    backend.no_padding()
    return TokenizerSpec(
        name=str(getattr(hf, "name_or_path", "") or model_dir),
        backend_json=backend.to_str(),
        vocab_size=len(hf),
        special_tokens={str(k): str(v) for k, v in hf.special_tokens_map.items()},
        all_special_ids=tuple(int(i) for i in hf.all_special_ids),
        all_special_tokens=tuple(str(t) for t in hf.all_special_tokens),
        added_tokens=tuple(
            AddedToken(int(i), str(t.content), bool(t.special)) for i, t in sorted(hf.added_tokens_decoder.items())
        ),
        eos_token_ids=tuple(sorted(eos)),
        chat_template=hf.chat_template or None,
    )


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
