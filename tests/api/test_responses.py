"""`POST /v1/responses` through the official openai SDK and raw HTTP, against a live server.

Text, tools and `text.format` with `responses.create` and `responses.stream`; the stored-response
round trip; bad inputs get 4xx in OpenAI's envelope and the server keeps serving. The tiny random
model can't choose tools on its own, so `required` / named `tool_choice` (a grammar) makes its calls.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from tests.api.conftest import MODEL_NAME, assert_error, engine_idle, start_live_server, wait_until
from tests.api.tool_fixtures import TIME, template_ids

GET_TIME = TIME.responses()
FORECAST = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "sky": {"enum": ["sunny", "rainy"]}},
    "required": ["city", "sky"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(long_model_dir):
    live = start_live_server(long_model_dir, server={"max_stored_responses": 4})
    yield live
    live.stop()


def tool_turn(ask: str, call, output: str) -> list[dict]:
    """The chat messages of a tool turn: the question, the model's call, the tool's output."""
    function = {"name": call.name, "arguments": call.arguments}
    return [
        {"role": "user", "content": ask},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.call_id, "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": output},
    ]


def post(server, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/responses", json={"model": MODEL_NAME, **body}, timeout=60)


def test_create_text(sdk):
    response = sdk.responses.create(
        model=MODEL_NAME,
        input="def fib(n):",
        instructions="Write Python.",
        max_output_tokens=8,
        temperature=0,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    (part,) = message.content
    assert part.type == "output_text" and part.text and response.output_text == part.text
    assert response.usage.output_tokens == 8
    assert response.usage.total_tokens == response.usage.input_tokens + 8
    # The same request again is the same text (greedy), streamed; the stream ends with
    # `response.incomplete` (as OpenAI's), whose response is the whole answer.
    with sdk.responses.stream(
        model=MODEL_NAME,
        input="def fib(n):",
        instructions="Write Python.",
        max_output_tokens=8,
        temperature=0,
    ) as stream:
        events = list(stream)
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert "".join(deltas) == part.text == final.output_text
    assert final.status == "incomplete" and final.usage.output_tokens == 8


def test_instructions_reach_the_prompt(sdk):
    without = sdk.responses.create(model=MODEL_NAME, input="hello", max_output_tokens=1)
    system = sdk.responses.create(
        model=MODEL_NAME, input="hello", instructions="Be brief.", max_output_tokens=1
    )
    assert system.usage.input_tokens > without.usage.input_tokens
    assert system.instructions == "Be brief."


def test_json_schema_format_create_and_stream(sdk):
    text = {"format": {"type": "json_schema", "name": "forecast", "schema": FORECAST, "strict": True}}
    for seed in (1, 2):
        response = sdk.responses.create(
            model=MODEL_NAME,
            input="Weather in Oslo?",
            text=text,
            max_output_tokens=120,
            temperature=1.0,
            extra_body={"seed": seed},
        )
        assert response.status == "completed", response
        jsonschema.validate(json.loads(response.output_text), FORECAST)
    with sdk.responses.stream(model=MODEL_NAME, input="Weather?", text=text, max_output_tokens=120) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), FORECAST)


def test_parse_with_a_pydantic_model(sdk):
    class Forecast(BaseModel):
        city: str = Field(max_length=10)
        sky: Literal["sunny", "rainy"]

    response = sdk.responses.parse(
        model=MODEL_NAME, input="Weather in Oslo?", text_format=Forecast, max_output_tokens=120
    )
    assert isinstance(response.output_parsed, Forecast)


def test_forced_tool_call_and_a_two_turn_loop(sdk, hf_tokenizer):
    first = sdk.responses.create(
        model=MODEL_NAME,
        input=[{"role": "user", "content": "What time is it in UTC?"}],
        tools=[GET_TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=100,
        store=False,
    )
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_time" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["zone"] in ("UTC", "CET")
    second = sdk.responses.create(
        model=MODEL_NAME,
        input=[
            {"role": "user", "content": "What time is it in UTC?"},
            call.model_dump(exclude_none=True),  # the output item as it came
            {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"},
        ],
        tools=[GET_TIME],
        max_output_tokens=4,
        temperature=0,
    )
    assert second.output and second.output[0].type == "message"
    # The prompt is the chat template's rendering of the same conversation and tools.
    history = tool_turn("What time is it in UTC?", call, "12:00")
    assert second.usage.input_tokens == len(template_ids(hf_tokenizer, history, [TIME.chat()]))


def test_previous_response_id_continues_a_tool_loop(sdk, hf_tokenizer):
    """Only the call's output is sent; the stored first turn (input and function call) comes before it."""
    ask = "What time is it in CET?"
    first = sdk.responses.create(
        model=MODEL_NAME,
        input=ask,
        tools=[GET_TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=100,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    second = sdk.responses.create(
        model=MODEL_NAME,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "13:00"}],
        tools=[GET_TIME],
        max_output_tokens=2,
    )
    history = tool_turn(ask, call, "13:00")
    assert second.usage.input_tokens == len(template_ids(hf_tokenizer, history, [TIME.chat()]))


