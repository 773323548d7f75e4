"""/health, /ready, /version, /tokenize, /detokenize, and what probes say when the engine dies or sticks."""

from __future__ import annotations

import threading

import httpx
import pytest

from helix_server import __version__
from tests.api.conftest import MODEL_NAME, assert_error, start_live_server, wait_until


def test_health_reports_the_kv_pool(client, live_server):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["num_kv_blocks_total"] == live_server.engine.runtime.num_kv_blocks
    assert 0 <= body["num_kv_blocks_free"] <= body["num_kv_blocks_total"]


def test_ready_and_version(client):
    assert client.get("/ready").json() == {"status": "ready"}
    assert client.get("/version").json() == {"version": __version__}


def test_ready_is_503_while_draining(client, live_server):
    live_server.state.draining = True
    try:
        response = client.get("/ready")
        assert_error(response, 503, code="server_draining")
        assert response.headers["retry-after"]
        assert client.get("/health").status_code == 200
        assert_error(client.post("/tokenize", json={"prompt": "a"}), 503)
    finally:
        live_server.state.draining = False


def test_tokenize_and_detokenize(client):
    response = client.post("/tokenize", json={"prompt": "def f(x): return x"})
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 256
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {
        "prompt": "def f(x): return x"
    }
    chat = client.post(
        "/tokenize", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert chat.status_code == 200
    completion = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    )
    assert completion.json()["usage"]["prompt_tokens"] == chat.json()["count"]


@pytest.fixture
def fragile(tiny_model_dir):
    """A server of its own: these tests break its engine."""
    live = start_live_server(tiny_model_dir, app={"stuck_after_s": 0.3})
    yield live
    live.stop()


def test_health_503_when_the_engine_is_stuck(fragile, monkeypatch):
    release = threading.Event()
    original = fragile.engine.core.step

    def stuck_step():
        release.wait(30)
        return original()

    monkeypatch.setattr(fragile.engine.core, "step", stuck_step)
    with httpx.Client(base_url=fragile.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True}):
            response = wait_until(lambda: (r := client.get("/health")).status_code == 503 and r, what="stuck")
            assert response.json()["status"] == "stuck" and response.headers["retry-after"]
            release.set()
        assert wait_until(lambda: client.get("/health").status_code == 200, what="healthy again")


def test_health_503_when_the_engine_loop_died(fragile, monkeypatch):
    def broken_step():
        raise RuntimeError("injected engine bug")

    monkeypatch.setattr(fragile.engine.core, "step", broken_step)
    with httpx.Client(base_url=fragile.url, timeout=30) as client:
        response = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert_error(response, 503, code="engine_dead")
        health = client.get("/health")
        assert_error(health, 503, code="engine_dead")
        assert health.json()["status"] == "dead" and "num_kv_blocks_total" in health.json()
        assert_error(client.get("/ready"), 503, code="engine_dead")
        assert_error(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}), 503)
