"""Every config in configs/ starts an engine: resolved as the CLI resolves it (`build_config` +
`with_default_model`), on helix-pycoder-tiny (the fast built-in model), then the engine built from it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from helix_server.default_model import PYCODER_TINY, with_default_model
from helix_server.engine.core import EngineCore
from helix_server.settings import build_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"default.toml", "cpu-small.toml", "prompt-lookup.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_starts_an_engine(path):
    config = build_config({}, env={}, config_file=path)
    tiny = msgspec.structs.replace(config.engine.model, model=PYCODER_TINY)
    engine_config = with_default_model(msgspec.structs.replace(config.engine, model=tiny))
    # torch's kernels: this test is about the settings, not about compiling helix's.
    model = msgspec.structs.replace(engine_config.model, cpu_kernels=False)
    engine = EngineCore(msgspec.structs.replace(engine_config, model=model))
    assert engine.seq_num_tokens_limit > len(engine.tokenizer.encode("def add(a, b):"))
