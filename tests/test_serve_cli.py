"""`helix-server serve` in a subprocess: a port in use fails fast, log names read sensibly, and running
out of file descriptors neither floods the log nor stops the service for good."""

from __future__ import annotations

import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def _command(model_dir, *args: str) -> list[str]:
    return [sys.executable, "-m", "helix_server", "serve", "--model", str(model_dir), "--dtype", "float32",
            "--num-kv-blocks", "64", "--no-cpu-kernels", *args]


class Served:
    """A `helix-server serve` process; its stderr collected by a thread."""

    def __init__(self, command: list[str], preexec_fn=None) -> None:
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log)
            if match:
                return match
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged; log:\n{self.log}")

    def port(self) -> int:
        return int(self.wait_for(_LISTENING.pattern).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=5)
        return code


def test_a_port_in_use_fails_before_loading_the_model(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        result = subprocess.run(_command(tiny_model_dir, "--port", str(port)), capture_output=True, text=True,
                                timeout=120)
        elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on http://127.0.0.1:{port}" in result.stderr, result.stderr
    assert "in use" in result.stderr, result.stderr
    # Nothing was loaded, and nothing claimed to listen.
    assert "listening on" not in result.stderr and "serving model" not in result.stderr, result.stderr
    print(f"port-in-use exit after {elapsed:.1f}s")


def test_serve_logs_read_sensibly_and_report_the_bound_port(tiny_model_dir):
    served = Served(_command(tiny_model_dir, "--port", "0"))
    try:
        port = served.port()
        served.wait_for("Application startup complete")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        code = served.stop()
    assert code == 0, served.log
    assert " uvicorn.error:" not in served.log, served.log
    assert re.search(r"INFO uvicorn: Application startup complete", served.log), served.log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE and EMFILE as on Linux")
def test_running_out_of_file_descriptors_is_logged_briefly_and_service_resumes(tiny_model_dir):
    """The systemd failure: far more silent connections than open files. Accept errors are one line
    at a time, not a traceback each second, and once the silent connections are timed out the server
    answers again."""
    limit = 256

    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    served = Served(_command(tiny_model_dir, "--port", "0", "--header-timeout", "2"), preexec_fn=low_file_limit)
    silent: list[socket.socket] = []
    try:
        port = served.port()
        served.wait_for("Application startup complete")
        for _ in range(limit + 100):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(6)  # accept fails for a while (each retry a second apart), then timeouts free descriptors
        response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=20)
        assert response.status_code == 200, response.text
    finally:
        for sock in silent:
            sock.close()
        code = served.stop()
    log = served.log
    assert code == 0, log[-3000:]
    assert "Too many open files" in log, log[-3000:]  # the test did exhaust the descriptors
    assert "Traceback" not in log, log[-3000:]
    assert log.count("Too many open files") <= 2, log[-3000:]
    assert len(log) < 20_000, len(log)
