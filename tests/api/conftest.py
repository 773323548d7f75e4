"""Live servers for the HTTP tests: the real app under a real uvicorn, in a background thread.

`start_live_server(model_dir, **settings)` binds a free port, runs uvicorn in a thread and waits for
/ready; module-scoped fixtures share one server per test module (`live_server` on the tiny model,
`server` on the long-context one, `sdk` the OpenAI client on `server`). Helpers parse SSE bytes and
check error envelopes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from litestar import Litestar
from transformers import AutoTokenizer

from helix_server.api.app import create_app
from helix_server.api.state import STATE_KEY, ServerState
from helix_server.config import HelixConfig, ServerConfig
from helix_server.engine.async_engine import AsyncEngine
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings

MODEL_NAME = "tiny"
BODY_LIMIT = 256 * 1024
ENGINE_DEFAULTS = {"dtype": "float32", "num_kv_blocks": 256, "served_model_name": MODEL_NAME}


@dataclass
class LiveServer:
    """A running app: its URL, and the objects behind it (for white-box checks)."""

    url: str
    app: Litestar
    engine: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def state(self) -> ServerState:
        return self.app.state[STATE_KEY]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def start_live_server(
    model_dir: Path, server: dict | None = None, app: dict | None = None, **engine
) -> LiveServer:
    """Build an engine on `model_dir`, wrap it in the app, and serve it on a free port."""
    settings = {**ENGINE_DEFAULTS, **engine}
    engine_config = engine_config_from_settings(str(model_dir), **settings)
    server_config = ServerConfig(**{"max_request_body_bytes": BODY_LIMIT, **(server or {})})
    config = HelixConfig(engine=engine_config, server=server_config)
    async_engine = AsyncEngine(EngineCore(engine_config))
    litestar_app = create_app(async_engine, config, **(app or {}))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv_server = uvicorn.Server(
        uvicorn.Config(
            litestar_app, log_config=None, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
    )
    thread = threading.Thread(target=uv_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", litestar_app, async_engine, uv_server, thread)
    wait_until(lambda: _is_ready(live), timeout=60, what="server ready")
    return live


def _is_ready(live: LiveServer) -> bool:
    try:
        return httpx.get(live.url + "/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_until(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def sse_data(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing of every event on the way."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, f"bad SSE event framing: {event!r}"
        payloads.append(event[len("data: ") :])
    return payloads


def sse_json(raw: bytes) -> list[dict]:
    """The JSON events of an OpenAI stream, checking it ends with exactly one `data: [DONE]`."""
    payloads = sse_data(raw)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(
    response: httpx.Response, status: int, param: str | None = "any", code: str | None = "any"
) -> dict:
    """Check `response` is OpenAI's error envelope with this status (and param/code when given)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if param != "any":
        assert error["param"] == param, error
    if code != "any":
        assert error["code"] == code, error
    return error


def first_new_bigram(text: str) -> str:
    """A two-character stop string whose first occurrence is after the first character."""
    for i in range(1, len(text) - 1):
        if text.find(text[i : i + 2]) == i:
            return text[i : i + 2]
    raise AssertionError(f"no usable stop string in {text!r}")


def engine_idle(live: LiveServer) -> bool:
    """No request in the engine and every KV block free."""
    stats = live.engine.stats()
    return (
        stats.num_requests_running == 0
        and stats.num_requests_waiting == 0
        and stats.num_kv_blocks_free == stats.num_kv_blocks_total
        and not live.engine.has_unfinished_requests
    )


@pytest.fixture(scope="module")
def live_server(tiny_model_dir) -> LiveServer:
    """One server on the tiny model for the whole test module."""
    live = start_live_server(tiny_model_dir)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def long_model_dir(make_model_dir) -> Path:
    """The tiny model with a 4096-token context, for requests that must run for a while."""
    return make_model_dir("llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(long_model_dir) -> LiveServer:
    """One server on the long-context model for the whole test module; a module needing other
    settings defines its own `server`."""
    live = start_live_server(long_model_dir)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    """The official OpenAI client on the module's `server`."""
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def hf_tokenizer(long_model_dir):
    """transformers' tokenizer of the long-context model, the reference for prompt token counts."""
    return AutoTokenizer.from_pretrained(str(long_model_dir))


@pytest.fixture
def client(live_server) -> httpx.Client:
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        yield http
