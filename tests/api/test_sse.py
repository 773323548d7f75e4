"""The exact bytes of the streams: SSE framing, chunk order, finish and usage chunks, [DONE]."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import MODEL_NAME, assert_error, first_new_bigram, sse_data, sse_json

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}


def _post_stream(client, path, body):
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response


def test_chat_stream_framing(client):
    response = _post_stream(client, "/v1/chat/completions", {**CHAT, "max_tokens": 5, "ignore_eos": True})
    assert response.content.endswith(b"data: [DONE]\n\n")
    chunks = sse_json(response.content)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL_NAME
        assert isinstance(chunk["created"], int) and "usage" not in chunk
    first, *middle, last = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["stop_reason"] is None


def test_usage_chunk_only_with_include_usage(client):
    body = {**CHAT, "max_tokens": 3, "ignore_eos": True, "stream_options": {"include_usage": True}}
    chunks = sse_json(_post_stream(client, "/v1/chat/completions", body).content)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 3 and usage["total_tokens"] == usage["prompt_tokens"] + 3
    plain = sse_json(_post_stream(client, "/v1/chat/completions", {**CHAT, "max_tokens": 3}).content)
    assert all("usage" not in c for c in plain) and all(c["choices"] for c in plain)


def test_chat_stream_n2_has_a_role_delta_per_choice(client):
    chunks = sse_json(_post_stream(client, "/v1/chat/completions", {**CHAT, "max_tokens": 3, "n": 2}).content)
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role") == "assistant"]
    assert (
        roles == [0, 1] and chunks[0]["choices"][0]["delta"].get("role") and chunks[1]["choices"][0]["delta"]
    )
    finishes = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finishes == [0, 1]


def test_stop_string_and_stop_token_in_finish_chunk(client):
    prompt = {"prompt": "x = 1\n", "max_tokens": 8, "temperature": 0}
    text = client.post("/v1/completions", json={**prompt, "ignore_eos": True}).json()["choices"][0]["text"]
    stop = first_new_bigram(text)
    chunks = sse_json(_post_stream(client, "/v1/completions", {**prompt, "stop": [stop]}).content)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == stop
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[: text.index(stop)]
    # A logit bias of +100 makes token 65 certain, so the stop token ends the stream at once.
    forced = {**CHAT, "max_tokens": 8, "logit_bias": {"65": 100}, "stop_token_ids": [65]}
    chunks = sse_json(_post_stream(client, "/v1/chat/completions", forced).content)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == 65


def test_completion_stream_echo_and_logprobs(client):
    body = {
        "prompt": "import os",
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
        "ignore_eos": True,
    }
    chunks = sse_json(_post_stream(client, "/v1/completions", body).content)
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert chunks[0]["choices"][0]["text"].startswith("import os")
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]


def test_bad_streaming_request_is_a_plain_400(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "temperature": -1})
    assert_error(response, 400, "temperature")


def test_error_after_the_stream_started(client, live_server, monkeypatch):
    runner = live_server.engine.core.runner
    original = runner.execute_model
    calls = {"n": 0}

    def failing(scheduler_output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return original(scheduler_output)

    monkeypatch.setattr(runner, "execute_model", failing)
    response = _post_stream(client, "/v1/chat/completions", {**CHAT, "max_tokens": 20, "ignore_eos": True})
    payloads = [json.loads(p) if p != "[DONE]" else p for p in sse_data(response.content)]
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    monkeypatch.setattr(runner, "execute_model", original)
    ok = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_responses_are_not_buffered_whole(client, path):
    body = {"prompt": "a"} if path == "/v1/completions" else {"messages": CHAT["messages"]}
    with client.stream(
        "POST", path, json={**body, "max_tokens": 4, "stream": True, "temperature": 0}
    ) as response:
        assert response.headers.get("cache-control") == "no-cache"
        assert "content-length" not in response.headers
        raw = b"".join(response.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
