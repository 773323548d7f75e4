"""Anthropic's Messages API on the wire: SSE bytes and event order, the error envelope and status
codes, `x-api-key` auth, `--accept-any-model-name`, overload as 529."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import pytest

from tests.api.conftest import MODEL_NAME, assert_error, engine_idle, start_live_server, wait_until

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL = {
    "name": "get_time",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"],
    },
}
KEY = "sk-ant-test-1234"
HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"}


def post(server, path: str = "/v1/messages", headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**HEADERS, **(headers or {})}, timeout=60)


def anthropic_events(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of every event of an Anthropic stream, checking each event's framing."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n")
    events = []
    for chunk in text[:-2].split("\n\n"):
        lines = chunk.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), chunk
        name, data = lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


def assert_anthropic_error(
    response: httpx.Response, status: int, kind: str, mentions: str | None = None
) -> str:
    """Anthropic's envelope `{"type": "error", "error": {"type", "message"}}` with this status."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}, body
    if mentions is not None:
        assert mentions in body["error"]["message"], body
    return body["error"]["message"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    live = start_live_server(tiny_model_dir)
    yield live
    live.stop()


def test_text_stream_event_order(server):
    response = post(server, model=MODEL_NAME, max_tokens=6, messages=ASK, stream=True, temperature=0)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = anthropic_events(response.content)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["role"] == "assistant" and start["model"] == MODEL_NAME
    middle = names[2:-2]
    if middle:  # one text block: start, deltas, stop
        assert middle[0] == "content_block_start" and middle[-1] == "content_block_stop"
        assert set(middle[1:-1]) == {"content_block_delta"}
        assert events[2][1] == {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        assert all(
            data["delta"]["type"] == "text_delta" for name, data in events if name == "content_block_delta"
        )
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    whole = post(server, model=MODEL_NAME, max_tokens=6, messages=ASK, temperature=0).json()
    assert delta["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    assert start["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "".join(block["text"] for block in whole["content"])


def test_tool_use_stream_event_order(server):
    response = post(
        server,
        model=MODEL_NAME,
        max_tokens=60,
        messages=ASK,
        stream=True,
        tools=[TOOL],
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
    )
    events = anthropic_events(response.content)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    block = events[2][1]["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "get_time" and block["input"] == {}
    assert block["id"].startswith("toolu_")
    pieces = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert pieces and all(piece["type"] == "input_json_delta" for piece in pieces)
    assert json.loads("".join(piece["partial_json"] for piece in pieces))["zone"] in ("UTC", "CET")
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert b"tool_call>" not in response.content


@pytest.mark.parametrize(
    "body, status, kind, mentions",
    [
        ({"messages": ASK}, 400, "invalid_request_error", "max_tokens"),
        ({"max_tokens": 4}, 400, "invalid_request_error", "messages"),
        ({"max_tokens": 0, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
        ({"max_tokens": 4, "messages": []}, 400, "invalid_request_error", "messages"),
        (
            {
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                            }
                        ],
                    }
                ],
            },
            400,
            "invalid_request_error",
            "messages[0].content[0].type",
        ),
        (
            {
                "max_tokens": 4,
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"}],
                    },
                ],
            },
            400,
            "invalid_request_error",
            "messages[1].content[0].type",
        ),
        (
            {
                "max_tokens": 4,
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
                ],
            },
            400,
            "invalid_request_error",
            "messages[0].content[0].type",
        ),
        (
            {"max_tokens": 4, "messages": [{"role": "system", "content": "hi"}]},
            400,
            "invalid_request_error",
            "messages[0].role",
        ),
        (
            {"max_tokens": 4, "messages": ASK, "tools": [TOOL], "tool_choice": {"type": "sometimes"}},
            400,
            "invalid_request_error",
            "tool_choice",
        ),
        (
            {"max_tokens": 4, "messages": ASK, "tools": [TOOL], "tool_choice": "auto"},
            400,
            "invalid_request_error",
            "tool_choice",
        ),
        (
            {
                "max_tokens": 4,
                "messages": ASK,
                "tools": [TOOL],
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            400,
            "invalid_request_error",
            "tool_choice",
        ),
        (
            {"max_tokens": 4, "messages": ASK, "tool_choice": {"type": "any"}},
            400,
            "invalid_request_error",
            "tool_choice",
        ),
        (
            {
                "max_tokens": 4,
                "messages": ASK,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            400,
            "invalid_request_error",
            "tools[0].type",
        ),
        (
            {"max_tokens": 4, "messages": ASK, "tools": [{"name": "f"}]},
            400,
            "invalid_request_error",
            "tools[0].input_schema",
        ),
        (
            {"max_tokens": 4, "messages": ASK, "stop_sequences": [""]},
            400,
            "invalid_request_error",
            "stop_sequences",
        ),
        ({"max_tokens": 4, "messages": ASK, "temperature": -1}, 400, "invalid_request_error", "temperature"),
        ({"max_tokens": 4, "messages": ASK, "mcp_servers": []}, 400, "invalid_request_error", "mcp_servers"),
        (
            {"max_tokens": 4, "messages": ASK, "output_config": {"format": {"type": "regex"}}},
            400,
            "invalid_request_error",
            "output_config.format",
        ),
        (
            {"max_tokens": 4, "messages": ASK, "model": "claude-sonnet-5"},
            404,
            "not_found_error",
            "claude-sonnet-5",
        ),
    ],
)
def test_bad_requests_get_anthropic_errors(server, body, status, kind, mentions):
    for stream in (False, True):
        response = post(server, **{"model": MODEL_NAME, **body, "stream": stream})
        assert_anthropic_error(response, status, kind, mentions)
    assert post(server, model=MODEL_NAME, max_tokens=2, messages=ASK).status_code == 200
    wait_until(lambda: engine_idle(server), what="engine idle")


def test_malformed_and_oversized_bodies(server):
    raw = httpx.post(server.url + "/v1/messages", content=b"{not json", timeout=30)
    assert_anthropic_error(raw, 400, "invalid_request_error")
    huge = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "x" * 300_000}]}
    assert_anthropic_error(post(server, **huge), 413, "request_too_large")
    counted = post(
        server, "/v1/messages/count_tokens", model=MODEL_NAME, messages=[{"role": "user", "content": []}]
    )
    assert counted.status_code == 200, counted.text


