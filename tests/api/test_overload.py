"""Overload over HTTP: a burst larger than the waiting queue gets 503 with Retry-After (streams too,
before any byte), the admitted requests complete; a request queued longer than `max_queue_wait` gets
503; one running longer than `request_timeout` ends with what it has (finish_reason "length")."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.api.conftest import assert_error, engine_idle, start_live_server, wait_until
from tests.api.test_metrics import families, value

HOG = {"prompt": "def long_function():\n", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
SHORT = {"prompt": "def f(x):", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
MAX_QUEUED = 3


@pytest.fixture(scope="module")
def bounded_server(long_model_dir):
    live = start_live_server(long_model_dir, max_num_seqs=2, max_queued_requests=MAX_QUEUED)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def timed_server(long_model_dir):
    live = start_live_server(long_model_dir, max_num_seqs=1, max_queue_wait=0.5, request_timeout=2.0)
    yield live
    live.stop()


def _rejected(client, reason: str) -> float:
    fams = families(client)
    return value(fams, "helix:num_requests_rejected", "helix:num_requests_rejected_total", reason=reason)


async def _hog(client: httpx.AsyncClient):
    """A streaming request that holds a seat until its context manager is left."""
    context = client.stream("POST", "/v1/completions", json={**HOG, "stream": True})
    response = await context.__aenter__()
    lines = response.aiter_lines()
    assert (await lines.__anext__()).startswith("data: ")
    return context, lines


def test_a_burst_past_the_queue_gets_503_and_the_admitted_requests_complete(bounded_server):
    sync = httpx.Client(base_url=bounded_server.url, timeout=30)
    rejected_before = _rejected(sync, "queue_full")

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=bounded_server.url, timeout=60, limits=limits) as client:
            hogs = [await _hog(client), await _hog(client)]  # both seats taken: the rest must queue
            wait_until(lambda: bounded_server.engine.stats().num_requests_running == 2, what="hogs running")
            burst = [
                asyncio.ensure_future(client.post("/v1/completions", json={**SHORT, "stream": i % 2 == 1}))
                for i in range(12)
            ]
            # The refusals come back at once; the admitted requests wait for a seat.
            deadline = time.monotonic() + 30
            while sum(t.done() for t in burst) < 12 - MAX_QUEUED:
                assert time.monotonic() < deadline, "rejections did not arrive"
                await asyncio.sleep(0.01)
            # n counts as n: with the queue full, a request of n = 2 is refused as a whole.
            n2 = await client.post("/v1/completions", json={**SHORT, "n": 2})
            for context, _ in hogs:  # free the seats: the queued requests run
                await context.__aexit__(None, None, None)
            return [await t for t in burst], n2

    responses, n2 = asyncio.run(main())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == MAX_QUEUED and len(refused) == 12 - MAX_QUEUED
    for response in refused:
        # Streams too: a plain JSON error, no event-stream byte before it.
        error = assert_error(response, 503, code="queue_full")
        assert error["type"] == "service_unavailable_error"
        assert int(response.headers["retry-after"]) >= 1
    for response in ok:
        assert "text/event-stream" in response.headers["content-type"] or response.json()["choices"][0]["text"]
        if "text/event-stream" in response.headers["content-type"]:
            assert response.text.rstrip().endswith("data: [DONE]")
    assert_error(n2, 503, code="queue_full")
    assert _rejected(sync, "queue_full") - rejected_before == len(refused) + 1
    wait_until(lambda: engine_idle(bounded_server), timeout=30, what="engine idle")


def test_a_request_queued_too_long_gets_503_streaming_or_not(timed_server):
    async def main():
        async with httpx.AsyncClient(base_url=timed_server.url, timeout=60) as client:
            context, _ = await _hog(client)
            started = time.monotonic()
            plain, streamed = await asyncio.gather(
                client.post("/v1/completions", json=SHORT),
                client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}),
            )
            waited = time.monotonic() - started
            await context.__aexit__(None, None, None)
            return plain, streamed, waited

    plain, streamed, waited = asyncio.run(main())
    for response in (plain, streamed):
        assert_error(response, 503, code="queue_timeout")
        assert "retry-after" in response.headers
    assert 0.4 < waited < 10
    wait_until(lambda: engine_idle(timed_server), timeout=30, what="engine idle")


def test_request_timeout_ends_a_request_with_length(timed_server):
    started = time.monotonic()
    response = httpx.post(timed_server.url + "/v1/completions", json=HOG, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < HOG["max_tokens"]
    assert 1.5 < elapsed < 20
    wait_until(lambda: engine_idle(timed_server), timeout=30, what="engine idle")
