"""HEAD on the probe and listing routes (uptime checkers use it), and /metrics' Content-Type, on the wire."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

HEAD_PATHS = ["/health", "/ready", "/v1/models", "/metrics", "/version"]


def raw_request(url: str, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh socket; (status, headers, every byte after the head)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_head_answers_like_get_without_a_body(live_server, path):
    get_status, get_headers, get_body = raw_request(live_server.url, "GET", path)
    status, headers, body = raw_request(live_server.url, "HEAD", path)
    assert get_status == 200 and get_body
    assert status == get_status, (path, status, headers)
    assert headers["content-type"] == get_headers["content-type"]
    assert body == b""
    if path in ("/v1/models", "/version"):  # the same body every time: the same length
        assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))


def test_head_ready_is_503_while_draining(live_server):
    live_server.state.draining = True
    try:
        status, headers, body = raw_request(live_server.url, "HEAD", "/ready")
    finally:
        live_server.state.draining = False
    assert status == 503 and headers["retry-after"] and body == b""


def test_head_on_a_post_route_is_still_405(live_server):
    status, _, body = raw_request(live_server.url, "HEAD", "/v1/completions")
    assert status == 405 and body == b""


def test_metrics_content_type_has_exactly_one_charset(live_server):
    status, headers, _ = raw_request(live_server.url, "GET", "/metrics")
    assert status == 200
    content_type = headers["content-type"]
    assert content_type.startswith("text/plain; version=")
    assert content_type.lower().count("charset") == 1, content_type
