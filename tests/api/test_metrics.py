"""GET /metrics: Prometheus text with vLLM's names under `helix:`, moving as requests run."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = [
    "helix:num_requests_running",
    "helix:num_requests_waiting",
    "helix:kv_cache_usage_perc",
    "helix:num_kv_blocks_total",
    "helix:num_kv_blocks_free",
]
COUNTERS = [
    "helix:prompt_tokens",
    "helix:generation_tokens",
    "helix:request_success",
    "helix:num_preemptions",
    "helix:prefix_cache_queries",
    "helix:prefix_cache_hits",
    "helix:num_requests_rejected",
]
HISTOGRAMS = [
    "helix:time_to_first_token_seconds",
    "helix:inter_token_latency_seconds",
    "helix:e2e_request_latency_seconds",
    "helix:request_queue_time_seconds",
]


def families(client: httpx.Client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(fams, family: str, sample: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, sample, labels))


def test_metric_names_and_types(client, live_server):
    fams = families(client)
    for name in GAUGES:
        assert fams[name].type == "gauge"
    for name in COUNTERS:
        assert fams[name].type == "counter"
    for name in HISTOGRAMS:
        assert fams[name].type == "histogram"
    assert (
        value(fams, "helix:num_kv_blocks_total", "helix:num_kv_blocks_total")
        == live_server.engine.runtime.num_kv_blocks
    )
    assert not any(name.startswith(("python_", "process_")) for name in fams), "the app has its own registry"


def test_metrics_move_with_requests(client):
    before = families(client)
    response = client.post(
        "/v1/completions", json={"prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    )
    usage = response.json()["usage"]
    after = families(client)

    def delta(family, sample, **labels):
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert delta("helix:prompt_tokens", "helix:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("helix:generation_tokens", "helix:generation_tokens_total") == 5
    assert delta("helix:request_success", "helix:request_success_total", finished_reason="length") == 1
    for name in (
        "helix:time_to_first_token_seconds",
        "helix:e2e_request_latency_seconds",
        "helix:request_queue_time_seconds",
    ):
        assert delta(name, name + "_count") == 1
    assert delta("helix:inter_token_latency_seconds", "helix:inter_token_latency_seconds_count") >= 1
    assert value(after, "helix:num_requests_running", "helix:num_requests_running") == 0
    assert value(after, "helix:kv_cache_usage_perc", "helix:kv_cache_usage_perc") == 0


def test_two_apps_have_separate_registries(live_server, tiny_model_dir):
    from tests.api.conftest import start_live_server

    other = start_live_server(tiny_model_dir)
    try:
        httpx.post(other.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
        mine = live_server.state.metrics.e2e_request_latency
        theirs = other.state.metrics.e2e_request_latency
        assert mine is not theirs
        assert live_server.state.metrics.registry is not other.state.metrics.registry
    finally:
        other.stop()
