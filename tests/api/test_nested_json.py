"""Deeply nested JSON bodies are a 400 in the error envelope (never a 500), and the server keeps serving.

Bodies nest at most `MAX_JSON_DEPTH` levels: deeper values broke the decoder (~1,000 levels) and, from
a few hundred levels, the chat template rendering a tool's schema.
"""

from __future__ import annotations

import pytest

from helix_server.api.body import MAX_JSON_DEPTH
from tests.api.conftest import MODEL_NAME, assert_error, engine_idle, start_live_server, wait_until

DEPTHS = [500, 1_000, 100_000]


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
    ("chat-tool-schema", "/v1/chat/completions", lambda d: tool_request(d - 4)),
    ("tokenize", "/tokenize", lambda d: f'{{"model": "{MODEL_NAME}", "prompt": {nested(d)}}}'),
    ("generate", "/generate", lambda d: f'{{"prompt": {nested(d)}}}'),
    ("whole-body", "/v1/completions", nested),
]


def tool_request(schema_depth: int) -> str:
    """A chat request whose tool's `parameters` nest `schema_depth` objects (the body: 4 more)."""
    return (
        f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 2, '
        f'"tools": [{{"type": "function", "function": {{"name": "f", "parameters": {nested_objects(schema_depth)}}}}}]}}'
    )


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


def test_the_bound_is_exact_and_brackets_in_strings_do_not_count(client):
    def metadata_request(depth: int, text: str = "") -> bytes:  # the body nests depth levels
        value = nested_objects(depth - 2)
        return (
            f'{{"model": "{MODEL_NAME}", "prompt": "Hi", "max_tokens": 2, '
            f'"metadata": {{"text": "{text}", "k": {value}}}}}'
        ).encode()

    headers = {"content-type": "application/json"}
    at_bound = client.post("/v1/completions", content=metadata_request(MAX_JSON_DEPTH), headers=headers)
    assert at_bound.status_code == 200, at_bound.text
    over = client.post("/v1/completions", content=metadata_request(MAX_JSON_DEPTH + 1), headers=headers)
    assert_error(over, 400, code="nested_too_deeply")
    brackets = '[{\\\"' * 300  # brackets, escaped quotes and backslashes inside a string
    in_text = client.post("/v1/completions", content=metadata_request(MAX_JSON_DEPTH, brackets), headers=headers)
    assert in_text.status_code == 200, in_text.text


def test_a_tool_schema_at_the_bound_is_served(client):
    """Within the bound the chat template renders the schema (this tiny model's context is too short
    for it: a 400 about the length, not a 500)."""
    response = client.post(
        "/v1/chat/completions", content=tool_request(MAX_JSON_DEPTH - 4).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["code"] != "nested_too_deeply", response.text
