"""Speculative decoding on `/v1/responses`: greedy answers identical with and without a draft (whole
and streamed), and the drafted tokens counted on /metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import MODEL_NAME, start_live_server
from tests.api.test_metrics import families, value
from tests.api.test_responses import read_events

BODY = {"model": MODEL_NAME, "max_output_tokens": 20, "temperature": 0, "input": "def fibonacci(n):"}


@pytest.fixture(scope="module")
def servers(make_model_dir):
    target = make_model_dir("llama", num_hidden_layers=4)
    # The target as its own draft: every greedy draft is accepted.
    plain = start_live_server(target)
    speculative = start_live_server(target, draft_model=str(target), num_speculative_tokens=3)
    yield plain, speculative
    plain.stop()
    speculative.stop()


def drafted(server) -> float:
    fams = families(httpx.Client(base_url=server.url, timeout=30))
    return value(fams, "helix:spec_decode_num_draft_tokens", "helix:spec_decode_num_draft_tokens_total")


def test_greedy_responses_identical_with_a_draft(servers):
    _, speculative = servers
    before = drafted(speculative)
    answers, streamed = [], []
    for server in servers:
        whole = httpx.post(server.v1 + "/responses", json=BODY, timeout=60)
        assert whole.status_code == 200, whole.text
        answers.append(whole.json())
        raw = httpx.post(server.v1 + "/responses", json={**BODY, "stream": True}, timeout=60)
        events = read_events(raw.content)
        streamed.append("".join(d["delta"] for name, d in events if name == "response.output_text.delta"))
    assert answers[0]["output_text"] == answers[1]["output_text"] and answers[0]["output_text"]
    assert answers[0]["usage"] == answers[1]["usage"]
    assert streamed[0] == streamed[1] == answers[0]["output_text"]
    assert drafted(speculative) > before