def test_the_api_key_guards_the_routes(long_model_dir):
    live = start_live_server(long_model_dir, server={"api_key": "sesame"})
    try:
        assert_error(post(live, input="x", max_output_tokens=1), 401, code="invalid_api_key")
        assert_error(httpx.get(f"{live.v1}/responses/resp_x"), 401, code="invalid_api_key")
        client = openai.OpenAI(base_url=live.v1, api_key="sesame", max_retries=0, timeout=60)
        response = client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=1)
        assert client.responses.retrieve(response.id).id == response.id
    finally:
        live.stop()


def test_streamed_tool_call_matches_the_final_response(sdk):
    with sdk.responses.stream(
        model=MODEL_NAME,
        input="What time is it?",
        tools=[GET_TIME],
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=100,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and calls[0].arguments == "".join(pieces) == done.arguments
    assert len(pieces) > 1, "arguments stream in pieces"


def read_events(raw: bytes) -> list[tuple[str, dict]]:
    """`(event name, data)` of a Responses stream, checking the framing of every event: an `event:`
    line naming the data's `type`, one `data:` line, a blank line; no `[DONE]`."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        name, data = lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


def test_sse_bytes_text_then_tool_call(server):
    """A grammar makes the model write text then a Hermes call (tool_choice auto parses it): one
    message item, then one function_call item, each opened and closed in OpenAI's order."""
    written = 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    body = {
        "model": MODEL_NAME,
        "input": "Time?",
        "tools": [GET_TIME],
        "stream": True,
        "max_output_tokens": 200,
        "structured_outputs": {"grammar": f"start: {json.dumps(written)}\n"},
    }
    raw = httpx.post(server.v1 + "/responses", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = read_events(raw.content)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    names = [name for name, _ in events]
    deltas = names.count("response.output_text.delta")
    arg_deltas = names.count("response.function_call_arguments.delta")
    assert deltas >= 1 and arg_deltas >= 1
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * arg_deltas,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    data = dict(events)
    assert data["response.created"]["response"]["status"] == "in_progress"
    assert data["response.output_text.done"]["text"] == "Checking."
    assert data["response.function_call_arguments.done"]["arguments"] == '{"zone": "CET"}'
    final = data["response.completed"]["response"]
    assert final["status"] == "completed" and final["output_text"] == "Checking."
    message, call = final["output"]
    assert message["content"][0]["text"] == "Checking." and message["status"] == "completed"
    assert (call["type"], call["name"], call["arguments"]) == ("function_call", "get_time", '{"zone": "CET"}')
    assert final["usage"]["output_tokens"] > 0
    assert b"tool_call>" not in raw.content
    # The whole (non-streamed) answer is the same parse.
    whole = post(server, **{k: v for k, v in body.items() if k not in ("model", "stream")}).json()
    assert [(i["type"], i.get("content"), i.get("arguments")) for i in whole["output"]] == [
        (i["type"], i.get("content"), i.get("arguments")) for i in final["output"]
    ]


def test_a_codex_style_request(server):
    """The shape of Codex CLI's requests: instructions, input_text parts, a function tool with
    `strict`, tool_choice auto, store false, include, prompt_cache_key, client_metadata; streamed."""
    shell = {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "array", "items": {"type": "string"}}},
        },
    }
    body = {
        "model": MODEL_NAME,
        "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List files."}]}
        ],
        "tools": [shell],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": None,
        "store": False,
        "stream": True,
        "include": [],
        "prompt_cache_key": "thread-1",
        "client_metadata": {"originator": "codex_cli_rs"},
        "text": {"verbosity": "medium"},
        "max_output_tokens": 8,
    }
    raw = httpx.post(server.v1 + "/responses", json=body, timeout=60)
    assert raw.status_code == 200, raw.text
    events = read_events(raw.content)
    assert events[0][0] == "response.created" and events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["store"] is False


