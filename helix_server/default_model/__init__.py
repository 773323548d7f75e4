"""The embedded default model: a small Python-completion Llama and its draft, trained by the project.

`shipped` finds the trained pair that ships in `weights/` and sets up a config without a model to
serve it (with the draft as speculative proposer); `tokenizer` builds byte-level BPE tokenizers
(the pair's, and small ones for tests). The pair is trained by `helix-server train-default`
(`helix_server.training`).
"""

from helix_server.default_model.shipped import (
    DEFAULT_SERVED_MODEL_NAME,
    MANIFEST_FILE,
    WEIGHTS_DIR,
    default_draft_dir,
    default_target_dir,
    ensure_default_model,
    read_manifest,
    with_default_model,
)
from helix_server.default_model.tokenizer import CHAT_TEMPLATE, build_bpe_tokenizer, default_corpus

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SERVED_MODEL_NAME",
    "MANIFEST_FILE",
    "WEIGHTS_DIR",
    "build_bpe_tokenizer",
    "default_corpus",
    "default_draft_dir",
    "default_target_dir",
    "ensure_default_model",
    "read_manifest",
    "with_default_model",
]
