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
