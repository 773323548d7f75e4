"""Per-request block tables over one `BlockPool`.

A request's block table maps its logical blocks (positions [i * block_size, (i + 1) * block_size))
to physical KV blocks. Tables only grow while a request lives; `free` releases the whole table.
Blocks may be shared between tables (n > 1 sequences forking a prompt), hence the ref counts.
"""

from __future__ import annotations

from helix_server.scheduler.block_pool import BlockPool, KVBlock
from helix_server.scheduler.request import Request


class KVCacheManager:
    """Allocates, shares and releases the KV blocks of requests, keyed by request id."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[KVBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool in use (0.0 to 1.0)."""
        return self.block_pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def num_blocks_held(self, request_id: str) -> int:
        """Length of the request's block table (0 if it has none)."""
        return len(self._block_tables.get(request_id, ()))

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as physical block ids (empty if it has none)."""
        return [block.block_id for block in self._block_tables.get(request_id, ())]

    def allocate_slots(self, request: Request, num_new_tokens: int, num_lookahead_tokens: int = 0) -> bool:
        """Grow the request's table to cover positions [0, num_computed_tokens + num_new_tokens +
        num_lookahead_tokens) (lookahead: slots a speculative proposer writes drafts' K/V into).

        All or nothing: returns False and allocates nothing when the pool has too few free blocks.
        """
        table = self._block_tables.get(request.request_id)
        num_held = len(table) if table is not None else 0
        end = request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
        num_needed = self.num_blocks_for(end) - num_held
        if num_needed <= 0:
            return True
        if num_needed > self.block_pool.num_free_blocks:
            return False
        new_blocks = self.block_pool.allocate(num_needed)
        if table is None:
            self._block_tables[request.request_id] = new_blocks
        else:
            table.extend(new_blocks)
        return True

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

    def free(self, request: Request) -> None:
        """Release the request's whole table (a no-op if it has none)."""
        table = self._block_tables.pop(request.request_id, None)
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
