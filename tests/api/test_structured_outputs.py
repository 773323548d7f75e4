"""Structured outputs through HTTP: response_format, vLLM's structured_outputs, /generate, the SDK's
`parse`, LangChain's `with_structured_output`, and the bad inputs (400 naming the parameter).

The tiny model has random weights: it cannot write JSON by itself, so every valid output here is
the grammar's doing.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.api.conftest import MODEL_NAME, assert_error

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person."}]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.v1, api_key="unused", max_retries=0, timeout=60)


def _chat(live_server, **body) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 120, **body}
    return httpx.post(live_server.v1 + "/chat/completions", json=body, timeout=60)


def test_sdk_parse_returns_a_parsed_object(client):
    completion = client.chat.completions.parse(
        model=MODEL_NAME, messages=MESSAGES, response_format=Person, temperature=0, max_tokens=120
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("seed", range(6))
def test_sampled_json_schema_outputs_validate(live_server, seed):
    response = _chat(
        live_server,
        temperature=1.0,
        seed=seed,
        n=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        },
    )
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    completed = [c for c in choices if c["finish_reason"] == "stop"]
    assert completed, [c["message"]["content"] for c in choices]
    for choice in completed:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    for choice in choices:
        assert choice["finish_reason"] in ("stop", "length")


def test_truncated_output_finishes_with_length(live_server):
    response = _chat(live_server, temperature=0, max_tokens=3, response_format={"type": "json_object"})
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith("{")


def test_json_object(live_server):
    response = _chat(live_server, temperature=0, response_format={"type": "json_object"})
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_json_object_streamed_equals_non_streamed(live_server):
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 120,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    whole = httpx.post(live_server.v1 + "/chat/completions", json=body, timeout=60).json()
    text = ""
    with httpx.stream(
        "POST", live_server.v1 + "/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == whole["choices"][0]["message"]["content"]


def test_choice(live_server):
    options = ["red", "green", "blue sky"]
    for seed in range(3):
        response = _chat(live_server, temperature=1.0, seed=seed, structured_outputs={"choice": options})
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] in options
        assert choice["finish_reason"] == "stop"


def test_regex_on_completions(live_server):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for seed in range(3):
        response = httpx.post(
            live_server.v1 + "/completions",
            json={
                "model": MODEL_NAME,
                "prompt": "id:",
                "max_tokens": 20,
                "temperature": 1.0,
                "seed": seed,
                "structured_outputs": {"regex": pattern},
            },
            timeout=60,
        )
        choice = response.json()["choices"][0]
        assert re.fullmatch(pattern, choice["text"]), choice
        assert choice["finish_reason"] == "stop"


def test_json_schema_on_completions_response_format(live_server):
    response = httpx.post(
        live_server.v1 + "/completions",
        json={
            "model": MODEL_NAME,
            "prompt": "{",
            "max_tokens": 120,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        },
        timeout=60,
    )
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["text"]), SCHEMA)


def test_lark_grammar(live_server):
    grammar = 'start: "(" item ("," item)* ")"\nitem: /[a-c]/ | "x=" /[0-9]/'
    response = _chat(
        live_server, temperature=1.0, seed=1, max_tokens=60, structured_outputs={"grammar": grammar}
    )
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert re.fullmatch(r"\((?:[a-c]|x=[0-9])(?:,(?:[a-c]|x=[0-9]))*\)", choice["message"]["content"])
    else:
        assert re.fullmatch(r"\((?:[a-c]|x=[0-9]?)?(?:,(?:[a-c]|x=[0-9]?)?)*", choice["message"]["content"])


def test_generate_endpoint(live_server):
    response = httpx.post(
        live_server.url + "/generate",
        json={
            "prompt": "hi",
            "max_tokens": 20,
            "temperature": 1.0,
            "structured_outputs": {"regex": "[a-z]{1,5}!"},
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert re.fullmatch("[a-z]{1,5}!", response.json()["text"])


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
            "strin",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format",
            "uniqueItems",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}},
                }
            },
            "response_format",
            "nowhere",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "xml"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed"),
        (
            {"structured_outputs": {"grammar": "start: undefined_rule"}},
            "structured_outputs",
            "undefined_rule",
        ),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "regexp"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "either",
        ),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ],
)
def test_bad_constraints_are_400_naming_the_parameter(live_server, body, param, needle):
    response = _chat(live_server, **body)
    error = assert_error(response, 400, param)
    assert needle in error["message"], error
    assert _chat(live_server, temperature=0, max_tokens=2).status_code == 200  # still serving


def test_huge_schema_is_400(live_server):
    schema = {"type": "object", "properties": {f"field_{i:05d}": {"type": "integer"} for i in range(5000)}}
    response = _chat(
        live_server, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    error = assert_error(response, 400, "response_format")
    assert "characters" in error["message"]


def test_bad_request_among_good_ones_fails_alone(live_server):
    good = {"response_format": {"type": "json_object"}, "temperature": 0}
    first = _chat(live_server, **good)
    assert_error(_chat(live_server, structured_outputs={"regex": "(("}), 400, "structured_outputs")
    again = _chat(live_server, **good)
    assert (
        again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    )
    assert live_server.engine.core.structured_matchers.__len__() == 0  # every matcher forgotten


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_with_structured_output(live_server, method):
    chat = ChatOpenAI(
        base_url=live_server.v1,
        api_key="unused",
        model=MODEL_NAME,
        temperature=0,
        max_tokens=120,
        max_retries=0,
        timeout=60,
    )
    structured = chat.with_structured_output(Person, method=method)
    if method == "json_schema":
        result = structured.invoke("Describe a person.")
        assert isinstance(result, Person)
    else:
        # json_mode constrains to *some* JSON object; it parses, though a random model's keys differ.
        raw = chat.with_structured_output(None, method="json_mode").invoke("Describe a person as JSON.")
        assert isinstance(raw, dict)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pattern", ["(a|b)*a(a|b){40}", "[a-z]{1,1000}{1,1000}", "(.*a){50}", "(x+x+)+y"])
def test_pathological_regexes_never_hang_the_server(live_server, pattern):
    response = _chat(
        live_server, temperature=1.0, seed=0, max_tokens=30, structured_outputs={"regex": pattern}
    )
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        choice = response.json()["choices"][0]
        text = choice["message"]["content"]
        assert re.fullmatch(pattern, text) if choice["finish_reason"] == "stop" else len(text) > 0
    else:
        assert_error(response, 400, "structured_outputs")
    assert _chat(live_server, temperature=0, max_tokens=2).status_code == 200
