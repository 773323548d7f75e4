"""glibc's allocator policy: freed buffers are kept between steps, and given back once after loading."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc policy (Linux)")

# In a fresh process (the policy is process-wide): 300 MB allocated and freed under the kept-buffers
# policy stays resident; releasing gives it back.
SCRIPT = textwrap.dedent(
    """
    import torch
    from helix_server.platform.allocator import keep_freed_memory, release_freed_memory

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    assert keep_freed_memory()
    buffer = torch.ones(300 * 2**20, dtype=torch.uint8)
    del buffer
    kept = rss_mb()
    assert release_freed_memory()
    print(kept, rss_mb())
    """
)


def test_memory_freed_while_loading_is_kept_until_released():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    kept, released = map(float, out.split())
    assert kept - released > 250, (kept, released)


def test_releasing_works_with_no_file_descriptor_left():
    """The engine loop returns memory when it goes idle, perhaps while the server is out of file
    descriptors (a flood of connections): the release must not need one (no `ldconfig` subprocess)."""
    script = textwrap.dedent(
        """
        import resource, socket
        from helix_server.platform.allocator import release_freed_memory

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        print(release_freed_memory())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["True"], out.stderr[-2000:]


def test_releasing_frees_the_buffers_onemkl_keeps():
    """SDPA over a prompt chunk multiplies through oneMKL, whose allocator keeps its packing buffers
    for the next call; releasing frees them too (`mkl_serv_mem_stat`: bytes oneMKL holds)."""
    script = textwrap.dedent(
        """
        import ctypes, os
        from pathlib import Path
        import torch
        import torch.nn.functional as F
        from helix_server.platform.allocator import release_freed_memory

        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        held = library.mkl_serv_mem_stat
        held.restype, held.argtypes = ctypes.c_int64, [ctypes.POINTER(ctypes.c_int)]
        count = ctypes.c_int(0)
        q, k, v = (torch.randn(1, 9, 1500, 64) for _ in range(3))
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        before = held(ctypes.byref(count))
        assert release_freed_memory()
        print(before, held(ctypes.byref(count)))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "mkl_serv_mem_stat" in result.stderr:
        pytest.skip("this torch build carries no oneMKL")
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = map(int, result.stdout.split())
    assert before > 0 and after == 0, (before, after)
