"""What transformers reads of a checkpoint for an engine, read in one child process.

transformers gives the engine its tokenizer (`TokenizerSpec`) and, for a GGUF file, the model
config's values (its GGUF integration maps the metadata). `start_reading_checkpoint` reads both in
one short-lived child interpreter (`ChildCall`), unless this process has imported transformers
already, so that a server never holds transformers' modules (~25 MiB resident for good) and the
file's metadata is parsed by transformers once. The engine starts it before it loads the weights:
the child's work overlaps the engine's own parse of the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from helix_server.config import EngineConfig
from helix_server.engine.tokenizer_spec import TokenizerSpec, read_tokenizer_spec
from helix_server.models.gguf_checkpoint import find_gguf_file, transformers_config_values
from helix_server.platform.child_process import ChildCall


class CheckpointReading(msgspec.Struct, frozen=True):
    """The tokenizer, and for a GGUF model the config values transformers reads from its metadata
    (None for a safetensors directory, whose config the loader reads itself)."""

    tokenizer: TokenizerSpec
    gguf_config: dict[str, Any] | None = None


def read_checkpoint(model: str, tokenizer: str) -> CheckpointReading:
    """Read the tokenizer at `tokenizer` and, if `model` is (or holds) a GGUF file, its config values."""
    gguf_file = find_gguf_file(Path(model))
    config = transformers_config_values(str(gguf_file)) if gguf_file is not None else None
    return CheckpointReading(read_tokenizer_spec(tokenizer), config)


def start_reading_checkpoint(config: EngineConfig) -> ChildCall:
    """Start `read_checkpoint` for `config`'s model; `.result()` is its `CheckpointReading`."""
    model = config.model.model or ""
    return ChildCall(
        __name__, "read_checkpoint", model, config.model.tokenizer or model, keep_out="transformers"
    )
