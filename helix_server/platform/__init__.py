"""Device detection and capabilities: CUDA, DirectML, CPU; dtype choice; memory info."""

from helix_server.platform.device import (
    cpu_has_amx,
    cpu_has_fast_half,
    device_description,
    device_memory,
    free_device_memory,
    is_directml,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "cpu_has_amx",
    "cpu_has_fast_half",
    "device_description",
    "device_memory",
    "free_device_memory",
    "is_directml",
    "resolve_device",
    "resolve_dtype",
]
