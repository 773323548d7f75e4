"""Graceful shutdown of a real `python -m helix_server serve` process on SIGTERM.

While draining, new requests get 503 (the socket stays open), a short in-flight stream completes, a
long one is aborted at the shutdown timeout with a finish_reason "abort" chunk and [DONE], and the
process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.api.conftest import assert_error, sse_data, wait_until

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_stream(url: str, body: dict, first_event: threading.Event, out: dict) -> None:
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as response:
        raw = b""
        for chunk in response.iter_raw():
            raw += chunk
            if b"\n\n" in raw:
                first_event.set()
        out["raw"] = raw


def test_sigterm_drains_then_exits_zero(long_model_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "helix_server",
            "serve",
            "--model",
            str(long_model_dir),
            "--port",
            str(port),
            "--shutdown-timeout",
            "2",
            "--dtype",
            "float32",
            "--num-kv-blocks",
            "512",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _get(url + "/ready") == 200, timeout=90, what="server ready")
        streams = {}
        threads = []
        # The long stream (2 x 4000 tokens) can't finish within the 2 s shutdown timeout.
        for name, max_tokens, n in (("short", 40, 1), ("long", 4000, 2)):
            started, out = threading.Event(), {}
            body = {
                "prompt": f"{name} = [",
                "n": n,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            thread = threading.Thread(target=_read_stream, args=(url + "/v1/completions", body, started, out))
            thread.start()
            assert started.wait(30), f"{name} stream did not start"
            streams[name], threads = out, [*threads, thread]

        process.send_signal(signal.SIGTERM)
        wait_until(lambda: _get(url + "/ready") == 503, timeout=10, what="/ready 503")
        refused = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        error = assert_error(refused, 503, code="server_draining")
        assert refused.headers["retry-after"] and error["type"] == "service_unavailable_error"

        for thread in threads:
            thread.join(60)
        finishes = {}
        for name, out in streams.items():
            payloads = sse_data(out["raw"])
            assert payloads[-1] == "[DONE]", name
            finishes[name] = json.loads(payloads[-2])["choices"][0]["finish_reason"]
        assert finishes == {"short": "length", "long": "abort"}
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = process.stdout.read().decode()
    assert "KV pool" in log and f"http://127.0.0.1:{port}" in log and "draining" in log


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None
