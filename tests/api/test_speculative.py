"""Speculative decoding through HTTP: greedy outputs identical with and without a draft (completions,
chat, Responses, Messages; whole and streamed), `speculation_depth` per request, and the counters on
/metrics and in /generate's metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import sse_json, start_live_server
from tests.api.test_metrics import families, value

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Cache:\n    def get(self, key):"]


@pytest.fixture(scope="module")
def servers(make_model_dir):
    target = make_model_dir("llama", num_hidden_layers=4)
    # The target itself as its own draft: every greedy draft is accepted.
    plain = start_live_server(target)
    speculative = start_live_server(target, draft_model=str(target), num_speculative_tokens=3)
    yield plain, speculative
    plain.stop()
    speculative.stop()


def _complete(url: str, **body) -> dict:
    response = httpx.post(url + "/v1/completions", json={"max_tokens": 24, "temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_outputs_identical_with_and_without_a_draft(servers):
    plain, speculative = servers
    for prompt in PROMPTS:
        for extra in ({}, {"ignore_eos": True}, {"n": 2, "ignore_eos": True}, {"stop": ["\n"]}):
            want = _complete(plain.url, prompt=prompt, **extra)
            got = _complete(speculative.url, prompt=prompt, **extra)
            assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
            assert got["usage"] == want["usage"]
    # Streaming too.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0}
    texts = []
    for server in servers:
        response = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
        chunks = sse_json(response.content)
        texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]))
    assert texts[0] == texts[1] and texts[0]


def test_speculation_depth_and_metrics(servers):
    _, speculative = servers
    client = httpx.Client(base_url=speculative.url, timeout=60)
    before = families(client)
    drafted0 = value(before, "helix:spec_decode_num_draft_tokens", "helix:spec_decode_num_draft_tokens_total")

    off = client.post("/generate", json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "speculation_depth": 0})
    assert off.status_code == 200 and off.json()["metrics"]["acceptance_rate"] is None
    mid = families(client)
    assert value(mid, "helix:spec_decode_num_draft_tokens", "helix:spec_decode_num_draft_tokens_total") == drafted0

    on = client.post("/generate", json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "speculation_depth": 2})
    assert on.status_code == 200
    assert on.json()["text"] == off.json()["text"]
    assert on.json()["metrics"]["acceptance_rate"] == 1.0  # the draft is the model itself
    after = families(client)
    drafted = value(after, "helix:spec_decode_num_draft_tokens", "helix:spec_decode_num_draft_tokens_total") - drafted0
    accepted = value(after, "helix:spec_decode_num_accepted_tokens", "helix:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and accepted >= drafted
    assert value(after, "helix:spec_decode_num_drafts", "helix:spec_decode_num_drafts_total") > 0
    per_position = after["helix:spec_decode_num_accepted_tokens_per_pos"].samples
    assert {s.labels["position"] for s in per_position} <= {"0", "1", "2"}
    # A depth above the server's maximum (3) is capped, not refused; a negative one is refused.
    capped = client.post("/generate", json={"prompt": "x", "max_tokens": 4, "temperature": 0, "speculation_depth": 99})
    assert capped.status_code == 200
    bad = client.post("/generate", json={"prompt": "x", "max_tokens": 4, "speculation_depth": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculation_depth"


def drafted(server) -> float:
    """The server's count of drafted tokens, from /metrics."""
    fams = families(httpx.Client(base_url=server.url, timeout=30))
    return value(fams, "helix:spec_decode_num_draft_tokens", "helix:spec_decode_num_draft_tokens_total")


def whole_and_streamed(servers, path: str, body: dict) -> tuple[list[dict], list[bytes]]:
    """Each server's whole JSON answer to `body` at `path`, and its streamed answer's raw bytes."""
    answers, streamed = [], []
    for server in servers:
        whole = httpx.post(server.url + path, json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        answers.append(whole.json())
        streamed.append(httpx.post(server.url + path, json={**body, "stream": True}, timeout=60).content)
    return answers, streamed


def test_greedy_responses_identical_with_a_draft(servers):
    """`/v1/responses`, whole and streamed, rides the same speculation."""
    from tests.api.test_responses import read_events

    _, speculative = servers
    before = drafted(speculative)
    body = {"model": "tiny", "input": PROMPTS[0], "max_output_tokens": 20, "temperature": 0}
    answers, streamed = whole_and_streamed(servers, "/v1/responses", body)
    streamed = [
        "".join(d["delta"] for n, d in read_events(raw) if n == "response.output_text.delta")
        for raw in streamed
    ]
    assert answers[0]["output_text"] == answers[1]["output_text"] and answers[0]["output_text"]
    assert answers[0]["usage"] == answers[1]["usage"]
    assert streamed[0] == streamed[1] == answers[0]["output_text"]
    assert drafted(speculative) > before


def test_greedy_messages_identical_with_a_draft(servers):
    """`/v1/messages`, whole and streamed, rides the same speculation."""
    from tests.api.test_messages_wire import anthropic_events

    _, speculative = servers
    before = drafted(speculative)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    body = {"model": "tiny", "max_tokens": 20, "temperature": 0, "messages": messages}
    answers, streamed = whole_and_streamed(servers, "/v1/messages", body)
    streamed = [
        "".join(d["delta"]["text"] for name, d in anthropic_events(raw) if name == "content_block_delta")
        for raw in streamed
    ]
    assert answers[0]["content"] == answers[1]["content"] and answers[0]["content"]
    assert answers[0]["usage"] == answers[1]["usage"]
    assert streamed[0] == streamed[1] == answers[0]["content"][0]["text"]
    assert drafted(speculative) > before
