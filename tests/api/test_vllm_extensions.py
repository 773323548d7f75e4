"""vLLM's protocol extensions and the logprobs/echo/seed defects its own tests found, over HTTP.

Legacy `top_logprobs` always hold the sampled token; `echo` of a token-id prompt returns text that
its tokens and offsets describe; seeds outside vLLM's 64-bit range are a 400; `prompt_logprobs`,
`return_token_ids`, `stream_options.continuous_usage_stats`, chat `echo` /
`add_generation_prompt` / `continue_final_message`, and `/tokenize`'s `return_token_strs`.
"""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tests.api.conftest import (
    MODEL_NAME,
    assert_error,
    engine_idle,
    sse_json,
    start_live_server,
    wait_until,
)

PROMPT = "def fibonacci(n):"
CONVERSATION = [{"role": "user", "content": "Write a function."}, {"role": "assistant", "content": "def f"}]


@pytest.fixture(scope="module")
def tokenizer(live_server):
    return live_server.engine.tokenizer


@pytest.fixture(scope="module")
def hf_reference(tokenizer):
    """The same tokenizer loaded by transformers, the reference for token strings."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer.name, local_files_only=True)


def _post(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _stream(client: httpx.Client, path: str, body: dict) -> list[dict]:
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    return sse_json(response.content)


# ------------------------------------------------------------------ legacy and chat top_logprobs


def test_legacy_logprobs_zero_still_reports_the_sampled_token(client):
    choice = _post(
        client,
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 6, "logprobs": 0, "seed": 1, "ignore_eos": True},
    )["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 6
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top == {token: logprob}


def test_legacy_top_logprobs_add_the_sampled_token_when_it_is_not_among_the_top(client):
    body = {
        "prompt": PROMPT,
        "max_tokens": 16,
        "logprobs": 2,
        "temperature": 2.0,
        "seed": 11,
        "ignore_eos": True,
    }
    lp = _post(client, "/v1/completions", body)["choices"][0]["logprobs"]
    sizes = []
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == logprob
        assert len(top) <= 3
        if len(top) == 3:  # the sampled token was not among the two most likely: it is the least likely
            assert logprob == min(top.values())
        sizes.append(len(top))
    assert 3 in sizes, "at temperature 2 some sampled token should fall outside the top 2"
    streamed = _stream(client, "/v1/completions", body)
    assert [t for c in streamed for t in c["choices"][0]["logprobs"]["top_logprobs"]] == lp["top_logprobs"]


def test_chat_logprobs_have_the_sampled_token_and_exactly_top_logprobs_alternatives(client):
    body = {"messages": CONVERSATION[:1], "max_tokens": 5, "logprobs": True, "ignore_eos": True, "seed": 4}
    none = _post(client, "/v1/chat/completions", {**body, "top_logprobs": 0})["choices"][0]["logprobs"][
        "content"
    ]
    assert len(none) == 5
    assert all(entry["token"] and entry["logprob"] <= 0 and entry["top_logprobs"] == [] for entry in none)
    two = _post(client, "/v1/chat/completions", {**body, "top_logprobs": 2})["choices"][0]["logprobs"][
        "content"
    ]
    assert [e["token"] for e in two] == [e["token"] for e in none]
    assert all(len(entry["top_logprobs"]) == 2 for entry in two)


# ------------------------------------------------------------------ echo of token-id prompts


def _check_echo(tokenizer, choice: dict, prompt_ids: list[int]) -> None:
    """The echoed text starts with the whole decoded prompt, and each plain token sits at its offset."""
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith(tokenizer.decode(prompt_ids, skip_special_tokens=False))
    assert lp["tokens"][: len(prompt_ids)] == [tokenizer.token_text(t) for t in prompt_ids]
    special = {tokenizer.token_text(t) for t in tokenizer.all_special_ids}
    assert len(lp["tokens"]) == len(lp["text_offset"]) > len(prompt_ids)
    for position, (token, offset) in enumerate(zip(lp["tokens"], lp["text_offset"])):
        echoed = position < len(prompt_ids)  # every echoed token, special or not, is in the text
        if echoed or (token not in special and "\ufffd" not in token):
            assert text[offset : offset + len(token)] == token, (position, offset, token, text)


def test_echo_of_a_token_id_prompt_returns_the_text_its_tokens_and_offsets_describe(client, tokenizer):
    im_start = tokenizer.token_to_id("<|im_start|>")
    prompt_ids = [im_start, *tokenizer.encode("user\nx = 1"), im_start]
    body = {"prompt": prompt_ids, "echo": True, "logprobs": 1, "max_tokens": 5, "temperature": 0}
    whole = _post(client, "/v1/completions", body)["choices"][0]
    _check_echo(tokenizer, whole, prompt_ids)
    chunks = _stream(client, "/v1/completions", body)
    streamed = {
        "text": "".join(c["choices"][0]["text"] for c in chunks),
        "logprobs": {
            key: [v for c in chunks for v in c["choices"][0]["logprobs"][key]]
            for key in ("tokens", "text_offset")
        },
    }
    assert (
        streamed["text"] == whole["text"]
        and streamed["logprobs"]["text_offset"] == whole["logprobs"]["text_offset"]
    )
    _check_echo(tokenizer, streamed, prompt_ids)


# ------------------------------------------------------------------ seeds


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**64 - 1, 2**63])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_seeds_outside_the_64_bit_range_are_refused(client, path, seed):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CONVERSATION[:1]}
    error = assert_error(client.post(path, json={**body, "max_tokens": 2, "seed": seed}), 400, "seed")
    assert str(seed) in error["message"]


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_seeds_in_range_work_and_reproduce(client, seed):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.5, "seed": seed, "ignore_eos": True}
    first = _post(client, "/v1/completions", body)["choices"][0]["text"]
    assert _post(client, "/v1/completions", body)["choices"][0]["text"] == first


# ------------------------------------------------------------------ the routers' SGLang fields


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_fields_routers_add_are_accepted_at_their_defaults_only(client, path):
    """vLLM's production-stack router and SGLang's router add these to every request they forward."""
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CONVERSATION[:1]}
    body = {**body, "max_tokens": 2}
    _post(client, path, {**body, "no_stop_trim": False, "return_hidden_states": False})
    for name in ("no_stop_trim", "return_hidden_states"):
        assert_error(client.post(path, json={**body, name: True}), 400, name)


# ------------------------------------------------------------------ prompt_logprobs


def test_completion_prompt_logprobs_in_vllm_format(client, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 2, "return_token_ids": True}
    choice = _post(client, "/v1/completions", body)["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids
    positions = choice["prompt_logprobs"]
    assert len(positions) == len(prompt_ids) and positions[0] is None
    echo = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 0})
    echo_logprobs = echo["choices"][0]["logprobs"]["token_logprobs"]
    for token_id, position, echoed in zip(prompt_ids[1:], positions[1:], echo_logprobs[1:]):
        assert 2 <= len(position) <= 3 and str(token_id) in position
        entry = position[str(token_id)]
        assert set(entry) == {"logprob", "rank", "decoded_token"}
        assert entry["logprob"] == pytest.approx(echoed, abs=1e-5)
        assert entry["decoded_token"] == tokenizer.token_text(token_id) and entry["rank"] >= 1
        ranks = sorted(e["rank"] for key, e in position.items() if key != str(token_id) or e["rank"] <= 2)
        assert ranks[:2] == [1, 2]
    plain = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})["choices"][0]
    assert {"prompt_logprobs", "prompt_token_ids", "token_ids"}.isdisjoint(plain)


def test_chat_prompt_logprobs_cover_the_rendered_prompt(client):
    body = {"messages": CONVERSATION[:1], "max_tokens": 2, "prompt_logprobs": 0, "return_token_ids": True}
    response = _post(client, "/v1/chat/completions", body)
    prompt_ids = response["prompt_token_ids"]
    assert prompt_ids == _post(client, "/tokenize", {"messages": CONVERSATION[:1]})["tokens"]
    positions = response["prompt_logprobs"]
    assert len(positions) == len(prompt_ids) and positions[0] is None
    assert all(list(p) == [str(t)] for t, p in zip(prompt_ids[1:], positions[1:]))


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}),
        ("/v1/chat/completions", {"messages": CONVERSATION[:1], "prompt_logprobs": 1, "stream": True}),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": -1, "echo": True, "logprobs": 1}),
        ("/v1/chat/completions", {"messages": CONVERSATION[:1], "prompt_logprobs": 21}),
    ],
)
def test_bad_prompt_logprobs_are_400s(client, path, body):
    assert_error(client.post(path, json=body), 400, "prompt_logprobs")


# ------------------------------------------------------------------ return_token_ids


def test_completion_return_token_ids_through_the_sdk(live_server, tokenizer):
    sdk = openai.OpenAI(base_url=live_server.v1, api_key="unused", max_retries=0, timeout=30)
    completion = sdk.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = completion.choices[0]
    assert choice.prompt_token_ids == tokenizer.encode(PROMPT)
    assert len(choice.token_ids) == completion.usage.completion_tokens
    assert tokenizer.decode(choice.token_ids).startswith(choice.text)
    stream = sdk.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].prompt_token_ids == choice.prompt_token_ids
    assert all("prompt_token_ids" not in c.choices[0].model_extra for c in chunks[1:])
    assert [t for c in chunks for t in c.choices[0].token_ids] == choice.token_ids


def test_chat_return_token_ids_whole_and_streamed(client, tokenizer):
    body = {"messages": CONVERSATION[:1], "max_tokens": 6, "temperature": 0, "n": 2, "return_token_ids": True}
    response = _post(client, "/v1/chat/completions", body)
    assert (
        response["prompt_token_ids"] == _post(client, "/tokenize", {"messages": CONVERSATION[:1]})["tokens"]
    )
    for choice in response["choices"]:
        assert tokenizer.decode(choice["token_ids"]) == choice["message"]["content"]
    chunks = _stream(client, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == response["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    for index in range(2):
        ids = [
            t for c in chunks for ch in c["choices"] if ch["index"] == index for t in ch.get("token_ids", [])
        ]
        assert ids == response["choices"][index]["token_ids"]
    plain = _post(client, "/v1/chat/completions", {**body, "return_token_ids": False})
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


# ------------------------------------------------------------------ continuous usage stats


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "options", [{"include_usage": True, "continuous_usage_stats": True}, {"continuous_usage_stats": True}]
)
def test_continuous_usage_stats_put_usage_on_every_chunk(client, path, options):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CONVERSATION[:1]}
    body = {**body, "max_tokens": 5, "ignore_eos": True, "stream_options": options}
    chunks = _stream(client, path, body)
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    assert len({u["prompt_tokens"] for u in usages}) == 1
    completion = [u["completion_tokens"] for u in usages]
    assert completion == sorted(completion) and completion[-1] == 5
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    assert chunks[-1]["choices"] == []


def test_continuous_usage_stats_without_include_usage_is_a_400(client):
    body = {
        "prompt": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": False, "continuous_usage_stats": True},
    }
    assert_error(client.post("/v1/completions", json=body), 400, "stream_options.continuous_usage_stats")


# ------------------------------------------------------------------ chat echo and generation prompts


def test_chat_continue_final_message_with_echo(client):
    body = {
        "messages": CONVERSATION,
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "return_token_ids": True,
    }
    response = _post(client, "/v1/chat/completions", body)
    rendered = _post(
        client,
        "/tokenize",
        {"messages": CONVERSATION, "add_generation_prompt": False, "continue_final_message": True},
    )["tokens"]
    assert response["prompt_token_ids"] == rendered
    closed = _post(client, "/tokenize", {"messages": CONVERSATION, "add_generation_prompt": False})["tokens"]
    assert closed[: len(rendered)] == rendered and len(closed) > len(rendered)  # the open turn lacks its end
    message = response["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].startswith("def f")
    without_echo = _post(client, "/v1/chat/completions", {**body, "echo": False})["choices"][0]["message"]
    assert message["content"] == "def f" + without_echo["content"]
    chunks = _stream(client, "/v1/chat/completions", body)
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        == message["content"]
    )


def test_chat_echo_only_when_the_last_message_has_the_reply_role(client):
    base = {"max_tokens": 4, "temperature": 0}
    user_last = {**base, "messages": CONVERSATION[:1]}
    plain = _post(client, "/v1/chat/completions", user_last)["choices"][0]["message"]["content"]
    echoed = _post(client, "/v1/chat/completions", {**user_last, "echo": True})["choices"][0]["message"][
        "content"
    ]
    assert echoed == plain
    assistant_last = {**base, "messages": CONVERSATION}
    plain = _post(client, "/v1/chat/completions", assistant_last)["choices"][0]["message"]["content"]
    echoed = _post(client, "/v1/chat/completions", {**assistant_last, "echo": True})["choices"][0]["message"][
        "content"
    ]
    assert echoed == "def f" + plain


def test_add_generation_prompt_false_leaves_out_the_assistant_header(client, tokenizer):
    body = {"messages": CONVERSATION[:1], "max_tokens": 2, "return_token_ids": True}
    opened = _post(client, "/v1/chat/completions", body)["prompt_token_ids"]
    closed = _post(client, "/v1/chat/completions", {**body, "add_generation_prompt": False})[
        "prompt_token_ids"
    ]
    assert opened[: len(closed)] == closed
    assert tokenizer.decode(opened[len(closed) :], skip_special_tokens=False) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_continue_final_message_with_add_generation_prompt_is_a_400(client, path):
    body = {"messages": CONVERSATION, "continue_final_message": True}
    assert_error(client.post(path, json=body), 400, "continue_final_message")


# ------------------------------------------------------------------ /tokenize


def test_tokenize_return_token_strs(client, tokenizer, hf_reference):
    response = _post(client, "/tokenize", {"prompt": "def f(x):", "return_token_strs": True})
    assert response["token_strs"] == hf_reference.convert_ids_to_tokens(response["tokens"])
    assert "".join(tokenizer.token_text(t) for t in response["tokens"]) == "def f(x):"
    chat = _post(client, "/tokenize", {"messages": CONVERSATION, "return_token_strs": True})
    assert len(chat["token_strs"]) == chat["count"] and chat["token_strs"][0] == "<|im_start|>"
    assert "token_strs" not in _post(client, "/tokenize", {"prompt": "x"})


def test_tokenize_continue_final_message(client, tokenizer):
    body = {"messages": CONVERSATION, "add_generation_prompt": False, "continue_final_message": True}
    tokens = _post(client, "/tokenize", body)["tokens"]
    assert tokenizer.decode(tokens, skip_special_tokens=False).endswith("<|im_start|>assistant\ndef f")


def test_no_request_leaves_anything_behind(live_server):
    wait_until(lambda: engine_idle(live_server), timeout=10, what="engine idle with every KV block free")


@pytest.mark.parametrize(
    "last",
    [
        {"role": "assistant", "content": ""},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "f"}}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "def"}, {"type": "text", "text": "f"}]},
        {"role": "user", "content": "go on"},
    ],
)
def test_continue_final_message_edge_cases_are_answered_or_refused(client, last):
    body = {
        "messages": [CONVERSATION[0], last],
        "max_tokens": 2,
        "echo": True,
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    response = client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        assert_error(response, 400, "messages")
    else:
        assert response.json()["choices"][0]["message"]["role"] == last["role"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_offsets_of_generated_special_tokens_point_into_the_text(client, tokenizer, skip_special_tokens):
    im_start = tokenizer.token_to_id("<|im_start|>")
    body = {
        "prompt": "x = 1",
        "max_tokens": 3,
        "logprobs": 0,
        "logit_bias": {str(im_start): 100},
        "skip_special_tokens": skip_special_tokens,
    }
    choice = _post(client, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<|im_start|>"] * 3
    if skip_special_tokens:  # left out of the text, they take no room in it
        assert choice["text"] == "" and lp["text_offset"] == [0, 0, 0]
    else:
        assert choice["text"] == "<|im_start|>" * 3 and lp["text_offset"] == [0, 12, 24]


def test_each_prompt_of_a_batch_gets_its_own_prompt_logprobs_and_ids(client, tokenizer):
    prompts = ["import os", "def f(x):\n    return"]
    body = {"prompt": prompts, "n": 2, "max_tokens": 2, "prompt_logprobs": 1, "return_token_ids": True}
    choices = sorted(_post(client, "/v1/completions", body)["choices"], key=lambda c: c["index"])
    assert len(choices) == 4
    for choice in choices:
        prompt_ids = tokenizer.encode(prompts[choice["index"] // 2])
        assert choice["prompt_token_ids"] == prompt_ids
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(prompt_ids) and positions[0] is None
        assert all(str(t) in p for t, p in zip(prompt_ids[1:], positions[1:]))
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]


@pytest.fixture(scope="module")
def bos_server(tiny_model_dir, tmp_path_factory):
    """A server whose tokenizer adds `<|im_start|>` in front of every text prompt (as a BOS)."""
    model_dir = tmp_path_factory.mktemp("bos-model")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, model_dir / item.name)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], template]}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    live = start_live_server(model_dir)
    yield live
    live.stop()


def test_echo_offsets_skip_a_bos_the_tokenizer_added_to_a_text_prompt(bos_server):
    tokenizer = bos_server.engine.tokenizer
    prompt = "x = 1\ny = 2"
    assert tokenizer.encode(prompt)[0] == tokenizer.token_to_id("<|im_start|>")
    body = {"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=bos_server.url, timeout=30) as http:
        choices = [_post(http, "/v1/completions", body)["choices"][0]]
        chunks = _stream(http, "/v1/completions", body)
    lp = {
        key: [v for c in chunks for v in c["choices"][0]["logprobs"][key]]
        for key in ("tokens", "text_offset")
    }
    choices.append({"text": "".join(c["choices"][0]["text"] for c in chunks), "logprobs": lp})
    for choice in choices:
        text, tokens, offsets = (
            choice["text"],
            choice["logprobs"]["tokens"],
            choice["logprobs"]["text_offset"],
        )
        assert text.startswith(prompt) and tokens[0] == "<|im_start|>" and offsets[:2] == [0, 0]
        special = {tokenizer.token_text(t) for t in tokenizer.all_special_ids}
        for token, offset in zip(tokens[1:], offsets[1:]):
            if token not in special and "\ufffd" not in token:
                assert text[offset : offset + len(token)] == token, (offset, token, text)


def test_token_strs_of_a_long_prompt(client, hf_reference):
    prompt = "def f(x):\n    return x + 1\n" * 2000  # past the inline limit: looked up in a thread
    response = _post(client, "/tokenize", {"prompt": prompt, "return_token_strs": True})
    assert response["count"] > 16384
    assert response["token_strs"] == hf_reference.convert_ids_to_tokens(response["tokens"])


def test_echo_offsets_stay_right_after_a_character_split_across_tokens(client, tokenizer):
    prompt = "é = 'café'\nx = 1"
    ids = tokenizer.encode(prompt)
    assert any("\ufffd" in tokenizer.token_text(t) for t in ids), "the test needs a split character"
    body = {"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 4, "temperature": 0}
    choice = _post(client, "/v1/completions", body)["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith(prompt)
    echoed = zip(lp["tokens"][: len(ids)], lp["text_offset"][: len(ids)])
    for position, (token, offset) in enumerate(echoed):
        if "\ufffd" in token:  # part of a character: points at that character
            assert ord(text[offset]) > 127, (position, offset)
        else:
            assert text[offset : offset + len(token)] == token, (position, offset, token, text)
    assert lp["text_offset"][len(ids)] == len(prompt)  # the first generated token starts after the echo
