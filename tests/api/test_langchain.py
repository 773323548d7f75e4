"""LangChain's OpenAI integrations pointed at a live server."""

from __future__ import annotations

import asyncio

import pytest
from langchain_openai import ChatOpenAI, OpenAI

from tests.api.conftest import MODEL_NAME

QUESTION = "Name a prime number."


@pytest.fixture(scope="module")
def chat(live_server) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=live_server.v1,
        api_key="unused",
        model=MODEL_NAME,
        temperature=0,
        max_tokens=6,
        max_retries=0,
        timeout=30,
    )


def test_chat_invoke_and_stream_agree(chat):
    answer = chat.invoke(QUESTION)
    assert isinstance(answer.content, str)
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["output_tokens"] <= 6
    streamed = "".join(chunk.content for chunk in chat.stream(QUESTION))
    assert streamed == answer.content


def test_chat_batch(chat):
    answers = chat.batch([QUESTION, "Say hi.", QUESTION])
    assert len(answers) == 3
    assert answers[0].content == answers[2].content


def test_chat_astream(chat):
    async def main():
        return "".join([chunk.content async for chunk in chat.astream(QUESTION)])

    assert asyncio.run(main()) == chat.invoke(QUESTION).content


def test_completions_llm_invoke(live_server):
    llm = OpenAI(
        base_url=live_server.v1,
        api_key="unused",
        model=MODEL_NAME,
        temperature=0,
        max_tokens=5,
        max_retries=0,
        timeout=30,
    )
    text = llm.invoke("def add(a, b):")
    assert isinstance(text, str)
