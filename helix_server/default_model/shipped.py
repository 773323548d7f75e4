"""helix-pycoder-tiny: the tiny trained pair that ships with the package, and how a config serves it.

`weights/target` is a small Llama trained by the project (`helix-server train-default`) on the
Python standard library's source; `weights/draft` is a much smaller model with the same tokenizer,
distilled on the target, used as speculative decoding's proposer. Both are plain Hugging Face
directories. Each holds `MANIFEST_FILE`, which records how it was trained and evaluated. The pair is
the test suite's fast real model and a named option (`--model helix-pycoder-tiny`); the model served
without `--model` is SmolLM2-135M-Instruct (`helix_server.default_model.choice`).
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from helix_server.config import EngineConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_FILE = "helix-default-model.json"
DEFAULT_SERVED_MODEL_NAME = "helix-pycoder-tiny"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST_FILE)


def default_target_dir() -> Path:
    """The shipped target model's directory (it may be missing from a broken install)."""
    return WEIGHTS_DIR / "target"


def default_draft_dir() -> Path:
    """The shipped draft model's directory."""
    return WEIGHTS_DIR / "draft"


def ensure_default_model() -> Path:
    """helix-pycoder-tiny's (the shipped target's) directory; `FileNotFoundError` if the package lacks it."""
    target = default_target_dir()
    missing = [name for name in _REQUIRED_FILES if not (target / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"helix-pycoder-tiny is missing from {target} ({', '.join(missing)}); reinstall "
            "helix-server, pass --model DIR, or train it with `helix-server train-default --output "
            f"{WEIGHTS_DIR}`."
        )
    return target


def read_manifest(model_dir: Path) -> dict:
    """The training manifest of a shipped model directory."""
    return json.loads((Path(model_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))


def with_pycoder_tiny(config: EngineConfig) -> EngineConfig:
    """`config` set up to serve the shipped pair (`--model helix-pycoder-tiny`).

    The target becomes the model (served as `DEFAULT_SERVED_MODEL_NAME` unless a name is set) and,
    unless speculative decoding was configured (a method, `none` included, or a draft model), the
    shipped draft becomes its proposer, with the configured `num_speculative_tokens` or, when none
    is set, "auto": the pair is so small that the draft costs a third of a target step, so fixed
    depths only pay off one request at a time (measured in docs/default-model.md), and "auto" backs
    off under load.
    """
    model = msgspec.structs.replace(
        config.model,
        model=str(ensure_default_model()),
        served_model_name=config.model.served_model_name or DEFAULT_SERVED_MODEL_NAME,
    )
    speculative = config.speculative
    if speculative.speculative_method is None and not speculative.draft_model:
        draft = default_draft_dir()
        if (draft / "model.safetensors").is_file():
            depth = "auto" if speculative.num_speculative_tokens is None else speculative.num_speculative_tokens
            speculative = msgspec.structs.replace(
                speculative, speculative_method="draft", draft_model=str(draft), num_speculative_tokens=depth
            )
    return msgspec.structs.replace(config, model=model, speculative=speculative)
