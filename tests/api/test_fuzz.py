"""Property: no request body, however odd, makes the server answer 5xx or stops it serving."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import engine_idle, wait_until

SAMPLING_KEYS = [
    "model",
    "n",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "speculation_depth",
    "prompt_logprobs",
    "return_token_ids",
    "tools",
    "frobnicate",
]
COMPLETION_KEYS = ["prompt", "max_tokens", "logprobs", "echo", "suffix", "best_of"]
CHAT_KEYS = [
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["", "tiny", "\x00"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "x"])},
        optional={"content": values, "name": values},
    ),
    max_size=3,
)


def bodies(keys: list[str], extra: dict) -> st.SearchStrategy[dict]:
    optional = {key: values for key in keys if key != "max_tokens"}
    optional.update(extra)
    return st.fixed_dictionaries({"max_tokens": st.integers(-2, 6)}, optional=optional)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies(SAMPLING_KEYS + COMPLETION_KEYS, {"prompt": st.one_of(values, st.text(max_size=20))}))
def test_completions_never_5xx(client, body):
    response = client.post("/v1/completions", content=json.dumps(body))
    assert response.status_code < 500, (body, response.text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies(SAMPLING_KEYS + CHAT_KEYS, {"messages": messages}))
def test_chat_never_5xx(client, body):
    response = client.post("/v1/chat/completions", content=json.dumps(body))
    assert response.status_code < 500, (body, response.text)


def test_still_serving_after_fuzzing(client, live_server):
    wait_until(lambda: engine_idle(live_server), timeout=30, what="engine idle")
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
