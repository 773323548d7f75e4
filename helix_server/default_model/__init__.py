"""The embedded default model, built locally on first use (random weights until a trained one ships).

See `builder` for what is built and where; `ensure_default_model()` is the entry point.
"""

from helix_server.default_model.builder import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_NAME,
    build_bpe_tokenizer,
    build_default_model,
    default_corpus,
    ensure_default_model,
    is_complete_model_dir,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_NAME",
    "build_bpe_tokenizer",
    "build_default_model",
    "default_corpus",
    "ensure_default_model",
    "is_complete_model_dir",
]
