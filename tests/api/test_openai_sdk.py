"""The real `openai` SDK, sync and async, against a live server: every feature a client relies on."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.api.conftest import MODEL_NAME, first_new_bigram

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def sdk(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.v1, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def async_sdk_args(live_server) -> dict:
    return {"base_url": live_server.v1, "api_key": "unused", "max_retries": 0, "timeout": 30}


def test_models_list_and_retrieve(sdk):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert sdk.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


def test_chat_completion(sdk):
    response = sdk.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_completion_tokens=8, temperature=0
    )
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == MODEL_NAME
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert "stop_reason" in choice.model_extra


def test_chat_stream_with_usage(sdk):
    stream = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    whole = sdk.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert text == whole.choices[0].message.content


def test_completion_and_stream_agree(sdk):
    whole = sdk.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    chunks = list(
        sdk.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_n2_with_several_prompts(sdk):
    response = sdk.completions.create(
        model=MODEL_NAME, prompt=[PROMPT, "import os\n"], n=2, max_tokens=5, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    # prompt_index * n + sequence index: choices 0-1 continue the first prompt, 2-3 the second.
    alone = sdk.completions.create(
        model=MODEL_NAME, prompt="import os\n", n=2, max_tokens=5, temperature=1.0, seed=7
    )
    by_index = {c.index: c.text for c in response.choices}
    assert [by_index[2], by_index[3]] == [c.text for c in sorted(alone.choices, key=lambda c: c.index)]
    assert response.usage.prompt_tokens > alone.usage.prompt_tokens
    chat = sdk.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, max_tokens=4, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]


def test_chat_logprobs(sdk):
    response = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the top token
        assert isinstance(entry.bytes, list)


def test_completion_logprobs_and_echo(sdk):
    response = sdk.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=2,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    choice = response.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    n_prompt = response.usage.prompt_tokens
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == len(lp.text_offset)
        == n_prompt + 4
    )
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    # The two most likely tokens, plus the chosen (or echoed) token when it is not one of them.
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])
    assert all(t[tok] == v for tok, v, t in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_stop_string(sdk):
    free = sdk.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    stop = first_new_bigram(text)
    stopped = sdk.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop
    assert choice.text == text[: text.index(stop)]


def test_seed_is_reproducible(sdk):
    def sample(seed):
        return (
            sdk.completions.create(
                model=MODEL_NAME,
                prompt=PROMPT,
                max_tokens=12,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    assert sample(1234) == sample(1234)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_error_classes(sdk, live_server):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=3)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model=MODEL_NAME, prompt="hi " * 400)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.APIStatusError) as info:
        sdk.completions.create(model=MODEL_NAME, prompt="x" * (300 * 1024))
    assert info.value.status_code == 413
    live_server.state.draining = True
    try:
        with pytest.raises(openai.APIStatusError) as info:
            sdk.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"]
    finally:
        live_server.state.draining = False


def test_async_client(async_sdk_args):
    async def main():
        async with openai.AsyncOpenAI(**async_sdk_args) as sdk:
            whole = await sdk.chat.completions.create(
                model=MODEL_NAME, messages=CHAT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
            )
            stream = await sdk.chat.completions.create(
                model=MODEL_NAME,
                messages=CHAT,
                max_tokens=6,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            completion = await sdk.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3)
            with pytest.raises(openai.BadRequestError):
                await sdk.completions.create(model=MODEL_NAME, prompt=PROMPT, top_p=0)
            return whole.choices[0].message.content, text, completion

    whole, streamed, completion = asyncio.run(main())
    assert whole == streamed
    assert completion.usage.completion_tokens <= 3
