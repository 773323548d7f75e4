"""A client that hangs up, streaming or not, aborts its request: the engine stops and frees its KV."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import wait_until

LONG = {"prompt": "def long_function():\n", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}


def scrape(live) -> dict[str, float]:
    """Sample name (with labels) -> value from /metrics."""
    text = httpx.get(live.url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def idle_on_metrics(live) -> bool:
    metrics = scrape(live)
    return (
        metrics["helix:num_requests_running"] == 0
        and metrics["helix:kv_cache_usage_perc"] == 0
        and metrics["helix:num_kv_blocks_free"] == metrics["helix:num_kv_blocks_total"]
    )


def aborted(live) -> float:
    return scrape(live)["helix:request_success_total{finished_reason=abort}"]


def test_streaming_client_disconnect_aborts(server):
    before = aborted(server)
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response,
    ):
        lines = response.iter_lines()  # keep a reference: a collected iterator closes the connection
        assert next(lines).startswith("data: ")
        wait_until(lambda: scrape(server)["helix:num_requests_running"] == 1, what="request running")
        # Leaving the block closes the connection mid-stream.
    wait_until(lambda: idle_on_metrics(server), timeout=10, what="idle after disconnect")
    assert aborted(server) == before + 1


def test_non_streaming_client_disconnect_aborts(server):
    before = aborted(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: idle_on_metrics(server), timeout=10, what="idle after disconnect")
    assert aborted(server) == before + 1


def test_chat_stream_disconnect_aborts(server):
    before = aborted(server)
    body = {
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert next(response.iter_lines()).startswith("data: ")
    wait_until(lambda: idle_on_metrics(server), timeout=10, what="idle after disconnect")
    assert aborted(server) == before + 1
