"""Deeply nested JSON bodies are a 400 in the error envelope (never a 500), and the server keeps serving."""

from __future__ import annotations

import pytest

from tests.api.conftest import MODEL_NAME, assert_error, engine_idle, start_live_server, wait_until

DEPTHS = [1_000, 100_000]


def nested(depth: int) -> str:
    """A JSON value `depth` arrays deep, as text."""
    return "[" * depth + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.fixture(scope="module")
def live_server(tiny_model_dir):
    """The default body limit (4 MiB), so 100,000 levels of objects are read, not refused as too large."""
    live = start_live_server(tiny_model_dir, server={"max_request_body_bytes": 4 * 1024 * 1024})
    yield live
    live.stop()


# (id, path, raw JSON body for a nesting depth). Where the field is typed (`/tokenize`'s and
# `/generate`'s prompt, the body itself) the decoder refuses the first wrong level; where it accepts any
# JSON it reaches the decoder's depth limit.
BODIES = [
    ("completion-prompt", "/v1/completions",
     lambda d: f'{{"model": "{MODEL_NAME}", "prompt": {nested(d)}}}'),
    ("completion-metadata", "/v1/completions",
     lambda d: f'{{"model": "{MODEL_NAME}", "prompt": "Hi", "metadata": {{"k": {nested_objects(d)}}}}}'),
    ("chat-content", "/v1/chat/completions",
     lambda d: f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": {nested(d)}}}]}}'),
    ("chat-tools", "/v1/chat/completions",
     lambda d: f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "Hi"}}], '
               f'"tools": {nested(d)}}}'),
    ("tokenize", "/tokenize", lambda d: f'{{"model": "{MODEL_NAME}", "prompt": {nested(d)}}}'),
    ("generate", "/generate", lambda d: f'{{"prompt": {nested(d)}}}'),
    ("whole-body", "/v1/completions", nested),
]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize(("path", "make_body"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_deep_nesting_is_a_400(client, live_server, path, make_body, depth):
    raw = make_body(depth).encode()
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 400)
    if path.startswith("/v1/") and make_body is not nested:
        assert error["code"] == "nested_too_deeply" and "nested" in error["message"], error
    # The server keeps serving.
    ok = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    wait_until(lambda: engine_idle(live_server), what="engine idle")


def test_moderate_nesting_still_decodes(client):
    """Nesting well under the bound is not refused for its depth (a tool schema a few levels deep)."""
    schema = nested_objects(20)
    raw = (
        f'{{"model": "{MODEL_NAME}", "prompt": "Hi", "max_tokens": 2, "metadata": {{"k": {schema}}}}}'
    ).encode()
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
