"""Settings: flags beat environment variables, which beat the TOML file, which beats the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from helix_server.errors import ParameterError
from helix_server.settings import SETTINGS, build_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_defaults():
    config = build_config(env={})
    assert config.engine.cache.block_size == 16
    assert config.server.host == "127.0.0.1" and config.server.port == 8000
    assert config.engine.speculative.method == "none"


def test_precedence_flag_over_env_over_file(tmp_path):
    toml = tmp_path / "helix.toml"
    toml.write_text('max_num_seqs = 4\nport = 9000\n[cache]\nblock_size = 8\n[speculative]\nnum_speculative_tokens = "auto"\n')
    env = {"HELIX_MAX_NUM_SEQS": "6", "HELIX_KV_CACHE_MEMORY": "1.5", "HELIX_ALLOWED_ORIGINS": "http://a, http://b"}
    config = build_config({"max_num_seqs": 8, "dtype": None}, env=env, config_file=toml)
    assert config.engine.scheduler.max_num_seqs == 8  # flag
    assert config.engine.cache.kv_cache_memory == 1.5  # env
    assert config.server.allowed_origins == ("http://a", "http://b")
    assert config.server.port == 9000 and config.engine.cache.block_size == 8  # file
    assert config.engine.speculative.num_speculative_tokens == "auto"
    assert config.engine.model.dtype == "auto"  # an unset flag falls through to the default
    without_flag = build_config({}, env=env, config_file=toml)
    assert without_flag.engine.scheduler.max_num_seqs == 6


@pytest.mark.parametrize(
    ("toml", "env", "param"),
    [
        ("unknown_setting = 1\n", {}, "unknown_setting"),
        ("", {"HELIX_PORT": "eighty"}, "port"),
        ("", {"HELIX_SPECULATIVE_METHOD": "medusa"}, "speculative_method"),
        ('num_speculative_tokens = "some"\n', {}, "num_speculative_tokens"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, toml, env, param):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ParameterError) as info:
        build_config({}, env=env, config_file=path)
    assert info.value.param == param


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_files_parse(path):
    build_config(env={}, config_file=path)


def test_every_setting_is_documented_in_the_default_config_file():
    text = (Path(__file__).parent.parent / "configs" / "default.toml").read_text()
    for setting in SETTINGS:
        assert f"# {setting.name} = " in text, setting.name
