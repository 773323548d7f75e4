"""Tool calling through HTTP: OpenAI SDK and LangChain clients against a live server.

The tiny random model can't write tool calls on its own, so `required` and named `tool_choice`
(constrained by a grammar to the call markup and each tool's parameter schema) are what makes its
calls parse; `auto` is checked on what the model writes (text, no markup in content).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import MODEL_NAME, assert_error, engine_idle, sse_json, start_live_server, wait_until

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(long_model_dir):
    live = start_live_server(long_model_dir)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_tokenizer(long_model_dir):
    return AutoTokenizer.from_pretrained(str(long_model_dir))


def chat(server, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", json={"model": MODEL_NAME, **body}, timeout=60)


def template_ids(hf_tokenizer, messages) -> list[int]:
    """transformers' own rendering of `messages` with `TOOLS`, tokenized."""
    text = hf_tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    return hf_tokenizer.encode(text, add_special_tokens=False)


def test_tools_reach_the_chat_template(server, hf_tokenizer):
    expected = template_ids(hf_tokenizer, ASK)
    response = chat(server, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=1)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(expected)
    without = chat(server, messages=ASK, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert without < len(expected)
    # tool_choice "none": the tools are not offered to the model.
    none = chat(server, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1).json()
    assert none["usage"]["prompt_tokens"] == without


def test_auto_on_text_output_is_content_without_markup(sdk):
    response = sdk.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, max_tokens=24, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert "<tool_call>" not in choice.message.content
    stream = sdk.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, max_tokens=24, temperature=0, stream=True
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
    expected = template_ids(hf_tokenizer, history)
    reply = sdk.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, tool_choice="none", max_tokens=4, temperature=0
    )
    assert isinstance(reply.choices[0].message.content, str)
    offered = sdk.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=1, temperature=0
    )
    assert offered.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
        ({"tools": ["f"]}, "tools[0].type"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_param(server, body, param):
    assert_error(chat(server, messages=ASK, max_tokens=2, **body), 400, param)


def test_auto_without_a_parser_is_a_400(long_model_dir):
    live = start_live_server(long_model_dir, server={"tool_call_parser": "none"})
    try:
        assert_error(chat(live, messages=ASK, tools=TOOLS, max_tokens=2), 400, "tool_choice")
        assert chat(live, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=2).status_code == 200
        wait_until(lambda: engine_idle(live), what="engine idle")
    finally:
        live.stop()
