"""Plain KV-cache events the scheduler emits as blocks become findable or stop being findable.

The `BlockPool` calls its `event_sink` (None: no events) with these; the engine side turns them into
vLLM's wire format (`helix_server.engine.kv_events`). Digests are helix's own block hashes, so a
consumer can chain a stored block to its parent. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStoredEvent:
    """A full, computed block became findable by its hash."""

    block_hash: bytes
    # The digest of the block before it in its sequence; None for a first block.
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    # What besides token ids went into the hash (a request's cache_salt, first block only).
    extra_keys: tuple | None = None


@dataclass(frozen=True)
class BlockRemovedEvent:
    """A cached block was evicted (its slots reused): its hash finds nothing any more."""

    block_hash: bytes


KVEvent = BlockStoredEvent | BlockRemovedEvent
KVEventSink = Callable[[KVEvent], None]
