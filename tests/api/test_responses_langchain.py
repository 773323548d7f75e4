"""LangChain's `ChatOpenAI(use_responses_api=True)` against a live server: invoke, stream, a tool loop."""

from __future__ import annotations

from typing import Literal

from tests.api.conftest import MODEL_NAME


def chat_model(server, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=server.v1,
        api_key="unused",
        model=MODEL_NAME,
        use_responses_api=True,
        max_retries=0,
        **kwargs,
    )


def test_invoke_and_stream_agree(server):
    llm = chat_model(server, max_tokens=8, temperature=0)
    answer = llm.invoke("def fib(n):")
    assert isinstance(answer.text, str) and answer.text
    assert answer.response_metadata["id"].startswith("resp_")
    assert 0 < answer.usage_metadata["output_tokens"] <= 8
    streamed = "".join(chunk.text for chunk in llm.stream("def fib(n):"))
    assert streamed == answer.text


def test_tool_call_and_a_tool_loop(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        return f"12:00 {zone}"

    llm = chat_model(server, max_tokens=100)
    forced = llm.bind_tools([get_time], tool_choice="get_time", parallel_tool_calls=False)
    messages = [HumanMessage("What time is it in UTC?")]
    answer = forced.invoke(messages)
    (call,) = answer.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("UTC", "CET")
    assert call["id"].startswith("call_")
    messages += [answer, ToolMessage(get_time.invoke(call["args"]), tool_call_id=call["id"])]
    final = chat_model(server, max_tokens=4, temperature=0).bind_tools([get_time]).invoke(messages)
    assert isinstance(final.text, str) and not final.tool_calls
    assert final.usage_metadata["input_tokens"] > answer.usage_metadata["input_tokens"]
