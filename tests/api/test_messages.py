"""Anthropic's Messages API through its real clients: the `anthropic` SDK and LangChain's ChatAnthropic.

The tiny random model writes no tool calls on its own, so tool use is asked for with tool_choice
`any` / `tool` (which constrain the output to a call matching the tool's input_schema).
"""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest
from langchain_anthropic import ChatAnthropic

from tests.api.conftest import MODEL_NAME, engine_idle, wait_until
from tests.api.tool_fixtures import ASK, TOOL_SPECS, WEATHER, schema_of, template_ids

TOOLS = [spec.anthropic() for spec in TOOL_SPECS]
# Anthropic's tools reach the chat template exactly as chat completions' do (the template writes the
# keys in the order given, so the order counts in the tokens): one tool, one prompt, in either API.
OPENAI_TOOLS = [spec.chat() for spec in TOOL_SPECS]


@pytest.fixture(scope="module")
def sdk(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_create_text(sdk, server, hf_tokenizer):
    message = sdk.messages.create(
        model=MODEL_NAME, max_tokens=8, system="Be brief.", messages=ASK, extra_body={"temperature": 0}
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL_NAME
    assert [block.type for block in message.content] in (["text"], [])
    assert message.stop_reason in ("end_turn", "max_tokens")
    expected = template_ids(hf_tokenizer, [{"role": "system", "content": "Be brief."}, *ASK])
    assert message.usage.input_tokens == len(expected)
    assert 1 <= message.usage.output_tokens <= 8
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == 8
    wait_until(lambda: engine_idle(server), what="engine idle")


def test_stream_matches_create(sdk):
    body = {"model": MODEL_NAME, "max_tokens": 12, "messages": ASK, "extra_body": {"temperature": 0}}
    whole = sdk.messages.create(**body)
    with sdk.messages.stream(**body) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == "".join(b.text for b in whole.content)
    assert [(b.type, b.text) for b in final.content] == [(b.type, b.text) for b in whole.content]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequence(sdk):
    free = sdk.messages.create(model=MODEL_NAME, max_tokens=16, messages=ASK, extra_body={"temperature": 0})
    text = free.content[0].text
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text.find(text[i : i + 2]) == i)
    stopped = sdk.messages.create(
        model=MODEL_NAME, max_tokens=16, messages=ASK, extra_body={"temperature": 0}, stop_sequences=[stop]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.find(stop)]


def test_prefill_continues_the_last_assistant_message(sdk, hf_tokenizer):
    prefilled = [*ASK, {"role": "assistant", "content": "The answer is ("}]
    message = sdk.messages.create(
        model=MODEL_NAME, max_tokens=4, messages=prefilled, extra_body={"temperature": 0}
    )
    assert message.usage.input_tokens == len(template_ids(hf_tokenizer, prefilled, prefill=True))
    answered = template_ids(hf_tokenizer, prefilled)
    assert message.usage.input_tokens != len(answered)


@pytest.mark.parametrize("seed_text", ["Paris?", "Oslo?"])
def test_tool_use_with_any(sdk, seed_text):
    message = sdk.messages.create(
        model=MODEL_NAME,
        max_tokens=200,
        messages=[{"role": "user", "content": seed_text}],
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert message.stop_reason == "tool_use", message
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name in ("get_weather", "get_time")
    jsonschema.validate(call.input, schema_of(call.name))


def test_stream_tool_use_named(sdk):
    body = {
        "model": MODEL_NAME,
        "max_tokens": 200,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_time"},
    }
    with sdk.messages.stream(**body) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    calls = [b for b in final.content if b.type == "tool_use"]
    assert calls and all(c.name == "get_time" for c in calls)
    for call in calls:
        jsonschema.validate(call.input, schema_of("get_time"))
    deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert deltas, "the input streams as input_json_delta pieces"


def test_two_turn_tool_loop(sdk, hf_tokenizer):
    first = sdk.messages.create(
        model=MODEL_NAME,
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    (call,) = [b for b in first.content if b.type == "tool_use"]
    history = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}],
        },
    ]
    second = sdk.messages.create(
        model=MODEL_NAME, max_tokens=4, messages=history, tools=TOOLS, extra_body={"temperature": 0}
    )
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # The history reached the chat template as the OpenAI-style conversation it stands for.
    openai_history = [
        *ASK,
        {
            "role": "assistant",
            "content": "".join(b.text for b in first.content if b.type == "text") or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.input, ensure_ascii=False)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    assert second.usage.input_tokens == len(template_ids(hf_tokenizer, openai_history, OPENAI_TOOLS))


def test_count_tokens(sdk, hf_tokenizer):
    counted = sdk.messages.count_tokens(model=MODEL_NAME, messages=ASK, system="Be brief.")
    expected = template_ids(hf_tokenizer, [{"role": "system", "content": "Be brief."}, *ASK])
    assert counted.input_tokens == len(expected)
    with_tools = sdk.messages.count_tokens(model=MODEL_NAME, messages=ASK, tools=TOOLS)
    assert with_tools.input_tokens == len(template_ids(hf_tokenizer, ASK, OPENAI_TOOLS))
    created = sdk.messages.create(model=MODEL_NAME, max_tokens=1, messages=ASK, tools=TOOLS)
    assert created.usage.input_tokens == with_tools.input_tokens


def test_langchain_chat_anthropic(server):
    chat = ChatAnthropic(
        base_url=server.url, api_key="unused", model=MODEL_NAME, max_tokens=6, temperature=0, max_retries=0
    )
    answer = chat.invoke("Name a prime number.")
    assert isinstance(answer.content, str)
    assert answer.response_metadata["stop_reason"] in ("end_turn", "max_tokens")
    assert answer.usage_metadata["output_tokens"] <= 6
    streamed = "".join(chunk.text for chunk in chat.stream("Name a prime number."))
    assert streamed == answer.content


def test_langchain_tool_call(server):
    chat = ChatAnthropic(
        base_url=server.url, api_key="unused", model=MODEL_NAME, max_tokens=200, max_retries=0
    )
    bound = chat.bind_tools([WEATHER.anthropic()], tool_choice="get_weather")
    answer = bound.invoke("What is the weather in Paris?")
    assert answer.tool_calls, answer
    call = answer.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("toolu_")
    jsonschema.validate(call["args"], WEATHER.parameters)
