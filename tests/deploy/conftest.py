"""Deploy tests: the `deploy` ones start real Prometheus and router processes (make test-deploy).

They run when HELIX_DEPLOY_TESTS=1 (set by `make test-deploy`, which .ci/run runs); there a missing
tool is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HELIX_DEPLOY_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="deploy test: run with `make test-deploy` (HELIX_DEPLOY_TESTS=1)")
    for item in items:
        if item.get_closest_marker("deploy"):
            item.add_marker(skip)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(name: str) -> str:
    """The path of `name`, or a failure saying how to install it."""
    path = shutil.which(name)
    assert path, f"{name} not found: apt-get install -y prometheus / pip install the router (see .ci/run)"
    return path
