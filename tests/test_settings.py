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
        ('tool_call_parser = "gpt"\n', {}, "tool_call_parser"),
        ("", {"HELIX_ENABLE_AUTO_TOOL_CHOICE": "maybe"}, "enable_auto_tool_choice"),
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


def test_prefix_caching_switch_and_admission_settings(tmp_path):
    import argparse

    from helix_server.settings import add_setting_flags

    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    assert vars(parser.parse_args([]))["enable_prefix_caching"] is None  # falls through
    assert vars(parser.parse_args(["--no-enable-prefix-caching"]))["enable_prefix_caching"] is False
    flags = vars(parser.parse_args(["--enable-prefix-caching", "--max-queued-requests", "none"]))
    assert flags["enable_prefix_caching"] is True and flags["max_queued_requests"] is None

    defaults = build_config(env={})
    assert defaults.engine.cache.enable_prefix_caching is True
    assert defaults.engine.cache.gpu_memory_utilization == 0.9
    assert defaults.engine.scheduler.max_queued_requests == 1024
    assert defaults.engine.scheduler.max_queue_wait is None and defaults.engine.scheduler.request_timeout is None

    toml = tmp_path / "helix.toml"
    toml.write_text('enable_prefix_caching = false\nmax_queue_wait = 30\n[scheduler]\nmax_queued_requests = "none"\n')
    env = {"HELIX_REQUEST_TIMEOUT": "600", "HELIX_MAX_QUEUED_TOKENS": "4096"}
    config = build_config({}, env=env, config_file=toml)
    assert config.engine.cache.enable_prefix_caching is False
    assert config.engine.scheduler.max_queue_wait == 30.0 and config.engine.scheduler.max_queued_requests is None
    assert config.engine.scheduler.request_timeout == 600.0 and config.engine.scheduler.max_queued_tokens == 4096
    assert build_config({}, env={"HELIX_ENABLE_PREFIX_CACHING": "off"}).engine.cache.enable_prefix_caching is False
    assert build_config({"enable_prefix_caching": True}, env={"HELIX_ENABLE_PREFIX_CACHING": "0"}).engine.cache.enable_prefix_caching
    with pytest.raises(ParameterError) as info:
        build_config({}, env={"HELIX_ENABLE_PREFIX_CACHING": "maybe"})
    assert info.value.param == "enable_prefix_caching"
