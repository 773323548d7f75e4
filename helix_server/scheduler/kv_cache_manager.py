"""Per-request block tables over one `BlockPool`, with prefix caching.

A request's block table maps its logical blocks (positions [i * block_size, (i + 1) * block_size))
to physical KV blocks. Tables only grow while a request lives; `free` releases the whole table.
Blocks may be shared between tables, hence the ref counts: the `n` sequences of one request fork
their prompt's full blocks, and with prefix caching a new request starts with the cached blocks of
the longest prefix it shares with earlier ones.

Why no block is ever written by two owners (so no copy-on-write is needed): a shared block is
always full of computed tokens in every table that holds it (forks share only full prompt blocks
before the last prompt token; the cache only hands out blocks cached when full of computed,
accepted tokens, and never the block of a request's last token). Every writer writes at positions
from its own `num_computed_tokens` on, which lie past its shared blocks.
"""

from __future__ import annotations

from helix_server.scheduler.block_hash import HashFn, sha256
from helix_server.scheduler.block_pool import BlockPool, KVBlock
from helix_server.scheduler.prefix_cache import PrefixCache, PrefixCacheStats
from helix_server.scheduler.request import Request


class KVCacheManager:
    """Allocates, shares, caches and releases the KV blocks of requests, keyed by request id.

    With `enable_caching`, full computed blocks become findable by a hash of their contents (see
    `prefix_cache`); `hash_fn` is the digest function (SHA-256; tests pass weak ones) and
    `hash_seed` the root of every hash chain (random unless given).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = False,
        hash_fn: HashFn = sha256,
        hash_seed: bytes | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.prefix_cache = (
            PrefixCache(self.block_pool, block_size, hash_fn, hash_seed) if enable_caching else None
        )
        self._block_tables: dict[str, list[KVBlock]] = {}

    @property
    def enable_caching(self) -> bool:
        return self.prefix_cache is not None

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool in use (0.0 to 1.0); free cached blocks count as free."""
        return self.block_pool.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up and found (all zero with caching off)."""
        return self.prefix_cache.stats if self.prefix_cache is not None else PrefixCacheStats()

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def num_blocks_held(self, request_id: str) -> int:
        """Length of the request's block table (0 if it has none)."""
        return len(self._block_tables.get(request_id, ()))

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as physical block ids (empty if it has none)."""
        return [block.block_id for block in self._block_tables.get(request_id, ())]

    def get_blocks(self, request_id: str) -> list[KVBlock]:
        """The request's block table (a copy; empty if it has none)."""
        return list(self._block_tables.get(request_id, ()))

    # ------------------------------------------------------------------ allocation

    def find_cached_blocks(self, request: Request) -> list[KVBlock]:
        """The cached blocks a request holding no blocks could start with (nothing is taken)."""
        if self.prefix_cache is None or request.skip_reading_prefix_cache or request.request_id in self._block_tables:
            return []
        return self.prefix_cache.find(request)

    def start_position(self, request: Request, cached_blocks: list[KVBlock]) -> int:
        """Where the request's next tokens start: past the cache hit `cached_blocks` when there is
        one (a request holding no blocks), else at its computed tokens."""
        return len(cached_blocks) * self.block_size if cached_blocks else request.num_computed_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_lookahead_tokens: int = 0,
        cached_blocks: list[KVBlock] | None = None,
    ) -> bool:
        """Grow the request's table to cover positions [0, num_computed_tokens + num_new_tokens +
        num_lookahead_tokens) (lookahead: slots a speculative proposer writes drafts' K/V into).

        `cached_blocks` (from `find_cached_blocks`, for a request holding no blocks) become the
        start of its table and its `num_computed_tokens` moves past them; `num_new_tokens` counts
        from there. All or nothing: returns False and changes nothing when the pool has too few
        free blocks (a cache hit on a free block uses up a free block too).
        """
        table = self._block_tables.get(request.request_id)
        cached_blocks = cached_blocks or []
        if cached_blocks and table:
            raise ValueError(f"{request.request_id!r} already holds blocks: no cache hit to take")
        num_held = len(table) if table is not None else 0
        start = self.start_position(request, cached_blocks)
        end = start + num_new_tokens + num_lookahead_tokens
        num_needed = max(0, self.num_blocks_for(end) - num_held - len(cached_blocks))
        num_revived = sum(1 for block in cached_blocks if block.ref_cnt == 0)
        if num_needed + num_revived > self.block_pool.num_free_blocks:
            return False
        if cached_blocks:
            self.block_pool.incref(cached_blocks)
            table = self._block_tables[request.request_id] = list(cached_blocks)
            request.num_computed_tokens = start
            self.prefix_cache.take(request, cached_blocks, count_stats=request.num_preemptions == 0)
        elif self.prefix_cache is not None and table is None and request.num_computed_tokens == 0:
            self.prefix_cache.take(request, [], count_stats=request.num_preemptions == 0)
        if num_needed:
            new_blocks = self.block_pool.allocate_run(num_needed, after=table[-1] if table else None)
            if table is None:
                self._block_tables[request.request_id] = new_blocks
            else:
                table.extend(new_blocks)
        return True

    def cache_blocks(self, request: Request) -> None:
        """After a step: make the request's blocks that are full of computed tokens findable."""
        table = self._block_tables.get(request.request_id)
        if self.prefix_cache is not None and table:
            self.prefix_cache.cache_full_blocks(request, table, request.num_computed_tokens)

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """Start `child`'s table as `parent`'s first `num_tokens // block_size` (full) blocks, shared.

        `num_tokens` must be a multiple of block_size, and `child` must hold no blocks yet. The
        shared blocks are full, so neither request ever writes into them again: no copy-on-write.
        """
        if num_tokens % self.block_size:
            raise ValueError(f"fork of {num_tokens} tokens is not a whole number of blocks")
        if self._block_tables.get(child.request_id):
            raise ValueError(f"{child.request_id!r} already holds blocks")
        num_blocks = num_tokens // self.block_size
        parent_table = self._block_tables.get(parent.request_id, [])
        if num_blocks > len(parent_table):
            raise ValueError(
                f"{parent.request_id!r} holds {len(parent_table)} blocks, cannot share {num_blocks}"
            )
        if num_blocks == 0:
            return
        shared = parent_table[:num_blocks]
        self.block_pool.incref(shared)
        self._block_tables[child.request_id] = shared
        if self.prefix_cache is not None:
            self.prefix_cache.fork(parent, child, num_blocks)

    def free(self, request: Request) -> None:
        """Release the request's whole table (a no-op if it has none). Its cached blocks stay
        findable until their blocks are reused."""
        table = self._block_tables.pop(request.request_id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.forget(request.request_id)
        if table:
            # Tail first: the tail joins the free queue ahead of the prefix, so it is reused first.
            self.block_pool.free(reversed(table))

    def blocks_freed_if_released(self, request: Request) -> int:
        """How many blocks would return to the pool if the request were freed now (shared ones don't)."""
        return sum(1 for block in self._block_tables.get(request.request_id, ()) if block.ref_cnt == 1)

    def check_invariants(self) -> None:
        """Raise AssertionError if tables and ref counts disagree (tests call this)."""
        self.block_pool.check_invariants()
        holders = [0] * self.block_pool.num_blocks
        for request_id, table in self._block_tables.items():
            if not table:
                raise AssertionError(f"{request_id!r} has an empty block table entry")
            if len({block.block_id for block in table}) != len(table):
                raise AssertionError(f"{request_id!r} holds a block twice")
            for block in table:
                holders[block.block_id] += 1
        for block in self.block_pool.blocks:
            if block.ref_cnt != holders[block.block_id]:
                raise AssertionError(f"{block} is held by {holders[block.block_id]} tables")
