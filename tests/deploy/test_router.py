"""Two helix replicas (separate processes) behind a real router from PyPI (`vllm-router`, vLLM's Rust
router), on loopback only: spread, prefix-aware routing, and failover when a replica dies.

The router re-serializes every request with SGLang's extra fields (`no_stop_trim`,
`return_hidden_states`, at their defaults), which helix accepts at those values.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.api.conftest import wait_until
from tests.deploy.conftest import free_port

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


def start_replica(model_dir, log_dir) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "helix_server", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--num-kv-blocks", "512", "--served-model-name", "tiny",
            "--metrics-name-prefix", "vllm"]
    log = open(log_dir / f"replica-{port}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"})
    return proc, f"http://127.0.0.1:{port}"


def start_router(workers: list[str], policy: str, log_dir) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--worker-urls", *workers, "--policy", policy, "--health-check-interval-secs", "1",
            "--health-failure-threshold", "1", "--health-check-endpoint", "/health", "--log-level", "warning"]
    log = open(log_dir / f"router-{policy}-{port}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def ready(url: str, path: str) -> bool:
    try:
        return httpx.get(url + path, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def successes(url: str) -> float:
    """Finished requests a replica counted (vLLM's request_success_total)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


def complete(router: str, prompt: str, client: httpx.Client) -> httpx.Response:
    return client.post(router + "/v1/completions",
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0})


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("router-logs")
    procs = [start_replica(tiny_model_dir, log_dir) for _ in range(2)]
    for proc, url in procs:
        wait_until(lambda url=url: ready(url, "/ready"), timeout=120, what=f"replica {url} ready")
    yield procs, log_dir
    for proc, _ in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def with_router(replicas, policy: str):
    procs, log_dir = replicas
    router, url = start_router([u for _, u in procs], policy, log_dir)
    try:
        wait_until(lambda: ready(url, "/health"), timeout=60, what="router up")
        with httpx.Client(timeout=30) as client:
            response = complete(url, "warm up", client)
        assert response.status_code == 200, response.text
    except BaseException:
        stop(router)
        raise
    return router, url


def stop(router: subprocess.Popen) -> None:
    router.terminate()
    router.wait(timeout=30)


def shared_prefix_workload(tag: str) -> list[str]:
    """4 groups of 4 prompts; each group shares a long prefix (many KV blocks), sent group by group."""
    prompts = []
    for group in range(4):
        prefix = f"# {tag} module {group}\n" + "".join(
            f"def helper_{tag}_{group}_{i}(value):\n    return value + {i * (group + 3)}\n" for i in range(6)
        )
        prompts += [prefix + f"print(helper_{tag}_{group}_{j}({j}))\n" for j in range(4)]
    return prompts


def cached_tokens(router: str, prompts: list[str]) -> int:
    total = 0
    with httpx.Client(timeout=60) as client:
        for prompt in prompts:
            response = complete(router, prompt, client)
            assert response.status_code == 200, response.text
            total += response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return total


def test_round_robin_spreads_and_cache_aware_finds_prefixes(replicas):
    procs, _ = replicas
    urls = [u for _, u in procs]
    router, url = with_router(replicas, "round_robin")
    try:
        before = [successes(u) for u in urls]
        with httpx.Client(timeout=60) as client:
            for i in range(8):
                assert complete(url, f"x = {i}", client).status_code == 200
        spread = [successes(u) - b for u, b in zip(urls, before)]
        assert spread == [4, 4], spread
        round_robin = cached_tokens(url, shared_prefix_workload("rr"))
    finally:
        stop(router)
    router, url = with_router(replicas, "cache_aware")
    try:
        cache_aware = cached_tokens(url, shared_prefix_workload("ca"))
    finally:
        stop(router)
    print(f"cached_tokens: round_robin={round_robin} cache_aware={cache_aware}")
    assert cache_aware > round_robin * 1.3, (round_robin, cache_aware)


def test_killing_a_replica_keeps_the_other_serving(replicas):
    procs, _ = replicas
    router, url = with_router(replicas, "round_robin")
    statuses: list[tuple[float, int]] = []
    stop_load = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop_load.is_set():
                try:
                    status = complete(url, f"y = {i}", client).status_code
                except httpx.TransportError:
                    status = 0
                statuses.append((time.monotonic(), status))
                i += 1

    worker = threading.Thread(target=load, daemon=True)
    try:
        worker.start()
        wait_until(lambda: len(statuses) >= 10, timeout=60, what="load running")
        (victim, _), (survivor, survivor_url) = procs
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at = time.monotonic()
        before = successes(survivor_url)
        time.sleep(8)
        stop_load.set()
        worker.join(timeout=60)
        settled = [status for at, status in statuses if at > killed_at + 4]
        assert len(settled) >= 5 and all(status == 200 for status in settled), settled
        assert successes(survivor_url) - before >= len(settled)
        assert survivor.poll() is None
    finally:
        stop_load.set()
        stop(router)
