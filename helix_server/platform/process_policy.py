"""Process-wide policy, applied once by the entry points (`serve`, `helix-server generate`, `LLM`).

- Before loading: on the CPU, glibc keeps freed buffers (`allocator.keep_freed_memory`), since a
  CPU forward frees and re-allocates the same large activations every step.
- After loading (a server): what was loaded (the model, torch's modules) lives as
  long as the process, so it moves out of the cyclic garbage collector's sight (`gc.freeze`), or
  each full collection walks it all (measured: ~100 ms pauses in the step loop on a 2-core CPU);
  and what loading freed goes back to the OS (`allocator.release_freed_memory`), since the kept-
  buffers policy would otherwise hold it for good.
"""

from __future__ import annotations

import gc

from helix_server.errors import HelixError
from helix_server.platform.allocator import keep_freed_memory, release_freed_memory
from helix_server.platform.device import resolve_device


def prepare_process(device_name: str) -> None:
    """Apply the policy that must precede loading, for the device `device_name` resolves to."""
    try:
        device = resolve_device(device_name)
    except HelixError:  # the loader reports a bad device name
        return
    if device.type == "cpu":
        keep_freed_memory()


def freeze_loaded_objects() -> None:
    """Collect once, then keep everything alive now out of later collections; return the heap's
    free memory (what loading freed) to the OS."""
    gc.collect()
    gc.freeze()
    release_freed_memory()
