"""The original Helix endpoints: /generate, /generate/batch, /generate/stream (GET and POST)."""

from __future__ import annotations

import json

from tests.api.conftest import sse_data

PROMPTS = ["def fibonacci(n):", "import sys\n", "class Point:"]


def test_generate(client):
    response = client.post("/generate", json={"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"text", "num_tokens", "finish_reason", "metrics"}
    assert 1 <= body["num_tokens"] <= 6 and isinstance(body["text"], str)
    metrics = body["metrics"]
    assert metrics["time_to_first_token"] > 0 and metrics["tokens_per_second"] > 0
    assert metrics["acceptance_rate"] is None
    openai = client.post(
        "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    ).json()
    assert body["text"] == openai["choices"][0]["text"]


def test_speculation_depth_is_accepted_and_capped(client):
    response = client.post("/generate", json={"prompt": "x", "max_tokens": 2, "speculation_depth": 4})
    assert response.status_code == 200 and response.json()["metrics"]["acceptance_rate"] is None


def test_generate_batch_runs_each_prompt(client):
    response = client.post("/generate/batch", json={"prompts": PROMPTS, "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3
    for prompt, result in zip(PROMPTS, results):
        alone = client.post("/generate", json={"prompt": prompt, "max_tokens": 5, "temperature": 0}).json()
        assert result["text"] == alone["text"] and result["num_tokens"] == alone["num_tokens"]


def _events(raw: bytes) -> list[dict]:
    return [json.loads(p) for p in sse_data(raw)]


def test_generate_stream_get_and_post(client):
    params = {"prompt": PROMPTS[1], "max_tokens": "6", "temperature": "0"}
    got = client.get("/generate/stream", params=params)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/event-stream")
    events = _events(got.content)
    *tokens, final = events
    assert all(e["is_final"] is False and isinstance(e["token"], str) for e in tokens)
    assert final["is_final"] is True and final["num_tokens"] >= 1
    assert set(final["metrics"]) == {"time_to_first_token", "tokens_per_second", "acceptance_rate"}
    posted = client.post("/generate/stream", json={"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0})
    assert posted.status_code == 200 and _events(posted.content)[-1]["is_final"] is True
    whole = client.post("/generate", json={"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}).json()
    assert "".join(e["token"] for e in tokens) == whole["text"]
    assert "".join(e["token"] for e in _events(posted.content)) == whole["text"]
