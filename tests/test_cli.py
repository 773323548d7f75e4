"""The `helix-server` command line (through `python -m helix_server`, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys

from helix_server.settings import SETTINGS


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "helix_server", *args], capture_output=True, text=True, timeout=timeout
    )


def test_serve_help_documents_every_setting():
    result = _run("serve", "--help")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.flag in result.stdout, setting.flag
        assert setting.env in result.stdout, setting.env


def test_generate_completes_a_prompt(tiny_model_dir):
    result = _run("generate", "--model", str(tiny_model_dir), "--prompt", "def f(x):", "--max-tokens", "5", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(x):") and len(result.stdout) > len("def f(x):\n")


def test_a_bad_setting_is_a_clear_error_and_exit_code_2():
    result = _run("serve", "--port", "80x")
    assert result.returncode == 2 and "--port" in result.stderr
    result = _run("serve", "--speculative-method", "medusa")
    assert result.returncode == 2 and "medusa" in result.stderr


def test_serve_reports_a_model_that_cannot_load(tmp_path):
    result = _run("serve", "--model", str(tmp_path / "missing"), "--port", "0")
    assert result.returncode == 1
    assert "could not load the model" in result.stderr
