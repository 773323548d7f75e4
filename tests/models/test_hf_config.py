"""Reading transformers configs (v5 objects and v4-shaped ones) into `ArchConfig`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from helix_server.errors import UnsupportedModelError
from helix_server.models import MODEL_REGISTRY
from helix_server.models.hf_config import arch_config_from_hf
from helix_server.models.registry import resolve_architecture

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}


def _arch(config):
    return arch_config_from_hf(config, resolve_architecture(config).flavor)


def test_llama_bias_switches_and_defaults():
    arch = _arch(LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"]))
    assert (arch.qkv_bias, arch.o_proj_bias, arch.mlp_bias, arch.qk_norm) == (False, False, False, False)
    assert arch.num_kv_heads == 4 and arch.head_dim == 16
    assert arch.sliding_windows == (None,) * 4
    arch = _arch(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, architectures=["LlamaForCausalLM"]))
    assert (arch.qkv_bias, arch.o_proj_bias, arch.mlp_bias) == (True, True, True)


def test_qwen2_has_qkv_bias_but_no_o_proj_bias():
    arch = _arch(Qwen2Config(**SMALL, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"]))
    assert (arch.qkv_bias, arch.o_proj_bias, arch.qk_norm) == (True, False, False)
    assert arch.num_kv_heads == 2


def test_qwen3_has_qk_norm_and_explicit_head_dim():
    arch = _arch(Qwen3Config(**SMALL, head_dim=32, architectures=["Qwen3ForCausalLM"]))
    assert arch.qk_norm and arch.head_dim == 32 and arch.q_size == 128


def test_mistral_window_applies_to_every_layer():
    config = MistralConfig(**SMALL, sliding_window=32, architectures=["MistralForCausalLM"])
    assert _arch(config).sliding_windows == (32,) * 4
    config = MistralConfig(**SMALL, sliding_window=None, architectures=["MistralForCausalLM"])
    assert _arch(config).sliding_windows == (None,) * 4


def test_qwen_window_needs_use_sliding_window_and_follows_layer_types():
    off = Qwen2Config(
        **SMALL, sliding_window=32, use_sliding_window=False, architectures=["Qwen2ForCausalLM"]
    )
    assert _arch(off).sliding_windows == (None,) * 4
    on = Qwen3Config(
        **SMALL,
        sliding_window=32,
        use_sliding_window=True,
        max_window_layers=2,
        architectures=["Qwen3ForCausalLM"],
    )
    assert _arch(on).sliding_windows == (None, None, 32, 32)


def test_v4_shaped_qwen2_config_uses_max_window_layers():
    """No `layer_types`, `rope_theta` as an attribute, `num_key_value_heads` None, no `head_dim`."""
    config = SimpleNamespace(
        **SMALL,
        architectures=["Qwen2ForCausalLM"],
        num_key_value_heads=None,
        vocab_size=100,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        rope_theta=1000000.0,
        rope_scaling=None,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=3,
        hidden_act="silu",
    )
    arch = _arch(config)
    assert arch.sliding_windows == (None, None, None, 16)
    assert arch.num_kv_heads == 4 and arch.head_dim == 16
    assert arch.rope.theta == 1000000.0 and arch.rope.rope_type == "default"
    assert not arch.tie_word_embeddings


def test_only_silu_is_supported():
    config = LlamaConfig(**SMALL, hidden_act="gelu", architectures=["LlamaForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="gelu.*silu"):
        _arch(config)


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedModelError) as info:
        resolve_architecture(SimpleNamespace(architectures=["FalconForCausalLM"]))
    assert all(name in str(info.value) for name in MODEL_REGISTRY)
    with pytest.raises(UnsupportedModelError, match="None"):
        resolve_architecture(SimpleNamespace(architectures=None))
