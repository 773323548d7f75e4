"""The scheduler: continuous batching, the KV block pool and block tables. Pure Python, no torch."""

from helix_server.scheduler.block_pool import BlockPool, KVBlock
from helix_server.scheduler.kv_cache_manager import KVCacheManager
from helix_server.scheduler.request import Request, RequestStatus
from helix_server.scheduler.scheduler import Scheduler

__all__ = [
    "BlockPool",
    "KVBlock",
    "KVCacheManager",
    "Request",
    "RequestStatus",
    "Scheduler",
]
