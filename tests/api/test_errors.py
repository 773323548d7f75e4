"""Every kind of bad input gets OpenAI's error envelope with the right status and `param`, never a 5xx,
and leaves the engine serving."""

from __future__ import annotations

import pytest

from tests.api.conftest import MODEL_NAME, assert_error, engine_idle, wait_until

MSGS = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**fields):
    return (CHAT, {"model": MODEL_NAME, "messages": MSGS, **fields})


def completion(**fields):
    return (COMPLETIONS, {"model": MODEL_NAME, "prompt": "Hello", **fields})


# (id, (path, json body), param expected in the envelope, code expected)
BAD_JSON_BODIES = [
    ("sampling-temperature-negative", completion(temperature=-0.5), "temperature", None),
    ("temperature-over-2", chat(temperature=2.5), "temperature", None),
    ("temperature-infinite", None, "temperature", None),
    ("top_p-zero", completion(top_p=0), "top_p", None),
    ("top_p-over-1", chat(top_p=1.5), "top_p", None),
    ("top_k-below-minus-1", completion(top_k=-2), "top_k", None),
    ("top_k-zero", chat(top_k=0), "top_k", None),
    ("min_p-negative", completion(min_p=-0.1), "min_p", None),
    ("min_p-over-1", chat(min_p=1.5), "min_p", None),
    ("presence_penalty-over-2", completion(presence_penalty=2.5), "presence_penalty", None),
    ("frequency_penalty-under-minus-2", chat(frequency_penalty=-3), "frequency_penalty", None),
    ("repetition_penalty-zero", completion(repetition_penalty=0), "repetition_penalty", None),
    ("repetition_penalty-negative", chat(repetition_penalty=-1), "repetition_penalty", None),
    ("n-zero", completion(n=0), "n", None),
    ("n-over-cap", chat(n=17), "n", None),
    ("n-not-integer", chat(n=1.5), "n", None),
    ("logprobs-over-20", completion(logprobs=21), "logprobs", None),
    ("top_logprobs-over-20", chat(logprobs=True, top_logprobs=21), "top_logprobs", None),
    ("top_logprobs-without-logprobs", chat(top_logprobs=2), "top_logprobs", None),
    ("logit_bias-out-of-vocab", completion(logit_bias={"99999": 1}), "logit_bias", None),
    ("logit_bias-non-integer-key", chat(logit_bias={"abc": 1}), "logit_bias", None),
    ("logit_bias-value-over-100", completion(logit_bias={"5": 101}), "logit_bias", None),
    ("logit_bias-value-under-minus-100", chat(logit_bias={"5": -101}), "logit_bias", None),
    ("token-prompt-negative-id", completion(prompt=[5, -1]), "prompt", None),
    ("token-prompt-out-of-vocab", completion(prompt=[5, 512]), "prompt", None),
    ("token-prompts-out-of-vocab", completion(prompt=[[1, 2], [99999]]), "prompt", None),
    ("token-prompt-mixed-types", completion(prompt=[1, "a"]), "prompt", None),
    ("stop-too-many", completion(stop=["a", "b", "c", "d", "e"]), "stop", None),
    ("stop-empty-string", chat(stop=""), "stop", None),
    ("stop-huge", completion(stop=["x" * 5000]), "stop", None),
    ("stop_token_ids-out-of-vocab", completion(stop_token_ids=[100000]), "stop_token_ids", None),
    ("max_tokens-zero", completion(max_tokens=0), "max_tokens", None),
    ("max_tokens-negative", chat(max_tokens=-1), "max_tokens", None),
    ("max_completion_tokens-zero", chat(max_completion_tokens=0), "max_completion_tokens", None),
    ("max_tokens-over-context", completion(max_tokens=100000), "prompt", "context_length_exceeded"),
    (
        "chat-max_tokens-over-context",
        chat(max_completion_tokens=100000),
        "messages",
        "context_length_exceeded",
    ),
    ("min_tokens-over-max_tokens", completion(max_tokens=4, min_tokens=5), "min_tokens", None),
    ("prompt-empty-string", completion(prompt=""), "prompt", None),
    ("prompt-empty-list", completion(prompt=[]), "prompt", None),
    ("prompt-list-with-empty-string", completion(prompt=["ok", ""]), "prompt", None),
    ("prompt-list-with-empty-ids", completion(prompt=[[]]), "prompt", None),
    ("prompt-missing", (COMPLETIONS, {"model": MODEL_NAME}), "prompt", None),
    ("prompt-over-context", completion(prompt="hello " * 400), "prompt", "context_length_exceeded"),
    (
        "chat-over-context",
        chat(messages=[{"role": "user", "content": "hello " * 400}]),
        "messages",
        "context_length_exceeded",
    ),
    ("messages-empty", chat(messages=[]), "messages", None),
    ("messages-not-a-list", chat(messages="Hi"), "messages", None),
    ("message-unknown-role", chat(messages=[{"role": "bot", "content": "x"}]), "messages[0].role", None),
    ("message-without-role", chat(messages=[{"content": "x"}]), "messages[0].role", None),
    ("message-without-content", chat(messages=[{"role": "user"}]), "messages[0].content", None),
    ("message-not-an-object", chat(messages=["Hi"]), "messages[0]", None),
    (
        "message-unknown-field",
        chat(messages=[{"role": "user", "content": "x", "colour": 1}]),
        "messages[0].colour",
        None,
    ),
    (
        "content-image-part",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                }
            ]
        ),
        "messages[0].content[1].type",
        None,
    ),
    (
        "content-text-part-without-text",
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        "messages[0].content[0].text",
        None,
    ),
    ("seed-not-integer", completion(seed="abc"), "seed", None),
    ("temperature-string", chat(temperature="0.5"), "temperature", None),
    ("stream_options-without-stream", chat(stream_options={"include_usage": True}), "stream_options", None),
    ("speculation_depth-negative", completion(speculation_depth=-1), "speculation_depth", None),
    ("tools-not-function", chat(tools=[{"type": "retrieval"}]), "tools[0].type", None),
    (
        "tool_choice-not-in-tools",
        chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        "tool_choice",
        None,
    ),
    ("tool_choice-without-tools", chat(tool_choice="auto"), "tool_choice", None),
    ("unsupported-functions", chat(functions=[{"name": "f"}]), "functions", None),
    ("unknown-response_format-type", chat(response_format={"type": "xml"}), "response_format", None),
    ("unsupported-audio", chat(audio={"voice": "alloy", "format": "wav"}), "audio", None),
    ("unsupported-modalities", chat(modalities=["text", "audio"]), "modalities", None),
    ("unsupported-reasoning_effort", chat(reasoning_effort="high"), "reasoning_effort", None),
    ("unsupported-suffix", completion(suffix="end"), "suffix", None),
    ("unsupported-best_of", completion(best_of=2), "best_of", None),
    ("unknown-field", chat(frobnicate=True), "frobnicate", None),
    ("streaming-bad-input", completion(stream=True, top_p=2), "top_p", None),
    ("tokenize-both-inputs", ("/tokenize", {"prompt": "a", "messages": MSGS}), "prompt", None),
    ("detokenize-out-of-vocab", ("/detokenize", {"tokens": [1, 99999]}), "tokens", None),
    ("generate-max_tokens-zero", ("/generate", {"prompt": "a", "max_tokens": 0}), "max_tokens", None),
    ("generate-empty-prompt", ("/generate", {"prompt": ""}), "prompt", None),
    ("generate-batch-no-prompts", ("/generate/batch", {"prompts": []}), "prompts", None),
]


