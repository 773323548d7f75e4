"""KVCacheManager: block tables, all-or-nothing growth, forking, release."""

import pytest

from helix_server.scheduler.kv_cache_manager import KVCacheManager
from helix_server.scheduler.request import Request


def make_request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(request_id, list(range(1, num_prompt_tokens + 1)))


def test_num_blocks_for_rounds_up():
    kv = KVCacheManager(8, 4)
    assert [kv.num_blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        KVCacheManager(8, 0)


def test_allocate_slots_grows_the_table_to_cover_computed_plus_new():
    kv = KVCacheManager(8, 4)
    req = make_request("a", 10)
    assert kv.allocate_slots(req, 6)
    assert kv.get_block_ids("a") == [0, 1]
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 2)  # positions 6..7 fit in block 1
    assert kv.get_block_ids("a") == [0, 1]
    assert kv.allocate_slots(req, 4)  # positions 6..9 need a third block
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.num_free_blocks == 5
    assert kv.usage == 3 / 8
    kv.check_invariants()


def test_allocate_slots_is_all_or_nothing():
    kv = KVCacheManager(3, 4)
    a, b = make_request("a", 8), make_request("b", 8)
    assert kv.allocate_slots(a, 8)
    assert not kv.allocate_slots(b, 8)
    assert kv.get_block_ids("b") == []
    assert kv.num_free_blocks == 1
    a.num_computed_tokens = 8
    assert not kv.allocate_slots(a, 9)
    assert kv.get_block_ids("a") == [0, 1]
    kv.check_invariants()


def test_fork_shares_full_blocks_with_ref_counts():
    kv = KVCacheManager(8, 4)
    leader, follower = make_request("l", 10), make_request("f", 10)
    assert kv.allocate_slots(leader, 10)
    kv.fork(leader, follower, 8)
    assert kv.get_block_ids("f") == kv.get_block_ids("l")[:2]
    assert [b.ref_cnt for b in kv.block_pool.blocks[:3]] == [2, 2, 1]
    assert kv.blocks_freed_if_released(leader) == 1
    assert kv.blocks_freed_if_released(follower) == 0
    kv.check_invariants()

    kv.free(leader)
    assert kv.num_free_blocks == 8 - 2
    assert kv.blocks_freed_if_released(follower) == 2
    kv.free(follower)
    assert kv.num_free_blocks == 8
    kv.check_invariants()


def test_fork_of_zero_tokens_shares_nothing():
    kv = KVCacheManager(8, 4)
    leader, follower = make_request("l", 3), make_request("f", 3)
    assert kv.allocate_slots(leader, 3)
    kv.fork(leader, follower, 0)
    assert kv.get_block_ids("f") == []
    kv.check_invariants()


def test_fork_refuses_bad_arguments():
    kv = KVCacheManager(8, 4)
    leader, follower = make_request("l", 10), make_request("f", 10)
    assert kv.allocate_slots(leader, 10)
    with pytest.raises(ValueError):
        kv.fork(leader, follower, 6)  # not whole blocks
    with pytest.raises(ValueError):
        kv.fork(leader, follower, 16)  # more than the leader holds
    assert kv.allocate_slots(follower, 1)
    with pytest.raises(ValueError):
        kv.fork(leader, follower, 4)  # follower already has a table
    kv.check_invariants()


def test_free_releases_the_tail_first_and_is_idempotent():
    kv = KVCacheManager(4, 2)
    req = make_request("a", 6)
    assert kv.allocate_slots(req, 6)
    kv.free(req)
    assert kv.get_block_ids("a") == []
    assert kv.block_pool.free_block_ids() == [3, 2, 1, 0]
    kv.free(req)
    kv.free(make_request("never", 1))
    assert kv.num_free_blocks == kv.num_total_blocks == 4
    kv.check_invariants()


def test_invariant_check_catches_a_ref_count_mismatch():
    kv = KVCacheManager(4, 2)
    req = make_request("a", 4)
    assert kv.allocate_slots(req, 4)
    kv.block_pool.blocks[0].ref_cnt = 2
    with pytest.raises(AssertionError):
        kv.check_invariants()
