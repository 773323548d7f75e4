"""The pool of paged KV cache blocks: ref-counted blocks and an LRU-ordered free queue.

Pure Python: a block here is only an id and a count; the K/V tensors live in the runner, indexed by
`block_id`. A block with `ref_cnt == 0` sits in the free queue. The queue is LRU-ordered (the front
is reused first) and supports O(1) removal of any block, so prefix caching can later revive a freed
block that is still findable by its `block_hash` without scanning.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class KVBlock:
    """One block of `block_size` token slots in the paged KV cache.

    `ref_cnt` counts the block tables holding this block; `block_hash` identifies a full block's
    contents for prefix caching (always None until prefix caching lands).
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref_cnt={self.ref_cnt})"


class BlockPool:
    """`num_blocks` KV blocks with ref counts and a free queue.

    `allocate` takes blocks from the front of the free queue (least recently freed first); `free`
    appends blocks whose count drops to 0 to the back, in the order given. Callers releasing a block
    table pass it reversed, so the table's tail (least likely to be a shared prefix) is reused first.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, front = next to reuse. OrderedDict gives O(1) popleft, append and
        # removal by key, which is all an LRU free queue needs.
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by at least one block table (0.0 to 1.0)."""
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """Take `n` free blocks (ref count 1 each), or raise ValueError and take none."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free_queue):
            raise ValueError(f"cannot allocate {n} blocks: only {len(self._free_queue)} free")
        blocks = []
        for _ in range(n):
            _, block = self._free_queue.popitem(last=False)
            # Reusing a block overwrites its contents: it is no longer findable by hash.
            block.block_hash = None
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def incref(self, blocks: Iterable[KVBlock]) -> None:
        """Add one reference to each block; a free block (a future prefix-cache hit) leaves the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the back of the free queue."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block

    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks, in reuse order (for tests and debugging)."""
        return list(self._free_queue)

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (tests call this)."""
        for block in self.blocks:
            if block.ref_cnt < 0:
                raise AssertionError(f"{block} has a negative ref count")
            in_queue = block.block_id in self._free_queue
            if in_queue != (block.ref_cnt == 0):
                raise AssertionError(f"{block} is {'in' if in_queue else 'not in'} the free queue")
        for block_id, block in self._free_queue.items():
            if self.blocks[block_id] is not block:
                raise AssertionError(f"free queue entry {block_id} is not the pool's block")
        if self.num_free_blocks + sum(1 for b in self.blocks if b.ref_cnt > 0) != self.num_blocks:
            raise AssertionError("free + used blocks != total blocks")
