"""Prefix caching over HTTP: `usage.prompt_tokens_details.cached_tokens` (whole and streamed), the
`helix:prefix_cache_*` counters, `cache_salt`, and identical greedy text on a hit."""

from __future__ import annotations

from openai import OpenAI

from tests.api.conftest import MODEL_NAME, engine_idle, sse_json, wait_until
from tests.api.test_metrics import families, value

SYSTEM = "You are a careful assistant. " * 12  # well over a few 16-token blocks


def _cache_counters(client) -> tuple[float, float]:
    fams = families(client)
    return (
        value(fams, "helix:prefix_cache_queries", "helix:prefix_cache_queries_total"),
        value(fams, "helix:prefix_cache_hits", "helix:prefix_cache_hits_total"),
    )


def test_cached_tokens_in_usage_and_metrics(client, live_server):
    queries0, hits0 = _cache_counters(client)
    body = {"prompt": SYSTEM + "Question one?", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    first = client.post("/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = client.post("/v1/completions", json={**body, "prompt": SYSTEM + "Question two?"}).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 16 == 0 and cached < second["usage"]["prompt_tokens"]
    again = client.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached
    queries, hits = _cache_counters(client)
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in (first, second, again))
    assert queries - queries0 == prompt_tokens
    assert hits - hits0 == cached + again["usage"]["prompt_tokens_details"]["cached_tokens"]
    wait_until(lambda: engine_idle(live_server), what="engine idle")


def test_cached_tokens_in_the_streamed_usage_chunk_and_the_sdk(client, live_server):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    client.post("/v1/chat/completions", json=body)
    chunks = sse_json(client.post("/v1/chat/completions", json=body).content)
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    sdk = OpenAI(base_url=live_server.v1, api_key="unused", max_retries=0)
    reply = sdk.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens > 0


def test_cache_salt_keeps_tenants_apart(client):
    body = {"prompt": SYSTEM + "Salted?", "max_tokens": 3, "temperature": 0, "cache_salt": "tenant-a"}
    client.post("/v1/completions", json=body)
    other = client.post("/v1/completions", json={**body, "cache_salt": "tenant-b"}).json()
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    same = client.post("/v1/completions", json=body).json()
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    bad = client.post("/v1/completions", json={**body, "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
