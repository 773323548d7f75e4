"""Settings are checked before any weight loads: a bad one fails at once with the setting's name.

The weight loader is replaced by one that fails the test if called, so each case shows the error
comes from the settings (and the checkpoints' configs), never after loading."""

from __future__ import annotations

import pytest

from helix_server.engine.llm import engine_config_from_settings
from helix_server.errors import ParameterError
from helix_server.runner import loader
from tests.fixtures.tiny_models import make_tiny_model


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the settings were checked")

    monkeypatch.setattr(loader, "load_weights", refuse)


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wide-vocab")
    make_tiny_model(out, "llama", vocab_size=640)
    return out


@pytest.mark.parametrize(
    ("settings", "param"),
    [
        ({"num_speculative_tokens": -1, "speculative_method": "ngram"}, "num_speculative_tokens"),
        ({"speculative_method": "medusa"}, "speculative_method"),
        ({"speculative_method": "draft"}, "draft_model"),
        ({"speculative_method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_min"),
        ({"block_size": 0}, "block_size"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_model_len": 100_000}, "max_model_len"),
        ({"speculative_method": "layer-skip", "draft_layers": 2}, "draft_layers"),  # the model has 2 layers
    ],
)
def test_a_bad_setting_fails_before_the_weights_load(tiny_model_dir, no_weights, settings, param):
    config = engine_config_from_settings(str(tiny_model_dir), device="cpu", **settings)
    with pytest.raises(ParameterError) as info:
        loader.load_model(config)
    assert info.value.param == param


def test_a_draft_model_with_another_vocabulary_fails_before_the_weights_load(tiny_model_dir, wide_vocab_dir, no_weights):
    config = engine_config_from_settings(
        str(tiny_model_dir), device="cpu", speculative_method="draft", draft_model=str(wide_vocab_dir)
    )
    with pytest.raises(ParameterError, match="vocabulary") as info:
        loader.load_model(config)
    assert info.value.param == "draft_model"
