"""The pool of paged KV cache blocks: ref counts, free queues, and the index of cached blocks.

Pure Python: a block here is only an id, a count and (when cached) the hash of its contents; the
K/V tensors live in the runner, indexed by `block_id`. A block with `ref_cnt == 0` is free. Free
blocks wait in one of two queues, both with O(1) removal of any block:

- `_free_queue`: blocks that hold nothing findable, reused first;
- `_evictable`: free blocks that are still cached (findable by hash), least recently freed first.
  A prefix-cache hit revives such a block (`incref`); allocating evicts it (forgets its hash).

Block tables are allocated in runs of consecutive ids where the first queue allows
(`allocate_run`): attention reads a request whose blocks form one run in place instead of
copying its keys out of the pool first (see `layers.attention.builder.key_run_start`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable

from helix_server.scheduler.block_hash import BlockHash
from helix_server.scheduler.kv_events import BlockRemovedEvent, KVEventSink


class KVBlock:
    """One block of `block_size` token slots in the paged KV cache.

    `ref_cnt` counts the block tables holding this block. While the block is cached, `block_hash`
    identifies its contents, `serial` is the unique number it got when it was cached, and
    `parent_serial` the serial of the block before it in the sequence that computed it (0 for a
    first block); otherwise `block_hash` is None and both serials are 0.
    """

    __slots__ = ("block_hash", "block_id", "parent_serial", "ref_cnt", "serial")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.serial = 0
        self.parent_serial = 0

    def __repr__(self) -> str:
        cached = ", cached" if self.block_hash is not None else ""
        return f"KVBlock({self.block_id}, ref_cnt={self.ref_cnt}{cached})"


class BlockPool:
    """`num_blocks` KV blocks with ref counts, free queues and a hash index of cached blocks.

    `allocate` takes blocks holding nothing findable first (in the order they were freed), then
    evicts cached free blocks, least recently freed first. `free` appends blocks whose count drops
    to 0 to the back of their queue, in the order given: callers releasing a block table pass it
    reversed, so the table's tail (least likely to be a shared prefix) is reused first.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, front = next to reuse. OrderedDict gives O(1) popleft, append and
        # removal by key, which is all an LRU queue needs.
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # 1 where a block is in `_free_queue`: the map `allocate_run` searches for runs.
        self._clean = bytearray(b"\x01") * num_blocks
        self._evictable: OrderedDict[int, KVBlock] = OrderedDict()
        # hash digest -> the cached block holding that content (held or free).
        self._cached: dict[bytes, KVBlock] = {}
        self._serials = itertools.count(1)
        # Called with a `BlockRemovedEvent` when a cached block is evicted (the engine publishes
        # KV events from these); None: no events.
        self.event_sink: KVEventSink | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks no table holds (cached ones included: they are reused when needed)."""
        return len(self._free_queue) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash (held or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by at least one block table (0.0 to 1.0)."""
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """Take `n` free blocks (ref count 1 each), or raise ValueError and take none."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free_blocks:
            raise ValueError(f"cannot allocate {n} blocks: only {self.num_free_blocks} free")
        blocks = []
        for _ in range(n):
            queue = self._free_queue if self._free_queue else self._evictable
            _, block = queue.popitem(last=False)
            self._clean[block.block_id] = 0
            # Reusing a block overwrites its contents: it is no longer findable by hash.
            self._uncache(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def allocate_run(self, n: int, after: KVBlock | None = None) -> list[KVBlock]:
        """Take `n` free blocks for a block table, consecutive ids where possible; like `allocate`
        otherwise (all or nothing).

        Only blocks of the first queue (holding nothing findable) are taken out of order, so the
        prefix cache loses nothing to this. Extending a table (`after` is its last block), the
        blocks right after it are taken when all are in that queue. Starting a table, a long run
        of such blocks is used (the first at least half as long as the longest): from its start
        when the block before it is held by no table (so nothing needs room to grow there), else
        from its middle, leaving the table before it half of the run to grow into.
        """
        if 0 < n <= self.num_free_blocks:
            start = self._run_start(n, after)
            if start is not None:
                blocks = self.blocks[start : start + n]
                for block in blocks:
                    del self._free_queue[block.block_id]
                    block.ref_cnt = 1
                self._clean[start : start + n] = bytes(n)
                return blocks
        return self.allocate(n)

    def _run_start(self, n: int, after: KVBlock | None) -> int | None:
        if after is not None:
            start = after.block_id + 1
            return start if self._clean[start : start + n] == b"\x01" * n else None
        # The first run of at least n clean blocks, then (doubling the length sought while such a
        # run exists) the first at least half as long as the longest: C-speed searches of the map,
        # a few per table even in a pool of 100,000 fragmented blocks.
        pattern = b"\x01" * n
        start = self._clean.find(pattern)
        if start < 0:
            return None
        while (longer := self._clean.find(pattern + pattern, start)) >= 0:
            pattern += pattern
            start = longer
        end = self._clean.find(b"\x00", start)
        end = self.num_blocks if end < 0 else end
        if start > 0 and self.blocks[start - 1].ref_cnt > 0:
            start += (end - start - n) // 2
        return start

    def incref(self, blocks: Iterable[KVBlock]) -> None:
        """Add one reference to each block; a free block (a prefix-cache hit) leaves its queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                queue = self._evictable if block.block_hash is not None else self._free_queue
                del queue[block.block_id]
                self._clean[block.block_id] = 0
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the back of their free queue."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    self._evictable[block.block_id] = block
                else:
                    self._free_queue[block.block_id] = block
                    self._clean[block.block_id] = 1

    # ------------------------------------------------------------------ the cache index

    def cached_block(self, value: bytes) -> KVBlock | None:
        """The cached block whose hash digest is `value`, if any (its contents are not checked)."""
        return self._cached.get(value)

    def cache_block(self, block: KVBlock, block_hash: BlockHash, parent_serial: int) -> int:
        """Make a held, full, computed block findable by `block_hash`; returns its new serial.

        The digest must not be in the index yet (the caller checked), and the block not cached.
        """
        if block.ref_cnt <= 0 or block.block_hash is not None or block_hash.value in self._cached:
            raise ValueError(f"cannot cache {block} under this hash")
        block.block_hash = block_hash
        block.parent_serial = parent_serial
        block.serial = next(self._serials)
        self._cached[block_hash.value] = block
        return block.serial

    def _uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash.value) is block:
                del self._cached[block.block_hash.value]
                if self.event_sink is not None:
                    self.event_sink(BlockRemovedEvent(block.block_hash.value))
            block.block_hash = None
        block.serial = block.parent_serial = 0

    # ------------------------------------------------------------------ checks

    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks, in reuse order (for tests and debugging)."""
        return list(self._free_queue) + list(self._evictable)

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (tests call this)."""
        for block in self.blocks:
            if block.ref_cnt < 0:
                raise AssertionError(f"{block} has a negative ref count")
            in_free = block.block_id in self._free_queue
            in_evictable = block.block_id in self._evictable
            if in_free and in_evictable:
                raise AssertionError(f"{block} is in both free queues")
            if (in_free or in_evictable) != (block.ref_cnt == 0):
                raise AssertionError(f"{block} is {'in' if in_free or in_evictable else 'not in'} a free queue")
            if in_evictable != (block.ref_cnt == 0 and block.block_hash is not None):
                raise AssertionError(f"{block} is in the wrong free queue")
            if self._clean[block.block_id] != in_free:
                raise AssertionError(f"{block}'s run-map entry disagrees with the free queue")
            if block.block_hash is not None and self._cached.get(block.block_hash.value) is not block:
                raise AssertionError(f"{block} has a hash but is not in the cache index")
            if block.block_hash is None and (block.serial or block.parent_serial):
                raise AssertionError(f"{block} keeps a serial without a hash")
        for queue in (self._free_queue, self._evictable):
            for block_id, block in queue.items():
                if self.blocks[block_id] is not block:
                    raise AssertionError(f"free queue entry {block_id} is not the pool's block")
        for value, block in self._cached.items():
            if block.block_hash is None or block.block_hash.value != value:
                raise AssertionError(f"cache index entry for {block} does not match its hash")
        if self.num_free_blocks + sum(1 for b in self.blocks if b.ref_cnt > 0) != self.num_blocks:
            raise AssertionError("free + used blocks != total blocks")
