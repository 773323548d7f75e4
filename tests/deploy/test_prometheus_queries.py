"""Every PromQL expression in the Grafana dashboard and the alert rules, run by a real Prometheus
(Debian's `prometheus`) scraping a real helix server under load, returns data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api.conftest import start_live_server, wait_until
from tests.deploy.conftest import free_port, require_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPARISON = re.compile(r"\s(>|<|==|>=|<=|!=)\s*[0-9.]+\s*$")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/helix.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_dashboard_and_alerts_cover_the_issue():
    titles = " ".join(p["title"].lower() for p in json.loads((DEPLOY / "grafana/dashboards/helix.json").read_text())["panels"])
    for what in ("request rate", "time to first token", "inter-token", "tokens/s", "queue", "kv cache",
                 "prefix cache", "acceptance", "preemptions"):
        assert what in titles, what
    names = {r["alert"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {"HelixEngineDead", "HelixQueueSaturated", "HelixKVCacheExhausted", "HelixTTFTHigh"} <= names


def query(prom: str, expr: str) -> list[dict]:
    response = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


@pytest.mark.deploy
def test_every_expression_returns_data(tiny_model_dir, tmp_path):
    prometheus = require_binary("prometheus")
    live = start_live_server(
        tiny_model_dir, server={"metrics_name_prefix": "both"},
        speculative_method="ngram", num_speculative_tokens=3,
    )
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "alerts.yml")],
        "scrape_configs": [{"job_name": "helix_server", "static_configs": [{"targets": [live.url[len("http://"):]]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    prom = f"http://127.0.0.1:{port}"
    stop = threading.Event()

    def load() -> None:
        prompt = "def add(a, b):\n    return a + b\n" * 6
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(live.v1 + "/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})

    workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    try:
        wait_until(lambda: _up(prom), timeout=30, what="prometheus up")
        for worker in workers:
            worker.start()
        time.sleep(12)
        exprs = dashboard_exprs() + alert_exprs()
        assert len(exprs) >= 15
        for expr in exprs:
            query(prom, expr)  # the whole expression (an alert's may match nothing) parses and runs
            measured = COMPARISON.sub("", expr)
            values = finite_values(query(prom, measured))
            assert values, f"no data for {measured!r}"
        assert finite_values(query(prom, "sum(rate(helix:spec_decode_num_draft_tokens_total[1m]))"))[0] > 0
        assert finite_values(query(prom, 'up{job="helix_server"}')) == [1.0]
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        proc.terminate()
        proc.wait(timeout=30)
        live.stop()


def _up(prom: str) -> bool:
    try:
        return httpx.get(prom + "/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
