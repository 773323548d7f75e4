"""Silent, slow and vanishing clients, on a real uvicorn configured as `helix-server serve` configures it.

A silent connection is closed within `header_timeout`, a body that stops half-way gets a 408 within
`body_timeout`, an idle kept-alive connection is closed after `keep_alive_timeout`, and the server
answers other clients meanwhile. A client that hangs up before its body is complete is a quiet
disconnect: no ERROR, no traceback.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from helix_server.api.app import create_app
from helix_server.api.server import uvicorn_config
from helix_server.config import HelixConfig, ServerConfig
from helix_server.engine.async_engine import AsyncEngine
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from tests.api.conftest import ENGINE_DEFAULTS, MODEL_NAME, engine_idle, wait_until

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 1.0
# How much later than its timeout a connection may be closed (a busy 2-core machine).
SLACK = 3.0


class TimedServer:
    """The app under `uvicorn_config` (our protocol and timeouts) in a thread, on a free port."""

    def __init__(self, model_dir) -> None:
        engine_config = engine_config_from_settings(str(model_dir), **ENGINE_DEFAULTS)
        server_config = ServerConfig(
            header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, keep_alive_timeout=KEEP_ALIVE
        )
        self.engine = AsyncEngine(EngineCore(engine_config))
        app = create_app(self.engine, HelixConfig(engine=engine_config, server=server_config))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, server_config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(self._ready, timeout=60, what="server ready")

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=HEADER_TIMEOUT + SLACK + 5)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def timed(tiny_model_dir):
    server = TimedServer(tiny_model_dir)
    yield server
    server.stop()


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - start


def still_serving(server: TimedServer) -> None:
    response = httpx.post(
        server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}, timeout=30
    )
    assert response.status_code == 200, response.text


def test_a_silent_connection_is_closed_within_the_header_timeout(timed):
    with timed.connect() as sock:
        data, elapsed = read_until_closed(sock)
    assert data == b"" and elapsed < HEADER_TIMEOUT + SLACK, elapsed


def test_a_partial_request_head_gets_408_and_is_closed(timed):
    with timed.connect() as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        data, elapsed = read_until_closed(sock)
    assert elapsed < HEADER_TIMEOUT + SLACK, elapsed
    assert data.startswith(b"HTTP/1.1 408 "), data
    envelope = json.loads(data.partition(b"\r\n\r\n")[2])
    assert envelope["error"]["code"] == "request_timeout"


def test_a_head_sent_byte_by_byte_cannot_outlast_the_header_timeout(timed):
    """Slowloris: a byte every 50 ms does not keep the connection open; the head has a deadline."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1000
    start = time.monotonic()
    answer = None
    with timed.connect() as sock:
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            if select.select([sock], [], [], 0.05)[0]:
                answer, _ = read_until_closed(sock)
                break
    elapsed = time.monotonic() - start
    assert answer is not None, "the server kept reading the head for the whole 50 s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
    assert elapsed < HEADER_TIMEOUT + SLACK, elapsed


def test_a_body_that_stops_midway_gets_408_and_others_are_served(timed):
    body = json.dumps({"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 2}).encode()
    with timed.connect() as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        still_serving(timed)  # meanwhile
        data, elapsed = read_until_closed(sock)
    assert elapsed < BODY_TIMEOUT + SLACK, elapsed
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    still_serving(timed)
    wait_until(lambda: engine_idle(timed), what="engine idle")


def test_an_idle_kept_alive_connection_is_closed(timed):
    with timed.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data, elapsed = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert elapsed < KEEP_ALIVE + SLACK, elapsed


def test_a_keep_alive_connection_serves_a_second_request(timed):
    with timed.connect() as sock:
        for _ in range(2):
            sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"}" not in data:
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 "), data


def test_connections_send_without_nagle_delay(timed):
    """Every accepted connection has TCP_NODELAY: with Nagle's algorithm on, a response body written
    after its head waited for the client's delayed ACK, 40 ms on each kept-alive request after the
    first. (The fixture binds its socket with protocol 0, as `serve` does, for which asyncio leaves
    Nagle on.)"""
    with timed.connect() as sock:
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"}" not in data:
            data += sock.recv(65536)
        connections = list(timed.server.server_state.connections)
        assert connections
        for protocol in connections:
            server_side = protocol.transport.get_extra_info("socket")
            assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_hang_up_before_the_body_is_complete_is_quiet(timed, caplog):
    caplog.set_level(logging.DEBUG)
    with timed.connect() as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\": "
        )
        time.sleep(0.3)  # the handler is waiting for the rest of the body
    time.sleep(0.5)
    still_serving(timed)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]
    wait_until(lambda: engine_idle(timed), what="engine idle")
