"""--api-key: every route but /health, /ready and /metrics needs `Authorization: Bearer KEY`."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import MODEL_NAME, assert_error, start_live_server

KEY = "sk-test-1234"


@pytest.fixture(scope="module")
def secured(tiny_model_dir):
    live = start_live_server(tiny_model_dir, server={"api_key": KEY})
    yield live
    live.stop()


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/tokenize"),
        ("GET", "/version"),
        ("POST", "/generate"),
        ("GET", "/docs"),
    ],
)
def test_protected_routes_need_the_key(secured, method, path):
    url = secured.url + path
    error = assert_error(httpx.request(method, url, json={}), 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    wrong = httpx.request(method, url, json={}, headers={"Authorization": f"Bearer {KEY}x"})
    assert_error(wrong, 401)
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.request(method, url, json={}, headers={"Authorization": KEY}), 401)


def test_right_key_is_accepted(secured):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(secured.url + "/v1/models", headers=headers).status_code == 200
    response = httpx.post(
        secured.url + "/v1/completions", headers=headers, json={"prompt": "a", "max_tokens": 2}
    )
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_are_open(secured, path):
    assert httpx.get(secured.url + path).status_code == 200


def test_sdk_authentication_error(secured):
    bad = openai.OpenAI(base_url=secured.v1, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=secured.v1, api_key=KEY, max_retries=0)
    assert good.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).choices


def test_cors_is_off_by_default(secured):
    response = httpx.options(
        secured.url + "/v1/models",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in response.headers


def test_cors_when_origins_are_set(tiny_model_dir):
    live = start_live_server(tiny_model_dir, server={"allowed_origins": ("http://app.example",)})
    try:
        response = httpx.get(live.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert response.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        live.stop()


def test_guards_run_on_the_event_loop(secured):
    """Litestar runs a guard that is a plain function in the event loop's default executor: a thread
    hop per guard per request. helix's guards are coroutines, so serving requests, accepted or
    refused, never starts that executor."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(3):
        accepted = httpx.post(secured.url + "/v1/completions", headers=headers, json={"prompt": "a", "max_tokens": 2})
        assert accepted.status_code == 200
        assert_error(httpx.get(secured.url + "/v1/models"), 401)
    assert secured.engine._loop._default_executor is None
