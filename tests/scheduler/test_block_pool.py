"""BlockPool: ref counts, all-or-nothing allocation, the free queues, the cache index, invariant checks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helix_server.scheduler.block_hash import BlockHash
from helix_server.scheduler.block_pool import BlockPool


def test_new_pool_is_all_free():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4
    assert pool.num_used_blocks == 0
    assert pool.usage == 0.0
    assert pool.free_block_ids() == [0, 1, 2, 3]
    pool.check_invariants()


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_takes_from_the_front_with_ref_count_one():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 1
    assert pool.usage == 0.75
    pool.check_invariants()


def test_allocate_is_all_or_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(ValueError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_invariants()
    assert pool.allocate(0) == []
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_free_returns_blocks_to_the_back_in_the_order_given():
    pool = BlockPool(4)
    table = pool.allocate(3)
    pool.free(reversed(table))  # how a block table is released: tail first
    assert pool.free_block_ids() == [3, 2, 1, 0]
    # The table's tail is reused before its head (which a prefix cache would rather keep).
    assert [b.block_id for b in pool.allocate(2)] == [3, 2]
    pool.check_invariants()


def test_shared_block_returns_only_when_the_last_reference_goes():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.incref([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 2
    pool.check_invariants()


def test_incref_of_a_free_block_takes_it_out_of_the_queue():
    # The hook prefix caching will use to revive a freed block that is still findable.
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.free(blocks)
    pool.incref([blocks[2]])
    assert blocks[2].ref_cnt == 1
    assert pool.free_block_ids() == [0, 1, 3]
    pool.check_invariants()


def test_double_free_is_refused():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError):
        pool.free([block])
    assert block.ref_cnt == 0
    pool.check_invariants()


def test_reused_block_loses_its_hash():
    pool = BlockPool(1)
    (block,) = pool.allocate(1)
    assert block.block_hash is None
    block_hash = BlockHash(b"digest", (1, 2))
    assert pool.cache_block(block, block_hash, parent_serial=0) == block.serial > 0
    pool.free([block])
    assert pool.cached_block(b"digest") is block  # free, still findable
    (again,) = pool.allocate(1)
    assert again is block and again.block_hash is None and again.serial == 0
    assert pool.cached_block(b"digest") is None
    pool.check_invariants()


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks[:2]):
        pool.cache_block(block, BlockHash(bytes([i]), (i,)), parent_serial=0)
    pool.free(reversed(blocks))  # 3, 2 hold nothing; 1, 0 are cached
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    assert [b.block_id for b in pool.allocate(3)] == [3, 2, 1]  # the least recently freed cached one goes
    assert pool.cached_block(bytes([1])) is None and pool.cached_block(bytes([0])) is blocks[0]
    pool.check_invariants()


def test_a_cache_hit_revives_a_free_cached_block():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, BlockHash(b"x", (5,)), parent_serial=0)
    pool.free([block])
    pool.incref([block])
    assert block.ref_cnt == 1 and pool.free_block_ids() == [1]
    pool.check_invariants()


def test_cache_block_refuses_a_taken_digest_or_a_free_block():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, BlockHash(b"x", (1,)), parent_serial=0)
    with pytest.raises(ValueError):
        pool.cache_block(b, BlockHash(b"x", (2,)), parent_serial=0)
    with pytest.raises(ValueError):
        pool.cache_block(pool.blocks[2], BlockHash(b"y", (1,)), parent_serial=0)
    pool.check_invariants()


def test_invariant_check_catches_corruption():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    blocks[0].ref_cnt = 0  # owned but not in the free queue
    with pytest.raises(AssertionError):
        pool.check_invariants()
    blocks[0].ref_cnt = -1
    with pytest.raises(AssertionError):
        pool.check_invariants()


def ids(blocks):
    return [b.block_id for b in blocks]


def test_allocate_run_extends_a_table_with_the_blocks_right_after_it():
    pool = BlockPool(10)
    table = pool.allocate_run(3)
    assert ids(table) == [0, 1, 2]  # a fresh pool: from the start of its one run
    table += pool.allocate_run(2, after=table[-1])
    assert ids(table) == [0, 1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in table) and pool.num_free_blocks == 5
    pool.check_invariants()


def test_allocate_run_starts_a_table_mid_run_after_a_held_block():
    pool = BlockPool(20)
    first = pool.allocate_run(4)  # 0-3
    second = pool.allocate_run(2)  # the run 4-19 follows a held block: start in its middle
    assert ids(second) == [11, 12]
    first += pool.allocate_run(3, after=first[-1])  # room to grow before the second table
    assert ids(first) == list(range(7))
    pool.free(reversed(first))
    # 0-10 follow no held block: a new table starts at their start.
    assert ids(pool.allocate_run(3)) == [0, 1, 2]
    pool.check_invariants()


def test_allocate_run_falls_back_to_queue_order_where_no_run_fits():
    pool = BlockPool(6)
    blocks = pool.allocate(6)
    pool.free([blocks[4], blocks[1], blocks[3]])  # free: 4, 1, 3 (no two adjacent but 3-4)
    assert ids(pool.allocate_run(2, after=blocks[0])) == [4, 1]  # block 1 is free but 2 is not
    pool.free([blocks[4], blocks[1]])
    assert ids(pool.allocate_run(3)) == [3, 4, 1]  # the longest run (3-4) is too short
    with pytest.raises(ValueError):
        pool.allocate_run(1)  # all or nothing, as allocate
    pool.check_invariants()


def test_allocate_run_never_takes_cached_blocks_out_of_order():
    """Free cached blocks are evicted least recently freed first, as by `allocate`: a run may only
    be made of blocks holding nothing findable."""
    pool = BlockPool(6)
    blocks = pool.allocate(6)
    for i in (2, 3, 4):
        pool.cache_block(blocks[i], BlockHash(bytes([i]), (i,)), parent_serial=0)
    pool.free([blocks[4], blocks[3], blocks[2]])  # cached, free: evictable in the order 4, 3, 2
    pool.free([blocks[5]])  # nothing findable in it
    assert ids(pool.allocate_run(2, after=blocks[1])) == [5, 4]  # not 2-3: they are cached
    assert pool.cached_block(bytes([4])) is None and pool.cached_block(bytes([2])) is blocks[2]
    pool.check_invariants()


@settings(max_examples=150, deadline=None)
@given(
    held=st.lists(st.booleans(), min_size=1, max_size=40),
    n=st.integers(min_value=1, max_value=12),
    extend=st.booleans(),
)
def test_allocate_run_gives_a_run_whenever_one_fits(held, n, extend):
    """Whatever the pool's layout: `n` distinct blocks that were free, all or nothing; consecutive
    when a long enough run of free blocks exists (right after `after` when extending)."""
    pool = BlockPool(len(held))
    blocks = pool.allocate(len(held))
    pool.free([b for b, h in zip(blocks, held) if not h])
    free_before = set(pool.free_block_ids())
    after = next((b for b, h in zip(blocks, held) if h), None) if extend else None
    if n > len(free_before):
        with pytest.raises(ValueError):
            pool.allocate_run(n, after)
        assert set(pool.free_block_ids()) == free_before
        return
    got = ids(pool.allocate_run(n, after))
    assert len(set(got)) == n and set(got) <= free_before
    if after is not None:
        wanted = list(range(after.block_id + 1, after.block_id + 1 + n))
        assert (got == wanted) == (set(wanted) <= free_before)
    else:
        flags = "".join("1" if i in free_before else "0" for i in range(len(held)))
        if "1" * n in flags:
            assert got == list(range(got[0], got[0] + n))
    pool.check_invariants()
