"""Prefix caching: content hashes of full KV blocks, and lookups that can never share the wrong KV.

A full block's hash is chained: `hash(parent's hash, its token ids, extra keys)`, where the first
block's parent is a random per-`PrefixCache` seed and extra keys (a request's `cache_salt`) enter
the first block only. The pool indexes cached blocks by that hash. Blocks are hashed only when they
are full of computed tokens (after a step, never while they hold drafts or lookahead slots), and a
new request takes the longest run of cached blocks that matches its known tokens, always leaving
its last token to compute (it needs that token's logits).

The hash is only an index. Every hit is verified: the cached block must hold the same token ids,
the same extra keys, and have been computed after the very block we matched one position earlier.
That last link is a `serial`: a number the pool gives a block each time it is cached, never reused.
A cached block remembers the serial of its parent, so a hit chain is the exact token prefix, even
if the hash function collided (a collision only costs a miss, never wrong KV).

Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from helix_server.scheduler.block_hash import BlockHash, HashFn, hash_block_tokens, sha256
from helix_server.scheduler.kv_events import BlockStoredEvent

if TYPE_CHECKING:
    from helix_server.scheduler.block_pool import BlockPool, KVBlock
    from helix_server.scheduler.request import Request

@dataclass
class PrefixCacheStats:
    """Running totals, in tokens: prompt tokens looked up at first admission, and how many hit."""

    queries: int = 0
    hits: int = 0


class _Chain:
    """One request's view of its full blocks: their hashes, and for each computed one the serial of
    the cached block that holds the same content (None once the chain could not be cached)."""

    __slots__ = ("hashes", "serials")

    def __init__(self) -> None:
        self.hashes: list[BlockHash] = []
        self.serials: list[int | None] = []


class PrefixCache:
    """Hashes requests' full blocks, finds cached prefixes and registers newly computed blocks.

    Works on the `BlockPool`'s index of cached blocks; the `KVCacheManager` calls it. Per request it
    keeps a `_Chain` until the request's blocks are freed.
    """

    def __init__(
        self, block_pool: BlockPool, block_size: int, hash_fn: HashFn = sha256, seed: bytes | None = None
    ) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.hash_fn = hash_fn
        # The parent of every first block: random per instance unless given (tests), so hashes are
        # never predictable from outside (and never shared between processes by accident).
        self.root = os.urandom(32) if seed is None else seed
        self.stats = PrefixCacheStats()
        self._chains: dict[str, _Chain] = {}

    # ------------------------------------------------------------------ hashing

    def _chain(self, request: Request) -> _Chain:
        chain = self._chains.get(request.request_id)
        if chain is None:
            chain = self._chains[request.request_id] = _Chain()
        return chain

    def _hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The hashes of the request's first `num_blocks` full blocks (computed once, then kept)."""
        hashes = self._chain(request).hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1].value if hashes else self.root
            extra = request.cache_extra_keys if i == 0 else None
            tokens = request.token_ids_between(i * size, (i + 1) * size)
            hashes.append(hash_block_tokens(self.hash_fn, parent, tokens, extra))
        return hashes[:num_blocks]

    # ------------------------------------------------------------------ lookup

    def find(self, request: Request) -> list[KVBlock]:
        """The longest verified run of cached blocks at the start of the request's known tokens,
        never covering its last token. Changes nothing (the caller commits with `take`)."""
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        parent_serial = 0
        for block_hash in self._hashes(request, max_blocks):
            block = self.block_pool.cached_block(block_hash.value)
            # Same digest is not enough: same content, computed after the block we just matched.
            if block is None or block.block_hash != block_hash or block.parent_serial != parent_serial:
                break
            hits.append(block)
            parent_serial = block.serial
        return hits

    def take(self, request: Request, hits: list[KVBlock], count_stats: bool) -> None:
        """Record that the request now starts with `hits` (the result of `find`)."""
        self._chain(request).serials = [block.serial for block in hits]
        if count_stats:
            self.stats.queries += request.num_tokens
            self.stats.hits += len(hits) * self.block_size

    # ------------------------------------------------------------------ registration

    def cache_full_blocks(self, request: Request, table: list[KVBlock], num_computed_tokens: int) -> None:
        """Make the request's blocks that are now full of computed tokens findable.

        Called after a step, when `num_computed_tokens` counts only computed, accepted tokens, so
        no block holding a draft or a lookahead slot is ever cached.
        """
        num_full = min(num_computed_tokens // self.block_size, len(table))
        chain = self._chain(request)
        serials = chain.serials
        if len(serials) >= num_full:
            return
        hashes = self._hashes(request, num_full)
        pool = self.block_pool
        while len(serials) < num_full:
            i = len(serials)
            parent_serial = serials[-1] if serials else 0
            if parent_serial is None:  # the chain broke on a collision: nothing past it is cached
                serials.append(None)
                continue
            block = table[i]
            block_hash = hashes[i]
            existing = pool.cached_block(block_hash.value)
            if existing is None:
                serials.append(pool.cache_block(block, block_hash, parent_serial))
                if pool.event_sink is not None:
                    parent = hashes[i - 1].value if i else None
                    stored = BlockStoredEvent(block_hash.value, parent, block_hash.token_ids, block_hash.extra_keys)
                    pool.event_sink(stored)
            elif existing.block_hash == block_hash and existing.parent_serial == parent_serial:
                # The same content is already cached (in this block, or computed twice at once):
                # chain on through the cached copy; this block stays uncached.
                serials.append(existing.serial)
            else:  # a digest collision with other content: never share, stop caching this chain
                serials.append(None)

    def fork(self, parent: Request, child: Request, num_blocks: int) -> None:
        """`child` now starts with `parent`'s first `num_blocks` blocks."""
        source = self._chains.get(parent.request_id)
        chain = self._chain(child)
        if source is not None:
            chain.hashes = source.hashes[:num_blocks]
            chain.serials = source.serials[:num_blocks]

    def forget(self, request_id: str) -> None:
        """Drop the request's chain (its blocks were freed; a recompute looks up afresh)."""
        self._chains.pop(request_id, None)
