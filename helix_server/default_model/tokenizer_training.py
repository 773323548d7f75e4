"""Training the default model's tokenizer: byte-level BPE on Python source, with a ChatML template.

`build_bpe_tokenizer()` trains a GPT-2-style byte-level BPE on a list of texts and saves it as a
transformers tokenizer directory; `helix-server train-default` uses it for the shipped model, tests
use it to make small tokenizers quickly. `default_corpus()` is a small deterministic slice of the
standard library's source for such tokenizers.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_CORPUS_CHARS = 2_000_000
MODEL_MAX_LENGTH = 2048

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


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
