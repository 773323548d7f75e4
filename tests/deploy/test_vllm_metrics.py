"""`--metrics-name-prefix`: vLLM's metric names (with `model_name`) on a live server's /metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helix_server.errors import ParameterError
from helix_server.settings import build_config
from tests.api.conftest import MODEL_NAME, start_live_server

# What vLLM's router, llm-d's endpoint picker, KServe and prometheus-adapter rules read.
VLLM_GAUGES = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"]
VLLM_COUNTERS = ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:spec_decode_num_accepted_tokens",
                 "vllm:spec_decode_num_draft_tokens"]
VLLM_HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
                   "vllm:request_queue_time_seconds"]


def scrape(url: str) -> dict:
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def sample(fams: dict, family: str, name: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, name, labels))


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir):
    live = start_live_server(tiny_model_dir, server={"metrics_name_prefix": "vllm"}, block_size=8)
    yield live
    live.stop()


def test_vllm_names_types_and_labels(vllm_server):
    fams = scrape(vllm_server.url)
    assert not any(name.startswith("helix:") for name in fams), "only the vllm: prefix was asked for"
    for name in VLLM_GAUGES:
        assert fams[name].type == "gauge"
        assert fams[name].samples[0].labels == {"model_name": MODEL_NAME}
    for name in VLLM_COUNTERS:
        assert fams[name].type == "counter"
    for name in VLLM_HISTOGRAMS:
        assert fams[name].type == "histogram"
    (info,) = fams["vllm:cache_config_info"].samples
    assert info.value == 1
    assert info.labels["block_size"] == "8"
    assert info.labels["num_gpu_blocks"] == str(vllm_server.engine.runtime.num_kv_blocks)
    assert info.labels["enable_prefix_caching"] == "True"


def test_vllm_metrics_move_with_requests(vllm_server):
    before = scrape(vllm_server.url)
    response = httpx.post(
        vllm_server.v1 + "/completions",
        json={"prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert response.status_code == 200
    after = scrape(vllm_server.url)
    labels = {"model_name": MODEL_NAME}

    def delta(family, name, **extra):
        return sample(after, family, name, **labels, **extra) - sample(before, family, name, **labels, **extra)

    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == response.json()["usage"]["prompt_tokens"]
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == 6
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    for name in VLLM_HISTOGRAMS:
        if name != "vllm:inter_token_latency_seconds":  # deltas may arrive merged under load
            assert delta(name, name + "_count") == 1, name
    assert sample(after, "vllm:num_requests_running", "vllm:num_requests_running", **labels) == 0


def test_both_prefixes_expose_the_same_values(tiny_model_dir):
    live = start_live_server(tiny_model_dir, server={"metrics_name_prefix": "both"})
    try:
        httpx.post(live.v1 + "/completions", json={"prompt": "x = 1", "max_tokens": 3}, timeout=60)
        fams = scrape(live.url)
        for name in ("generation_tokens", "prompt_tokens"):
            helix = sample(fams, "helix:" + name, f"helix:{name}_total")
            assert helix > 0
            assert sample(fams, "vllm:" + name, f"vllm:{name}_total", model_name=MODEL_NAME) == helix
        ttft = "time_to_first_token_seconds"
        assert sample(fams, "helix:" + ttft, f"helix:{ttft}_count") == 1
        assert sample(fams, "vllm:" + ttft, f"vllm:{ttft}_count", model_name=MODEL_NAME) == 1
    finally:
        live.stop()


def test_prefix_setting_is_checked():
    assert build_config(env={"HELIX_METRICS_NAME_PREFIX": "VLLM"}).server.metrics_name_prefix == "vllm"
    with pytest.raises(ParameterError) as error:
        build_config(env={"HELIX_METRICS_NAME_PREFIX": "prom"})
    assert error.value.param == "metrics_name_prefix"
