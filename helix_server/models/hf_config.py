"""Read what our decoder needs from a transformers config into a small frozen `ArchConfig`.

Works with transformers v5 (`config.rope_parameters`, which includes `rope_theta`) and v4
(`config.rope_theta` plus `config.rope_scaling`). How an architecture maps the config onto the
decoder's switches (biases, q/k norm, sliding window) is a `DecoderFlavor`, chosen by the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helix_server.errors import UnsupportedModelError
from helix_server.layers.rotary import RopeConfig

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class DecoderFlavor:
    """How one Hugging Face architecture sets the generic decoder's switches.

    bias: "attention_bias" — q/k/v/o all follow `config.attention_bias` (Llama, Mistral, Qwen3);
          "qkv" — q/k/v always have a bias, o_proj never (Qwen2).
    qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
    sliding_window: "none" (Llama); "all_layers" — every layer when `sliding_window` is set
          (Mistral); "qwen" — only when `use_sliding_window`, on the layers `layer_types` marks
          "sliding_attention" (or, in older configs, layers >= `max_window_layers`).
    """

    bias: str = "attention_bias"
    qk_norm: bool = False
    sliding_window: str = "none"


@dataclass(frozen=True)
class ArchConfig:
    """The shape and switches of a Llama-family decoder, independent of transformers' version."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: RopeConfig
    sliding_windows: tuple[int | None, ...]  # per layer: window in tokens, or None for full attention
    max_position_embeddings: int
    hidden_act: str = "silu"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def arch_config_from_hf(config: Any, flavor: DecoderFlavor) -> ArchConfig:
    """Build an `ArchConfig` from a transformers config object (v4 or v5)."""
    architectures = getattr(config, "architectures", None) or ["?"]
    hidden_act = getattr(config, "hidden_act", "silu")
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    partial = getattr(config, "partial_rotary_factor", None)
    if partial not in (None, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor {partial} is not supported (only 1.0)")

    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_layers = config.num_hidden_layers

    attention_bias = bool(getattr(config, "attention_bias", False))
    if flavor.bias == "qkv":
        qkv_bias, o_proj_bias = True, False
    else:
        qkv_bias = o_proj_bias = attention_bias

    return ArchConfig(
        architecture=architectures[0],
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_proj_bias=o_proj_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=flavor.qk_norm,
        rope=read_rope_config(config),
        sliding_windows=_sliding_windows(config, flavor.sliding_window, num_layers),
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=hidden_act,
    )


def read_rope_config(config: Any) -> RopeConfig:
    """RoPE parameters from `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if any(isinstance(value, dict) for value in params.values()):
            raise UnsupportedModelError("per-layer-type RoPE parameters are not supported")
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    else:
        params = getattr(config, "rope_scaling", None) or {}  # v4 (v5 always has rope_parameters)
        theta = getattr(config, "rope_theta", None)
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        original = config.max_position_embeddings
    return RopeConfig(
        rope_type=rope_type,
        theta=float(10000.0 if theta is None else theta),
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
    )


def _sliding_windows(config: Any, rule: str, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding window size in tokens, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if rule == "none" or window is None:
        return (None,) * num_layers
    if rule == "all_layers":
        return (window,) * num_layers
    if rule != "qwen":
        raise ValueError(f"unknown sliding-window rule {rule!r}")
    if not getattr(config, "use_sliding_window", False):
        return (None,) * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    first_sliding = getattr(config, "max_window_layers", num_layers)
    return tuple(window if i >= first_sliding else None for i in range(num_layers))
