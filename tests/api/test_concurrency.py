"""32 concurrent greedy streams all finish, each with exactly the text it gets alone."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.api.conftest import engine_idle, sse_data, wait_until

NUM_CLIENTS = 32


def _body(i: int) -> dict:
    return {
        "prompt": f"def function_{i}(x, y):\n    return",
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def _stream_text(client: httpx.AsyncClient, body: dict) -> tuple[str, str]:
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    payloads = sse_data(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def test_32_concurrent_streams_match_their_solo_runs(live_server):
    async def main():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 4)
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60, limits=limits) as client:
            alone = [await _stream_text(client, _body(i)) for i in range(NUM_CLIENTS)]
            together = await asyncio.gather(*(_stream_text(client, _body(i)) for i in range(NUM_CLIENTS)))
            return alone, together

    alone, together = asyncio.run(main())
    assert all(finish == "length" for _, finish in together)
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert len({text for text, _ in alone}) > 1
    wait_until(lambda: engine_idle(live_server), what="engine idle")
