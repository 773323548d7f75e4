"""Soak: a few hundred small requests from concurrent clients on a KV pool far too small for them,
prefix caching on, a third cancelled at random points (before the first token, mid-stream,
non-streaming), mixed with oversized and invalid requests. No valid request gets a 5xx, every
completed greedy output equals its solo output, and afterwards /metrics shows the engine idle."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.api.conftest import engine_idle, sse_data, start_live_server, wait_until
from tests.api.test_disconnect import scrape

NUM_REQUESTS = 240
NUM_CLIENTS = 12
SYSTEM = "You are a helpful assistant that answers in one short line. "


def _templates() -> list[tuple[str, dict]]:
    """(endpoint, body) of the valid greedy requests; prompts share prefixes of several lengths."""
    templates = []
    for i in range(8):
        prompt = SYSTEM * (1 + i % 3) + f"Question {i}: what is {i} + {i}?"
        templates.append(("/v1/completions", {"prompt": prompt, "max_tokens": 2 + i % 6}))
    for i in range(4):
        messages = [{"role": "system", "content": SYSTEM * 2}, {"role": "user", "content": f"Tell me {i}."}]
        templates.append(("/v1/chat/completions", {"messages": messages, "max_tokens": 3 + i}))
    for _, body in templates:
        body.update(temperature=0, ignore_eos=True)
    return templates


@pytest.fixture(scope="module")
def soak_server(tiny_model_dir):
    live = start_live_server(
        tiny_model_dir,
        block_size=8,
        num_kv_blocks=24,  # 192 tokens: a handful of requests at a time, preemption under load
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_queued_requests=None,
    )
    yield live
    live.stop()


def _text(endpoint: str, body: dict) -> str:
    if endpoint == "/v1/completions":
        return body["choices"][0]["text"]
    return body["choices"][0]["message"]["content"]


def _stream_text(endpoint: str, raw: bytes) -> str:
    payloads = sse_data(raw)
    assert payloads[-1] == "[DONE]", payloads[-3:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert not any("error" in c for c in chunks), chunks
    if endpoint == "/v1/completions":
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def _one(client: httpx.AsyncClient, rng: random.Random, templates, solo, stats) -> None:
    kind = rng.choices(
        ["plain", "stream", "cancel_first", "cancel_mid", "cancel_plain", "oversized", "invalid"],
        weights=[30, 25, 11, 11, 11, 6, 6],
    )[0]
    index = rng.randrange(len(templates))
    endpoint, body = templates[index]
    stats[kind] = stats.get(kind, 0) + 1
    if kind == "oversized":
        response = await client.post("/v1/completions", json={"prompt": "word " * 400, "max_tokens": 4})
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        return
    if kind == "invalid":
        response = await client.post(endpoint, json={**body, "temperature": 5})
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
        return
    if kind == "plain":
        response = await client.post(endpoint, json=body)
        assert response.status_code == 200, response.text
        assert _text(endpoint, response.json()) == solo[index]
        return
    if kind == "cancel_plain":
        try:
            response = await client.post(endpoint, json=body, timeout=httpx.Timeout(30, read=rng.uniform(0.001, 0.1)))
        except httpx.ReadTimeout:
            return
        assert response.status_code == 200 and _text(endpoint, response.json()) == solo[index]
        return
    async with client.stream("POST", endpoint, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        if kind == "cancel_first":
            return  # hang up right after the headers, before any token
        if kind == "cancel_mid":
            async for _ in response.aiter_lines():
                if rng.random() < 0.5:
                    return
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    if kind == "stream":
        assert _stream_text(endpoint, raw) == solo[index]


def test_soak_with_cancellations_and_bad_requests(soak_server):
    templates = _templates()
    with httpx.Client(base_url=soak_server.url, timeout=60) as client:
        solo = []
        for endpoint, body in templates:
            response = client.post(endpoint, json=body)
            assert response.status_code == 200, response.text
            solo.append(_text(endpoint, response.json()))
    preemptions_before = scrape(soak_server)["helix:num_preemptions_total"]

    async def main():
        rng = random.Random(1234)
        seeds = [rng.randrange(1 << 30) for _ in range(NUM_CLIENTS)]
        stats: dict[str, int] = {}
        limits = httpx.Limits(max_connections=NUM_CLIENTS * 2)
        async with httpx.AsyncClient(base_url=soak_server.url, timeout=60, limits=limits) as client:

            async def worker(seed: int) -> None:
                local = random.Random(seed)
                for _ in range(NUM_REQUESTS // NUM_CLIENTS):
                    await _one(client, local, templates, solo, stats)

            await asyncio.gather(*(worker(seed) for seed in seeds))
        return stats

    stats = asyncio.run(main())
    assert sum(stats.values()) == NUM_REQUESTS
    assert stats["cancel_first"] + stats["cancel_mid"] + stats["cancel_plain"] >= NUM_REQUESTS // 4

    def idle() -> bool:
        metrics = scrape(soak_server)
        return (
            metrics["helix:num_requests_running"] == 0
            and metrics["helix:num_requests_waiting"] == 0
            and metrics["helix:kv_cache_usage_perc"] == 0
            and metrics["helix:num_kv_blocks_free"] == metrics["helix:num_kv_blocks_total"]
        )

    wait_until(idle, timeout=30, what="metrics back to idle")
    metrics = scrape(soak_server)
    assert metrics["helix:num_preemptions_total"] > preemptions_before
    assert metrics["helix:prefix_cache_hits_total"] > 0
    assert metrics.get("helix:request_success_total{finished_reason=error}", 0) == 0
    wait_until(lambda: engine_idle(soak_server), timeout=30, what="no request left in flight")
    assert soak_server.engine.core.queued.num_sequences == 0
    soak_server.engine.core.scheduler.kv_cache_manager.check_invariants()