def test_count_tokens_errors(server):
    response = post(server, "/v1/messages/count_tokens", model=MODEL_NAME)
    assert_anthropic_error(response, 400, "invalid_request_error", "messages")
    response = post(server, "/v1/messages/count_tokens", model="claude-haiku", messages=ASK)
    assert_anthropic_error(response, 404, "not_found_error")


def test_openai_routes_keep_their_envelope(server):
    response = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "nope", "messages": ASK}, timeout=30
    )
    assert_error(response, 404, "model", "model_not_found")


def test_openapi_documents_anthropic_errors_and_events(server):
    schema = httpx.get(server.url + "/docs/openapi.json", timeout=30).json()
    messages = schema["paths"]["/v1/messages"]["post"]
    assert "text/event-stream" in messages["responses"]["200"]["content"]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        responses = schema["paths"][path]["post"]["responses"]
        assert (
            "529" in responses and "503" not in responses and "retry-after" in str(responses["529"]).lower()
        )
        for status in ("400", "401", "413", "529"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/AnthropicError", (path, status)
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert (
        chat["503"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
    )
    assert schema["components"]["schemas"]["AnthropicError"]["properties"]["type"]["enum"] == ["error"]


def test_structured_output_format(server):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    body = {
        "model": MODEL_NAME,
        "max_tokens": 40,
        "messages": ASK,
        "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
    }
    message = post(server, **body).json()
    assert message["stop_reason"] == "end_turn", message
    assert json.loads(message["content"][0]["text"]) in ({"ok": True}, {"ok": False})
    combined = {**body, "tools": [TOOL], "tool_choice": {"type": "any"}}
    assert_anthropic_error(post(server, **combined), 400, "invalid_request_error", "output_config.format")


@pytest.fixture(scope="module")
def secured(tiny_model_dir):
    live = start_live_server(tiny_model_dir, server={"api_key": KEY, "accept_any_model_name": True})
    yield live
    live.stop()


def test_x_api_key_and_bearer(secured):
    body = {"model": MODEL_NAME, "max_tokens": 2, "messages": ASK}
    assert_anthropic_error(post(secured, **body), 401, "authentication_error")
    assert_anthropic_error(
        post(secured, headers={"x-api-key": KEY + "x"}, **body), 401, "authentication_error"
    )
    assert post(secured, headers={"x-api-key": KEY}, **body).status_code == 200
    # Claude Code's form: a beta query flag and beta headers.
    assert post(secured, "/v1/messages?beta=true", headers={"x-api-key": KEY}, **body).status_code == 200
    assert post(secured, headers={"Authorization": f"Bearer {KEY}"}, **body).status_code == 200
    # The OpenAI routes take x-api-key too, and keep their own envelope for a wrong key.
    chat = {"model": MODEL_NAME, "messages": ASK, "max_tokens": 2}
    assert (
        httpx.post(secured.v1 + "/chat/completions", json=chat, headers={"x-api-key": KEY}).status_code == 200
    )
    assert_error(httpx.post(secured.v1 + "/chat/completions", json=chat, headers={"x-api-key": "no"}), 401)
    sdk = anthropic.Anthropic(base_url=secured.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        sdk.messages.create(model=MODEL_NAME, max_tokens=2, messages=ASK)
    sdk = anthropic.Anthropic(base_url=secured.url, api_key=KEY, max_retries=0)
    assert sdk.messages.create(model=MODEL_NAME, max_tokens=2, messages=ASK).role == "assistant"


def test_accept_any_model_name(secured):
    headers = {"x-api-key": KEY}
    message = post(secured, headers=headers, model="claude-sonnet-5", max_tokens=2, messages=ASK)
    assert message.status_code == 200 and message.json()["model"] == MODEL_NAME
    chat = {"model": "gpt-5", "messages": ASK, "max_tokens": 2}
    assert httpx.post(secured.v1 + "/chat/completions", json=chat, headers=headers).status_code == 200
    counted = post(
        secured, "/v1/messages/count_tokens", headers=headers, model="claude-haiku-4-5", messages=ASK
    )
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0


@pytest.fixture(scope="module")
def timed_server(long_model_dir):
    live = start_live_server(long_model_dir, max_num_seqs=1, max_queue_wait=0.5)
    yield live
    live.stop()


def test_overload_is_529_streaming_or_not(timed_server):
    hog = {"prompt": "def f():\n", "max_tokens": 3000, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=timed_server.url, timeout=60, headers=HEADERS) as client:
            context = client.stream("POST", "/v1/completions", json=hog)
            response = await context.__aenter__()
            lines = response.aiter_lines()  # kept: a dropped iterator would close the stream
            assert (await lines.__anext__()).startswith("data: ")
            body = {"model": MODEL_NAME, "max_tokens": 4, "messages": ASK}
            started = time.monotonic()
            replies = await asyncio.gather(
                client.post("/v1/messages", json=body),
                client.post("/v1/messages", json={**body, "stream": True}),
            )
            waited = time.monotonic() - started
            await context.__aexit__(None, None, None)
            return replies, waited

    replies, waited = asyncio.run(main())
    for reply in replies:
        assert_anthropic_error(reply, 529, "overloaded_error")
        assert int(reply.headers["retry-after"]) >= 1
    assert waited < 10
    wait_until(lambda: engine_idle(timed_server), timeout=30, what="engine idle")


def scrape_aborted(live) -> float:
    text = httpx.get(live.url + "/metrics", timeout=10).text
    (line,) = [
        x for x in text.splitlines() if x.startswith('helix:request_success_total{finished_reason="abort"')
    ]
    return float(line.split()[-1])


# A schema whose only value is 2000+ characters long: the answer can't end early (no EOS allowed).
ENDLESS = {
    "format": {
        "type": "json_schema",
        "schema": {
            "type": "object",
            "properties": {"a": {"type": "string", "minLength": 2000}},
            "required": ["a"],
        },
    }
}


def test_client_disconnect_aborts_streaming_or_not(timed_server):
    body = {"model": MODEL_NAME, "max_tokens": 3000, "messages": ASK, "output_config": ENDLESS}
    before = scrape_aborted(timed_server)
    with (
        httpx.Client(base_url=timed_server.url, timeout=30) as client,
        client.stream("POST", "/v1/messages", json={**body, "stream": True}) as response,
    ):
        lines = response.iter_lines()  # kept: a collected iterator closes the connection
        assert next(lines) == "event: message_start"
        wait_until(lambda: timed_server.engine.stats().num_requests_running == 1, what="request running")
    wait_until(lambda: engine_idle(timed_server), timeout=10, what="idle after disconnect")
    assert scrape_aborted(timed_server) == before + 1
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(timed_server.url + "/v1/messages", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: engine_idle(timed_server), timeout=10, what="idle after disconnect")
    assert scrape_aborted(timed_server) == before + 2
