"""Build the embedded default model: a byte-level BPE tokenizer plus a tiny Llama, all made locally.

helix_server serves this model when it is started without `--model`, so that `pip install` followed by
`helix-server` answers requests with no download. Everything is derived deterministically from this
file and the running Python's standard library (the tokenizer's training corpus), so two builds with
the same Python and library versions give byte-identical files.

**The weights are random** (seeded): the model produces fluent-looking nonsense, not answers. It exists
to exercise the whole serving path (tokenizer, chat template, batching, KV cache, streaming) until the
project ships a trained default model.

`ensure_default_model()` builds the directory once into a cache and reuses it afterwards;
`build_bpe_tokenizer()` is also used by tests to make small tokenizers quickly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default-model-v1"
MANIFEST_FILE = "helix-default-model.json"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_CORPUS_CHARS = 2_000_000
MODEL_MAX_LENGTH = 2048
MODEL_SEED = 0

# Shape of the tiny Llama; vocab_size and the special token ids come from the tokenizer.
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "rms_norm_eps": 1e-5,
    # Wider than HF's 0.02 so logits are clearly non-uniform (greedy decoding has a clear winner).
    "initializer_range": 0.1,
    "tie_word_embeddings": True,
}

# ChatML. Roles are rendered verbatim (system, developer, user, assistant, tool, ...). Content may be a
# string, None, or a list of {"type": "text", "text": ...} parts; assistant tool calls and the `tools`
# list are rendered as JSON so they reach the model.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n# Tools\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message.get('content') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if content is string -%}"
    "{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}"
    "{%- if part.get('type') == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set fn = call.get('function') or call -%}"
    "{%- set args = fn.get('arguments') -%}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (fn.get('name') | tojson) + ', \"arguments\": ' -}}"
    "{{- (args if args is string else (args | tojson)) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Used only when the standard library's sources cannot be found (embedded or frozen Pythons).
_FALLBACK_CORPUS = """\
The quick brown fox jumps over the lazy dog. A server answers requests; a model predicts tokens.
def fibonacci(n):
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Request:
    def __init__(self, request_id: str, prompt: str, max_tokens: int = 16) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens

Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -1 +1 = == != <= >= ( ) [ ] { } : ; , .
"""


def default_corpus(max_chars: int = DEFAULT_CORPUS_CHARS) -> list[str]:
    """The tokenizer's training texts: the standard library's top-level `.py` files, in sorted order.

    Files are taken by name while they fit in `max_chars` (a file that would overflow the budget is
    skipped, later smaller ones may still fit), so the selection is deterministic for a given Python.
    Falls back to a small embedded text when the standard library sources are not on disk.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")) if stdlib.is_dir() else []:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if total + len(text) <= max_chars:
            texts.append(text)
            total += len(text)
    return texts or [_FALLBACK_CORPUS]


def build_bpe_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    corpus: Iterable[str] | None = None,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Path:
    """Train a GPT-2-style byte-level BPE tokenizer and save it as a transformers tokenizer directory.

    The vocabulary holds the special tokens `<|endoftext|>` (EOS and padding), `<|im_start|>` and
    `<|im_end|>` (ids 0, 1, 2), all 256 byte symbols, then merges up to `vocab_size` (fewer if the
    corpus runs out of pairs). Writes `tokenizer.json`, `tokenizer_config.json` (with the ChatML chat
    template), `special_tokens_map.json` and `chat_template.jinja` into `out_dir` and returns it.
    `corpus` defaults to `default_corpus()`; a few KB of text with vocab 512 trains in well under a second.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(default_corpus() if corpus is None else corpus)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))

    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    # transformers 5 reads the template from this file; older versions from tokenizer_config.json.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


def build_default_model(out_dir: str | os.PathLike[str], corpus: Iterable[str] | None = None) -> Path:
    """Write the complete default model directory (tokenizer, config, random weights) into `out_dir`.

    Not atomic on its own; `ensure_default_model` builds into a temporary directory and renames it.
    The manifest file is written last, so its presence marks a complete build.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    texts = default_corpus() if corpus is None else list(corpus)
    source = (
        "custom" if corpus is not None else "embedded" if texts == [_FALLBACK_CORPUS] else "python-stdlib"
    )
    build_bpe_tokenizer(out, vocab_size=DEFAULT_VOCAB_SIZE, corpus=texts)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    im_end_id = tokenizer.token_to_id(IM_END)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    config = LlamaConfig(
        **MODEL_SHAPE,
        vocab_size=vocab_size,
        bos_token_id=None,
        eos_token_id=[eos_id, im_end_id],
        pad_token_id=eos_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    # Seed a private copy of the RNG state so callers' random streams are left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id
    )
    model.save_pretrained(out)

    manifest = {
        "name": DEFAULT_MODEL_NAME,
        "description": "helix_server's embedded default model: random weights, for smoke tests only.",
        "trained": False,
        "vocab_size": vocab_size,
        "shape": MODEL_SHAPE,
        "seed": MODEL_SEED,
        "tokenizer_corpus": {
            "source": source,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "texts": len(texts),
            "chars": sum(len(t) for t in texts),
        },
    }
    _write_json(out / MANIFEST_FILE, manifest)
    return out


def ensure_default_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the default model's directory, building it on first use.

    The directory is `<root>/default-model-v1`, where root is `cache_dir`, else `$HELIX_CACHE_DIR`,
    else `~/.cache/helix_server`. A build goes into a temporary directory next to it and is renamed
    into place, so readers never see a half-written model; when two processes race, one rename wins
    and the other discards its copy.
    """
    if cache_dir is None:
        env = os.environ.get("HELIX_CACHE_DIR")
        cache_dir = Path(env).expanduser() if env else Path.home() / ".cache" / "helix_server"
    root = Path(cache_dir)
    target = root / DEFAULT_MODEL_NAME
    if is_complete_model_dir(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.build-", dir=root))
    logger.info("Building the default model (random weights, a few seconds) into %s", target)
    try:
        build_default_model(build_dir)
        for _ in range(2):
            try:
                os.rename(build_dir, target)
                break
            except OSError:
                if is_complete_model_dir(target):
                    break  # another process won the race
                _move_aside(target)  # a broken leftover holds the name
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    if not is_complete_model_dir(target):
        raise RuntimeError(f"Could not build the default model into {target}.")
    return target


def is_complete_model_dir(path: Path) -> bool:
    """True when `path` holds a finished default-model build (its manifest is written last)."""
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST_FILE)
    return all((path / name).is_file() for name in required)


def _move_aside(path: Path) -> None:
    """Rename `path` out of the way (atomic for concurrent readers), then delete it."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.trash-", dir=path.parent))
    try:
        os.rename(path, trash / "old")
    except OSError:
        pass  # another process moved it already
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_builds(root: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary directories left by builds that crashed more than an hour ago."""
    now = time.time()
    for pattern in (f".{DEFAULT_MODEL_NAME}.build-*", f".{DEFAULT_MODEL_NAME}.trash-*"):
        for path in root.glob(pattern):
            try:
                if now - path.stat().st_mtime > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
