"""Which model class (and which decoder switches) serves each Hugging Face architecture name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from helix_server.errors import UnsupportedModelError
from helix_server.models.hf_config import DecoderFlavor
from helix_server.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the module class to build and how it reads the HF config."""

    model_cls: type[nn.Module]
    flavor: DecoderFlavor


# Keyed by `config.architectures[0]`.
MODEL_REGISTRY: dict[str, ModelSpec] = {
    "LlamaForCausalLM": ModelSpec(LlamaForCausalLM, DecoderFlavor(bias="attention_bias")),
    "MistralForCausalLM": ModelSpec(
        LlamaForCausalLM, DecoderFlavor(bias="attention_bias", sliding_window="all_layers")
    ),
    "Qwen2ForCausalLM": ModelSpec(LlamaForCausalLM, DecoderFlavor(bias="qkv", sliding_window="qwen")),
    "Qwen3ForCausalLM": ModelSpec(
        LlamaForCausalLM, DecoderFlavor(bias="attention_bias", qk_norm=True, sliding_window="qwen")
    ),
}


def supported_architectures() -> list[str]:
    """Architecture names helix_server can run, sorted."""
    return sorted(MODEL_REGISTRY)


def resolve_architecture(hf_config: Any) -> ModelSpec:
    """The registry entry for `hf_config.architectures[0]`, or `UnsupportedModelError`."""
    architectures = getattr(hf_config, "architectures", None) or []
    name = architectures[0] if architectures else None
    spec = MODEL_REGISTRY.get(name) if name else None
    if spec is None:
        raise UnsupportedModelError(
            f"model architecture {name!r} is not supported; supported architectures: "
            + ", ".join(supported_architectures())
        )
    return spec
