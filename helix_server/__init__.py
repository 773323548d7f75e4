"""helix_server: an OpenAI-compatible LLM inference server for local Hugging Face models.

The offline API::

    from helix_server import LLM, SamplingParams
    llm = LLM(model="path/to/hf-dir")
    outputs = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=32))

The public names are imported on first use, so that importing a torch-free subpackage (the
scheduler) does not pull in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "helix_server.engine.llm",
    "SamplingParams": "helix_server.sampling_params",
    "RequestOutput": "helix_server.engine.outputs",
    "CompletionOutput": "helix_server.engine.outputs",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'helix_server' has no attribute {name!r}")