@pytest.mark.parametrize("case", BAD_JSON_BODIES, ids=[c[0] for c in BAD_JSON_BODIES])
def test_bad_json_input_is_a_400_naming_the_param(client, case):
    _, request, param, code = case
    if request is None:  # JSON can't write an infinite float; 1e999 parses as one
        response = client.post(
            COMPLETIONS,
            content=b'{"prompt": "a", "temperature": 1e999}',
            headers={"content-type": "application/json"},
        )
    else:
        path, body = request
        response = client.post(path, json=body)
    error = assert_error(response, 400, param, code)
    assert error["type"] == "invalid_request_error"
    if code == "context_length_exceeded":
        assert error["message"].startswith("This model's maximum context length is 256 tokens")


RAW_BODIES = [
    ("not-json", b"{not json"),
    ("not-an-object", b"[1, 2, 3]"),
    ("a-string", b'"hello"'),
    ("empty-body", b""),
    ("nan-literal", b'{"prompt": "a", "temperature": NaN}'),
    ("infinity-literal", b'{"prompt": "a", "temperature": Infinity}'),
    ("negative-infinity-literal", b'{"prompt": "a", "top_p": -Infinity}'),
    ("truncated", b'{"prompt": "a", "temperature": 0.'),
    ("invalid-utf8", b'{"prompt": "\xff\xfe"}'),
]


@pytest.mark.parametrize("raw", [r[1] for r in RAW_BODIES], ids=[r[0] for r in RAW_BODIES])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_unparseable_bodies_are_400(client, path, raw):
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_zero_tokens_after_tokenization(client, live_server, monkeypatch):
    tokenizer = live_server.engine.tokenizer
    original = tokenizer.encode
    monkeypatch.setattr(
        tokenizer, "encode", lambda text, **kw: [] if text == "\u200b" else original(text, **kw)
    )
    assert_error(client.post(COMPLETIONS, json={"prompt": "\u200b"}), 400, "prompt")


def test_unknown_model_is_404(client):
    for path, body in (
        chat(model="gpt-4o"),
        completion(model="gpt-4o"),
        ("/tokenize", {"model": "x", "prompt": "a"}),
    ):
        assert_error(client.post(path, json=body), 404, "model", "model_not_found")
    assert_error(client.get("/v1/models/gpt-4o"), 404, "model", "model_not_found")


def test_unknown_route_and_wrong_method(client):
    assert_error(client.post("/v1/nothing-here", json={}), 404)
    assert_error(client.get(COMPLETIONS), 405)
    assert_error(client.delete("/v1/models"), 405)


def test_body_over_the_limit_is_413(client):
    assert_error(client.post(COMPLETIONS, json={"prompt": "x" * (300 * 1024)}), 413)


def test_generate_stream_query_errors(client):
    assert_error(
        client.get("/generate/stream", params={"prompt": "a", "temperature": "nan"}), 400, "temperature"
    )
    assert_error(
        client.get("/generate/stream", params={"prompt": "a", "max_tokens": "ten"}), 400, "max_tokens"
    )
    assert_error(client.get("/generate/stream", params={"max_tokens": "3"}), 400, "prompt")
    assert_error(client.get("/generate/stream", params={"prompt": "a", "colour": "red"}), 400, "colour")


def test_accepted_no_op_fields(client):
    body = {
        **chat()[1],
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "tools": [],
        "modalities": ["text"],
        "parallel_tool_calls": False,
        "service_tier": "auto",
    }
    assert client.post(CHAT, json=body).status_code == 200


def test_engine_still_serves_after_bad_input(client, live_server):
    wait_until(lambda: engine_idle(live_server), what="engine idle")
    assert client.get("/health").status_code == 200
    response = client.post(COMPLETIONS, json={"prompt": "def f():", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
