"""The first run: helix's CPU kernels are compiled with a log line before and after, in parallel, ahead
of time (`helix-server build-kernels`) or in the background while `serve` loads the weights.

A stand-in compiler (`$CXX`, a script that sleeps and writes empty outputs) keeps these tests fast and
records when each of its runs started and ended; the library it "builds" cannot be loaded, so `serve`
falls back to torch's kernels, as it does wherever a build fails.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time

import httpx
import pytest

from helix_server.layers.cpu_kernels import SOURCES, cpu_kernels_supported

pytestmark = pytest.mark.skipif(
    not cpu_kernels_supported(), reason="helix's CPU kernels are never built here (no x86-64 Linux + AVX-512F)"
)

COMPILE_S = 2.0
FAKE_COMPILER = f"""#!/bin/sh
# A stand-in C++ compiler: record the run, take {COMPILE_S} s, write the -o file.
echo "start $(date +%s.%N) $*" >> "$FAKE_CXX_LOG"
sleep {COMPILE_S}
out=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "-o" ]; then out="$arg"; fi
  prev="$arg"
done
: > "$out"
echo "end $(date +%s.%N)" >> "$FAKE_CXX_LOG"
"""


@pytest.fixture
def fake_env(tmp_path):
    compiler = tmp_path / "fake-c++"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    return {
        **os.environ,
        "CXX": str(compiler),
        "FAKE_CXX_LOG": str(tmp_path / "cxx.log"),
        "HELIX_CACHE_DIR": str(tmp_path / "cache"),
    }


def compiler_runs(env) -> list[tuple[float, float, str]]:
    """(start, end, arguments) of each run of the stand-in compiler."""
    starts, ends = [], []
    with open(env["FAKE_CXX_LOG"]) as log:
        for line in log:
            kind, stamp, *args = line.split(" ", 2)
            if kind == "start":
                starts.append((float(stamp), args[0] if args else ""))
            else:
                ends.append(float(stamp))
    return [(start, end, args) for (start, args), end in zip(starts, ends)]


def build_kernels(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helix_server", "build-kernels"], env=env, capture_output=True,
                          text=True, timeout=300)


def test_build_kernels_says_what_it_does_compiles_in_parallel_and_caches(fake_env):
    result = build_kernels(fake_env)
    assert result.returncode == 0, result.stderr
    assert "compiling helix's CPU kernels (first run only, ~" in result.stderr, result.stderr
    took = re.search(r"compiled helix's CPU kernels in (\d+\.\d) s", result.stderr)
    assert took, result.stderr
    runs = compiler_runs(fake_env)
    compiles = [r for r in runs if " -c " in r[2]]
    links = [r for r in runs if "-shared" in r[2] and " -c " not in r[2]]
    assert len(compiles) == len(SOURCES) and len(links) == 1, runs
    if (os.cpu_count() or 1) >= 2:  # at least two compiler processes ran at once
        assert max(start for start, _, _ in compiles[:2]) < min(end for _, end, _ in compiles[:2]), compiles
        assert float(took.group(1)) < len(SOURCES) * COMPILE_S + COMPILE_S
    library = result.stdout.strip().rpartition(" ")[2]
    assert os.path.exists(library), result.stdout
    # Cached: the second run compiles nothing.
    again = build_kernels(fake_env)
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stderr
    assert len(compiler_runs(fake_env)) == len(runs)


def test_serve_compiles_the_kernels_while_the_weights_load(fake_env, tiny_model_dir):
    command = [sys.executable, "-m", "helix_server", "serve", "--model", str(tiny_model_dir), "--dtype", "float32",
               "--num-kv-blocks", "64", "--port", "0"]
    proc = subprocess.Popen(command, env=fake_env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log = ""
    try:
        deadline = time.monotonic() + 180
        while "Application startup complete" not in log:
            assert time.monotonic() < deadline and proc.poll() is None, log
            log += proc.stderr.readline()
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", log).group(1))
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        log += proc.communicate(timeout=60)[1]
    compiling = log.index("compiling helix's CPU kernels (first run only")
    assert compiling < log.index("Loading weights"), log  # started before the first weight was read
    assert "compiled helix's CPU kernels in" in log, log
    # The stand-in's library does not load: torch's kernels serve, with one warning.
    assert log.count("helix CPU kernels unavailable") == 1, log
