"""Tool calling through HTTP: OpenAI SDK and LangChain clients against a live server.

The tiny random model can't write tool calls on its own, so `required` and named `tool_choice`
(constrained by a grammar to the call markup and each tool's parameter schema) are what makes its
calls parse; `auto` is checked on what the model writes (text, no markup in content).
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import msgspec
import pytest

from tests.api.conftest import MODEL_NAME, assert_error, engine_idle, sse_json, start_live_server, wait_until
from tests.api.tool_fixtures import ASK, CHAT_TOOLS, WEATHER, schema_of, template_ids


def chat(server, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", json={"model": MODEL_NAME, **body}, timeout=60)


def test_tools_reach_the_chat_template(server, hf_tokenizer):
    expected = template_ids(hf_tokenizer, ASK, CHAT_TOOLS)
    response = chat(server, messages=ASK, tools=CHAT_TOOLS, tool_choice="auto", max_tokens=1)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(expected)
    without = chat(server, messages=ASK, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert without < len(expected)
    # tool_choice "none": the tools are not offered to the model.
    none = chat(server, messages=ASK, tools=CHAT_TOOLS, tool_choice="none", max_tokens=1).json()
    assert none["usage"]["prompt_tokens"] == without


def test_auto_on_text_output_is_content_without_markup(sdk):
    response = sdk.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=CHAT_TOOLS, max_tokens=24, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert "<tool_call>" not in choice.message.content
    stream = sdk.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=CHAT_TOOLS, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_two_turn_tool_loop_renders_the_history(server, hf_tokenizer, sdk):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    expected = template_ids(hf_tokenizer, history, CHAT_TOOLS)
    reply = sdk.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=CHAT_TOOLS, tool_choice="none", max_tokens=4, temperature=0
    )
    assert isinstance(reply.choices[0].message.content, str)
    offered = sdk.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=CHAT_TOOLS, max_tokens=1, temperature=0
    )
    assert offered.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"tools": CHAT_TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": CHAT_TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER.chat(), WEATHER.chat()]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": ["f"]}, "tools[0].type"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_param(server, body, param):
    assert_error(chat(server, messages=ASK, max_tokens=2, **body), 400, param)


def test_auto_parses_calls_the_model_writes(server):
    """`auto` on output made deterministic by a grammar (vLLM's `structured_outputs`): text, then two
    Hermes calls; the parse is the same whole and streamed, and no markup reaches the content."""
    written = (
        'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    )
    grammar = f"start: {json.dumps(written)}\n"  # a JSON string is a Lark literal
    body = {
        "messages": ASK,
        "tools": CHAT_TOOLS,
        "max_tokens": 200,
        "structured_outputs": {"grammar": grammar},
    }
    whole = chat(server, **body)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
    assert calls == [("get_time", '{"zone": "CET"}'), ("get_weather", '{"city": "Oslo", "days": 2}')]
    raw = httpx.post(
        server.v1 + "/chat/completions", json={"model": MODEL_NAME, "stream": True, **body}, timeout=60
    )
    content, streamed, finishes = reassemble(sse_json(raw.content))
    assert content == "Checking." and finishes == ["tool_calls"]
    assert [(c["name"], "".join(c["pieces"])) for c in streamed.values()] == calls
    assert b"tool_call>" not in raw.content
    single = chat(server, **body, parallel_tool_calls=False).json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in single] == ["get_time"]


def test_forced_tool_choice_with_response_format_is_a_400(server):
    response = chat(
        server,
        messages=ASK,
        tools=CHAT_TOOLS,
        tool_choice="required",
        response_format={"type": "json_object"},
    )
    assert_error(response, 400, "tool_choice")


def test_auto_without_a_parser_is_a_400(long_model_dir):
    live = start_live_server(long_model_dir, server={"tool_call_parser": "none"})
    try:
        assert_error(chat(live, messages=ASK, tools=CHAT_TOOLS, max_tokens=2), 400, "tool_choice")
        assert chat(live, messages=ASK, tools=CHAT_TOOLS, tool_choice="none", max_tokens=2).status_code == 200
        wait_until(lambda: engine_idle(live), what="engine idle")
    finally:
        live.stop()


def assert_valid_call(name: str, arguments: str) -> dict:
    """`arguments` is JSON that the named tool's parameter schema accepts."""
    args = json.loads(arguments)
    jsonschema.validate(args, schema_of(name))
    return args


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_always_gives_a_valid_call(sdk, seed):
    response = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=ASK,
        tools=CHAT_TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=1.0,
        seed=seed,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    assert_valid_call(call.function.name, call.function.arguments)


def test_named_tool_choice_calls_that_tool(sdk):
    for seed in (4, 5):
        response = sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=ASK,
            tools=CHAT_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=200,
            seed=seed,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"] * len(
            choice.message.tool_calls
        )
        for call in choice.message.tool_calls:
            assert assert_valid_call("get_time", call.function.arguments)["zone"] in ("UTC", "CET")


