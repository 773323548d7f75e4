"""One request's sequences count against the queue bounds before it is admitted (issue 15).

A completions request with many prompts and a large `n` used to be admitted whole whenever nothing
was waiting, flooding the queue for everyone else. Now a request whose sequences (prompts x n) could
never fit in the queue plus the running batch, or with more than `max_prompts_per_request` prompts,
is a 400 naming the parameter; one that would overflow the free queue room is refused as a whole
with 503 and Retry-After; nothing of a refused request is queued.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.api.conftest import assert_error, engine_idle, start_live_server, wait_until

MAX_QUEUED = 8
MAX_SEQS = 2
MAX_PROMPTS = 6
SHORT = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
HOG = {"prompt": "def long_function():\n", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(long_model_dir):
    live = start_live_server(
        long_model_dir,
        max_num_seqs=MAX_SEQS,
        max_queued_requests=MAX_QUEUED,
        max_prompts_per_request=MAX_PROMPTS,
    )
    yield live
    live.stop()


async def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    """`wait_until` that lets the event loop run (the clients' requests go out meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _completions(client: httpx.Client, prompts: int, n: int) -> httpx.Response:
    return client.post("/v1/completions", json={**SHORT, "prompt": ["def f(x):"] * prompts, "n": n})


def test_too_many_prompts_is_a_400_naming_prompt(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        error = assert_error(_completions(client, MAX_PROMPTS + 1, 1), 400, param="prompt")
        assert str(MAX_PROMPTS) in error["message"]
        assert engine_idle(server)  # nothing of it was queued
        assert _completions(client, MAX_PROMPTS, 1).status_code == 200


def test_sequences_that_could_never_fit_are_a_400_even_with_an_empty_queue(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # 3 prompts x n=4 = 12 sequences > 8 queued + 2 running: could never fit.
        error = assert_error(_completions(client, 3, 4), 400, param="n")
        assert "12" in error["message"]
        # Token-id prompts count the same way.
        many = client.post("/v1/completions", json={**SHORT, "prompt": [[5, 6]] * MAX_PROMPTS, "n": 2})
        assert_error(many, 400, param="n")
        assert engine_idle(server)
        # 5 x 2 = 10 = the queue plus the running batch: admitted when nothing waits.
        response = _completions(client, 5, 2)
        assert response.status_code == 200 and len(response.json()["choices"]) == 10


def test_a_request_past_the_free_queue_room_is_refused_whole_with_retry_after(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            contexts = []
            for _ in range(MAX_SEQS + 3):  # 2 run, 3 wait: 5 places left in the queue
                context = client.stream("POST", "/v1/completions", json={**HOG, "stream": True})
                contexts.append(context)
                await context.__aenter__()
            wait_until(lambda: server.engine.core.queued.num_sequences == 3, what="three queued")
            # 3 prompts x n=2 = 6 sequences > 5 free places: refused as a whole, nothing queued.
            refused = await client.post(
                "/v1/completions", json={**SHORT, "prompt": ["a", "b", "c"], "n": 2}
            )
            queued_after = server.engine.core.queued.num_sequences
            # 5 sequences fit exactly.
            admitted = asyncio.ensure_future(
                client.post("/v1/completions", json={**SHORT, "prompt": ["a"] * 5, "n": 1})
            )
            await _wait(lambda: server.engine.core.queued.num_sequences == 8, "five more queued")
            for context in contexts:
                await context.__aexit__(None, None, None)
            return refused, queued_after, await admitted

    refused, queued_after, admitted = asyncio.run(main())
    error = assert_error(refused, 503, code="queue_full")
    assert error["type"] == "service_unavailable_error"
    assert int(refused.headers["retry-after"]) >= 1
    assert queued_after == 3
    assert admitted.status_code == 200 and len(admitted.json()["choices"]) == 5
    wait_until(lambda: engine_idle(server), timeout=30, what="engine idle")