def test_store_previous_response_id_get_and_delete(server, sdk):
    first = sdk.responses.create(model=MODEL_NAME, input="def add(a, b):", max_output_tokens=4, temperature=0)
    assert first.store is True
    assert sdk.responses.retrieve(first.id).output_text == first.output_text
    assert_error(httpx.get(f"{server.v1}/responses/{first.id}/input_items"), 404)
    follow = sdk.responses.create(
        model=MODEL_NAME, input="again", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    fresh = sdk.responses.create(model=MODEL_NAME, input="again", max_output_tokens=4, temperature=0)
    # The follow-up's prompt holds the first turn (its input and output) before the new input.
    assert follow.usage.input_tokens > fresh.usage.input_tokens + first.usage.output_tokens
    assert follow.previous_response_id == first.id
    unstored = sdk.responses.create(model=MODEL_NAME, input="x", max_output_tokens=1, store=False)
    assert unstored.store is False
    assert_error(httpx.get(f"{server.v1}/responses/{unstored.id}"), 404, "response_id")
    assert httpx.delete(f"{server.v1}/responses/{first.id}").json() == {
        "id": first.id,
        "object": "response",
        "deleted": True,
    }
    assert_error(httpx.get(f"{server.v1}/responses/{first.id}"), 404, "response_id")
    assert_error(httpx.delete(f"{server.v1}/responses/{first.id}"), 404, "response_id")


def test_the_store_forgets_the_oldest_beyond_its_size(server, sdk):
    ids = [sdk.responses.create(model=MODEL_NAME, input="x", max_output_tokens=1).id for _ in range(5)]
    assert httpx.get(f"{server.v1}/responses/{ids[0]}").status_code == 404  # the store holds 4
    assert all(httpx.get(f"{server.v1}/responses/{i}").status_code == 200 for i in ids[1:])
    assert_error(post(server, input="x", previous_response_id=ids[0]), 404, "previous_response_id")


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": "x", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input[0].type"),
        (
            {"input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]},
            400,
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id"),
        ({"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
        ({"input": [{"role": "user", "content": "x", "colour": 1}]}, 400, "input[0].colour"),
        ({"input": 5}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "function", "name": ""}]}, 400, "tools[0].name"),
        ({"input": "x", "tools": [GET_TIME], "tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
        (
            {"input": "x", "tools": [GET_TIME], "tool_choice": {"type": "function", "name": "nope"}},
            400,
            "tool_choice",
        ),
        ({"input": "x", "reasoning": {"effort": "high"}}, 400, "reasoning"),
        ({"input": "x", "background": True}, 400, "background"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, 400, "include"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text.format"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "f"}}}, 400, "text.format.schema"),
        ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"input": "x", "temperature": -1}, 400, "temperature"),
        ({"input": "x", "metadata": {"k": 1}}, 400, "metadata"),
        ({"input": "x", "model": "other"}, 404, "model"),
        ({"input": "x", "colour": "red"}, 400, "colour"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    assert_error(post(server, **{"max_output_tokens": 2, **body}), status, param)


def test_the_server_keeps_serving_after_bad_requests(server, sdk):
    assert_error(post(server, input=[{"type": "item_reference", "id": "x"}]), 400, "input[0].type")
    assert sdk.responses.create(model=MODEL_NAME, input="ok", max_output_tokens=2).status == "incomplete"
    wait_until(lambda: engine_idle(server), what="engine idle")


def test_store_disabled(long_model_dir):
    live = start_live_server(long_model_dir, server={"max_stored_responses": 0})
    try:
        response = post(live, input="x", max_output_tokens=1).json()
        assert response["store"] is False
        assert_error(httpx.get(f"{live.v1}/responses/{response['id']}"), 404, "response_id")
        assert_error(post(live, input="x", previous_response_id=response["id"]), 404, "previous_response_id")
    finally:
        live.stop()


def test_openapi_documents_the_routes(server):
    schema = httpx.get(server.url + "/docs/openapi.json").json()
    create = schema["paths"]["/v1/responses"]["post"]
    assert "text/event-stream" in create["responses"]["200"]["content"]
    assert "input" in create["requestBody"]["content"]["application/json"]["schema"]["properties"]
    stored = schema["paths"]["/v1/responses/{response_id}"]
    assert {"get", "delete"} <= set(stored) and "404" in stored["get"]["responses"]


def aborted(server) -> float:
    """The server's count of aborted requests, from /metrics."""
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "helix:request_success_total" and sample.labels["finished_reason"] == "abort":
                return sample.value
    return 0.0


def test_a_client_that_leaves_a_stream_aborts_the_request(server):
    before = aborted(server)
    body = {"model": MODEL_NAME, "input": "x", "stream": True, "max_output_tokens": 3000, "ignore_eos": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", server.v1 + "/responses", json=body) as response,
    ):
        lines = response.iter_lines()  # keep a reference: a collected iterator closes the connection
        assert next(lines) == "event: response.created"
        wait_until(lambda: server.engine.stats().num_requests_running == 1, what="request running")
    wait_until(lambda: engine_idle(server), timeout=10, what="idle after the client left")
    assert aborted(server) == before + 1
    assert post(server, input="x", max_output_tokens=1).status_code == 200


def test_an_engine_failure_mid_stream_ends_with_error_and_response_failed(long_model_dir):
    live = start_live_server(long_model_dir)
    original = live.engine.core.step
    try:
        body = {
            "model": MODEL_NAME,
            "input": "x",
            "stream": True,
            "max_output_tokens": 3000,
            "ignore_eos": True,
        }
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", live.v1 + "/responses", json=body) as response,
        ):
            chunks = response.iter_bytes()
            received = b""
            while b"response.output_text.delta" not in received:
                received += next(chunks)

            def broken_step():
                raise RuntimeError("injected engine bug")

            live.engine.core.step = broken_step
            received += b"".join(chunks)
        events = read_events(received)
        assert [name for name, _ in events[-2:]] == ["error", "response.failed"]
        error, failed = events[-2][1], events[-1][1]["response"]
        assert error["code"] == "engine_dead" and error["message"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "engine_dead"
        assert failed["output"] and failed["output"][0]["type"] == "message"
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    finally:
        live.engine.core.step = original
        live.stop()
