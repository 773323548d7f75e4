"""A server on a GGUF model never imports transformers nor pydantic: they would stay resident
(~30 MiB) for the process's life. transformers reads the config and tokenizer in a child process
(`ChildCall`), chat templates render in helix (`engine.chat_template`), and the app keeps Litestar
from loading its pydantic plugin (`MsgspecLitestar`); llguidance waits for the first request that
constrains its output. Checked in a fresh interpreter, through chat requests with tools and a JSON
schema, a tokenize request and the OpenAPI document."""

from __future__ import annotations

import json
import subprocess
import sys

from gguf import GGMLQuantizationType as Q

from tests.conftest import EOS_ID
from tests.fixtures.gguf_files import write_gguf
from tests.fixtures.tiny_models import tiny_hf_model

SCRIPT = r"""
import json, sys
from litestar.testing import TestClient
from helix_server.api.app import create_app
from helix_server.config import HelixConfig, ServerConfig
from helix_server.engine.async_engine import AsyncEngine
from helix_server.engine.llm import engine_config_from_settings

engine_config = engine_config_from_settings(sys.argv[1], dtype="float32", num_kv_blocks=64, served_model_name="tiny")
engine = AsyncEngine.from_config(engine_config)
app = create_app(engine, HelixConfig(engine=engine_config, server=ServerConfig()))
tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_start|>"}]
statuses, grammar_engine = [], []
with TestClient(app) as client:
    for body in (
        {"messages": messages, "max_tokens": 4, "tools": [tool]},
        {"messages": messages, "max_tokens": 8, "response_format": {"type": "json_schema",
         "json_schema": {"name": "a", "schema": schema}}},
    ):
        statuses.append(client.post("/v1/chat/completions", json={"model": "tiny", **body}).status_code)
        grammar_engine.append("llguidance" in sys.modules)
    statuses.append(client.post("/tokenize", json={"messages": messages}).status_code)
    statuses.append(client.get("/docs/openapi.json").status_code)
kept_out = sorted({name.split(".")[0] for name in sys.modules} & {"transformers", "pydantic", "huggingface_hub"})
print(json.dumps({"statuses": statuses, "imported": kept_out, "grammar_engine": grammar_engine}))
"""


def test_a_gguf_server_imports_neither_transformers_nor_pydantic(tmp_path, tokenizer_dir):
    hf = tiny_hf_model("llama", eos_token_id=EOS_ID, bos_token_id=None, pad_token_id=EOS_ID)
    path = write_gguf(hf, tokenizer_dir, tmp_path / "tiny.gguf", Q.Q8_0)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses"] == [200, 200, 200, 200]
    assert report["imported"] == []
    # The grammar engine comes with the first constrained request, not before.
    assert report["grammar_engine"] == [False, True]