def reassemble(events: list[dict]) -> tuple[str, dict[int, dict], list[str]]:
    """Content, calls by index (id, name, arguments pieces) and finish reasons of a chat stream."""
    content, calls, finishes = "", {}, []
    for event in events:
        for choice in event["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.get(piece["index"])
                if call is None:
                    assert piece["id"].startswith("call_") and piece["type"] == "function"
                    call = calls[piece["index"]] = {
                        "id": piece["id"],
                        "name": piece["function"]["name"],
                        "pieces": [],
                    }
                else:
                    assert "id" not in piece and "name" not in piece["function"], "id and name come once"
                call["pieces"].append(piece["function"].get("arguments", ""))
            if choice["finish_reason"] is not None:
                finishes.append(choice["finish_reason"])
    return content, calls, finishes


@pytest.mark.parametrize(
    "tool_choice, parallel",
    [("required", True), ({"type": "function", "function": {"name": "get_weather"}}, False)],
)
def test_streamed_tool_calls_reassemble_to_the_whole_answer(server, tool_choice, parallel):
    body = {"messages": ASK, "tools": CHAT_TOOLS, "tool_choice": tool_choice, "max_tokens": 200, "seed": 7}
    body["parallel_tool_calls"] = parallel
    whole = chat(server, **body).json()["choices"][0]
    raw = httpx.post(
        server.v1 + "/chat/completions", json={"model": MODEL_NAME, "stream": True, **body}, timeout=60
    )
    assert raw.status_code == 200
    content, calls, finishes = reassemble(sse_json(raw.content))
    assert content == "" and finishes == ["tool_calls"] == [whole["finish_reason"]]
    assert [(c["name"], "".join(c["pieces"])) for c in calls.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    assert b"<tool_call>" not in raw.content
    assert any(len(c["pieces"]) > 1 for c in calls.values()), "arguments stream in pieces"


def test_tool_loop_with_the_sdk(sdk):
    messages = list(ASK)
    first = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        tools=CHAT_TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        seed=3,
    )
    (call,) = first.choices[0].message.tool_calls
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": "sunny"})})
    second = sdk.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=CHAT_TOOLS, max_tokens=8, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_langchain_bind_tools_any_and_a_tool_loop(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        return f"12:00 {zone}"

    llm = ChatOpenAI(
        base_url=server.v1, api_key="unused", model=MODEL_NAME, max_tokens=120, seed=11, max_retries=0
    )
    forced = llm.bind_tools([get_time], tool_choice="any", parallel_tool_calls=False)
    messages = [HumanMessage("What time is it in UTC?")]
    answer = forced.invoke(messages)
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    (call,) = answer.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("UTC", "CET")
    messages += [answer, ToolMessage(get_time.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([get_time], tool_choice="none").invoke(messages)
    assert isinstance(final.content, str) and not final.tool_calls
    streamed = [chunk for chunk in forced.stream([HumanMessage("What time is it in UTC?")])]
    merged = streamed[0]
    for chunk in streamed[1:]:
        merged = merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]


def test_langchain_structured_output_with_function_calling(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        """A short forecast."""

        city: str = Field(max_length=10)
        sky: Literal["sunny", "rainy"]

    llm = ChatOpenAI(
        base_url=server.v1, api_key="unused", model=MODEL_NAME, max_tokens=120, seed=5, max_retries=0
    )
    result = llm.with_structured_output(Forecast, method="function_calling").invoke("Weather in Oslo?")
    assert isinstance(result, Forecast) and result.sky in ("sunny", "rainy") and len(result.city) <= 10


def _setup(parallel: bool = True):
    from helix_server.api.serving.tools import ToolCalling
    from helix_server.engine.tool_parsers import HermesToolParser

    return ToolCalling(CHAT_TOOLS, "auto", HermesToolParser, parallel)


HERMES_TWO_CALLS = (
    'On it.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def test_tool_stream_deltas_rebuild_the_whole_answer():
    from helix_server.api.serving.tools import ToolStream

    whole = ToolStream(_setup())
    content, _ = whole.feed(HERMES_TWO_CALLS, final=True)
    assert content == "On it." and whole.finish_reason("stop") == "tool_calls"
    assert whole.finish_reason("length") == "length"
    calls = [(c.function.name, c.function.arguments) for c in whole.tool_calls()]
    assert calls == [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone": "CET"}')]
    streamed = ToolStream(_setup())
    text, pieces = "", []
    for i, ch in enumerate(HERMES_TWO_CALLS):
        part, deltas = streamed.feed(ch, final=i == len(HERMES_TWO_CALLS) - 1)
        text += part
        pieces += deltas
    assert text == content
    starts = [p for p in pieces if p.id is not msgspec.UNSET]
    assert [(p.index, p.function.name, p.type) for p in starts] == [
        (0, "get_weather", "function"),
        (1, "get_time", "function"),
    ]
    assert all(p.function.name is msgspec.UNSET for p in pieces if p.id is msgspec.UNSET)
    rebuilt = ["".join(p.function.arguments or "" for p in pieces if p.index == i) for i in (0, 1)]
    assert rebuilt == [args for _, args in calls]


def test_parallel_tool_calls_false_keeps_the_first_call():
    from helix_server.api.serving.tools import ToolStream

    stream = ToolStream(_setup(parallel=False))
    _, deltas = stream.feed(HERMES_TWO_CALLS, final=True)
    assert [c.function.name for c in stream.tool_calls()] == ["get_weather"]
    assert {d.index for d in deltas} == {0}


def test_server_idle_after_the_tool_requests(server):
    wait_until(lambda: engine_idle(server), what="engine idle (no KV block held)")
    assert chat(server, messages=ASK, max_tokens=2).status_code == 200
