"""Scheduler unit tests: chunked prefill, decode-first ordering, FCFS, preemption, n > 1 forks, aborts."""

import subprocess
import sys

import pytest

from helix_server.config import SchedulerConfig
from helix_server.scheduler import Request, RequestStatus, Scheduler
from helix_server.step_contract import ModelRunnerOutput, SchedulerOutput


def make_scheduler(budget=64, max_seqs=8, block_size=4, num_blocks=64) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(config, block_size, num_blocks)


def make_request(request_id: str, num_prompt_tokens: int, leader: Request | None = None) -> Request:
    return Request(request_id, list(range(1, num_prompt_tokens + 1)), fork_parent=leader)


def execute(scheduler_output: SchedulerOutput, token_id: int = 7) -> ModelRunnerOutput:
    """A fake model runner: one token for every request whose chunk reaches its last known token."""
    sampled = {s.request_id: [token_id] for s in scheduler_output.scheduled if s.samples}
    return ModelRunnerOutput(sampled_token_ids=sampled)


def step(scheduler: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    output = scheduler.schedule()
    updated = scheduler.update_from_output(output, execute(output))
    scheduler.kv_cache_manager.check_invariants()
    return output, updated


def chunks(output: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.request_id, s.start_position, s.num_new_tokens) for s in output.scheduled]


def test_scheduler_package_never_imports_torch():
    code = (
        "import sys, helix_server.scheduler, helix_server.scheduler.scheduler; "
        "assert 'torch' not in sys.modules, 'the scheduler imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_then_decode():
    sched = make_scheduler()
    req = make_request("a", 5)
    sched.add_request(req)
    output = sched.schedule()
    assert chunks(output) == [("a", 0, 5)]
    # `samples` and `token_ids` read the live request: valid until update_from_output.
    assert output.scheduled[0].token_ids == [1, 2, 3, 4, 5] and output.scheduled[0].samples
    updated = sched.update_from_output(output, execute(output))
    assert output.scheduled[0].block_ids == [0, 1]
    assert updated == [req] and req.output_token_ids == [7]
    assert req.status is RequestStatus.RUNNING and req.first_scheduled_time is not None
    output, _ = step(sched)
    assert chunks(output) == [("a", 5, 1)]
    assert output.scheduled[0].token_ids == [7]
    assert req.num_computed_tokens == 6 and req.num_tokens == 7


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sched = make_scheduler(budget=8)
    req = make_request("a", 20)
    sched.add_request(req)
    seen = []
    for _ in range(3):
        output, updated = step(sched)
        assert output.total_num_scheduled_tokens <= 8
        seen.append((chunks(output), updated))
    assert seen == [([("a", 0, 8)], []), ([("a", 8, 8)], []), ([("a", 16, 4)], [req])]
    assert req.output_token_ids == [7]


def test_running_requests_come_before_new_prefills():
    sched = make_scheduler(budget=10)
    sched.add_request(make_request("a", 4))
    step(sched)
    sched.add_request(make_request("b", 20))
    output, _ = step(sched)
    assert chunks(output) == [("a", 4, 1), ("b", 0, 9)]
    # A running request's unfinished prefill also goes before newcomers.
    sched.add_request(make_request("c", 2))
    output, _ = step(sched)
    assert chunks(output) == [("a", 5, 1), ("b", 9, 9)]


def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 3))
    output, _ = step(sched)
    assert [s.request_id for s in output.scheduled] == ["a", "b"]
    assert sched.num_running == 2 and sched.num_waiting == 1
    output, _ = step(sched)
    assert [s.request_id for s in output.scheduled] == ["a", "b"]
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    output, _ = step(sched)
    assert chunks(output) == [("b", 4, 1), ("c", 0, 3)]
    assert output.finished_request_ids == {"a"}


def test_admission_is_strictly_fcfs():
    sched = make_scheduler(block_size=4, num_blocks=4)
    sched.add_request(make_request("a", 8))  # 2 blocks
    sched.add_request(make_request("b", 12))  # 3 blocks: does not fit next to a
    sched.add_request(make_request("c", 2))  # would fit, but must not jump the queue
    output, _ = step(sched)
    assert [s.request_id for s in output.scheduled] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    output, _ = step(sched)
    assert [s.request_id for s in output.scheduled] == ["b", "c"]


def test_preemption_takes_the_youngest_and_requeues_it_in_front():
    sched = make_scheduler(block_size=4, num_blocks=4)
    reqs = {rid: make_request(rid, 4) for rid in "abcd"}
    for req in reqs.values():
        sched.add_request(req)
    step(sched)  # each prefills 4 tokens into its one block and samples: the pool is full
    sched.add_request(make_request("e", 1))
    output, _ = step(sched)
    # a needs a second block: d (youngest) goes; b needs one: c goes. Nobody is admitted.
    assert output.preempted_request_ids == ["d", "c"]
    assert chunks(output) == [("a", 4, 1), ("b", 4, 1)]
    assert [r.request_id for r in sched.waiting] == ["c", "d", "e"]
    for rid in "cd":
        assert reqs[rid].status is RequestStatus.PREEMPTED
        assert reqs[rid].num_computed_tokens == 0 and reqs[rid].num_preemptions == 1
        assert sched.kv_cache_manager.get_block_ids(rid) == []
    assert sched.num_preemptions_total == 2

    # The preempted request recomputes prompt + output and then completes.
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_STOPPED)
    output, _ = step(sched)
    assert chunks(output) == [("c", 0, 5), ("d", 0, 5)]  # e: no block left for it
    assert reqs["c"].output_token_ids == [7, 7]
    while reqs["c"].num_output_tokens < 4:
        step(sched)
    sched.finish_requests(["c"], RequestStatus.FINISHED_LENGTH)
    assert reqs["c"].status is RequestStatus.FINISHED_LENGTH


def test_victim_must_free_a_block():
    sched = make_scheduler(block_size=4, num_blocks=3)
    sched.add_request(make_request("a", 4))  # its first decode needs a second block
    sched.add_request(make_request("b", 3))
    sched.add_request(make_request("c", 3))
    step(sched)
    # Something else also holds c's block (as a prefix-cache hit will): preempting c frees nothing.
    sched.kv_cache_manager.fork(sched.get_request("c"), make_request("x", 4), 4)
    output = sched.schedule()
    assert output.preempted_request_ids == ["b"]
    assert chunks(output) == [("a", 4, 1), ("c", 3, 1)]


def test_request_that_is_the_youngest_preempts_itself():
    sched = make_scheduler(block_size=4, num_blocks=2)
    sched.add_request(make_request("a", 3))  # decodes inside its first block
    sched.add_request(make_request("b", 4))  # needs a second block for its first decode
    sched.add_request(make_request("c", 1))
    step(sched)
    output, _ = step(sched)
    assert output.preempted_request_ids == ["b"]
    assert chunks(output) == [("a", 3, 1)]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]


def test_a_request_too_long_for_the_pool_is_length_capped():
    sched = make_scheduler(block_size=4, num_blocks=2)
    req = make_request("a", 8)
    sched.add_request(req)
    step(sched)
    output, _ = step(sched)
    assert output.length_capped_request_ids == ["a"] and "a" in output.finished_request_ids
    assert output.is_empty and req.status is RequestStatus.FINISHED_LENGTH
    assert not sched.has_unfinished_requests()
    assert sched.num_free_blocks == sched.num_total_blocks == 2 and sched.kv_usage == 0.0


@pytest.mark.parametrize("num_prompt_tokens, num_shared", [(10, 8), (8, 4), (5, 4), (4, 0), (3, 0)])
def test_fork_shares_exactly_the_full_prompt_blocks(num_prompt_tokens, num_shared):
    sched = make_scheduler(block_size=4)
    leader = make_request("l", num_prompt_tokens)
    follower = make_request("f", num_prompt_tokens, leader=leader)
    sched.add_request(leader)
    sched.add_request(follower)
    output, _ = step(sched)
    assert [s.request_id for s in output.scheduled] == ["l"]
    assert follower.fork_parent is None and follower.num_computed_tokens == num_shared
    shared = sched.kv_cache_manager.get_block_ids("l")[: num_shared // 4]
    assert sched.kv_cache_manager.get_block_ids("f") == shared
    assert all(sched.kv_cache_manager.block_pool.blocks[b].ref_cnt == 2 for b in shared)
    output, updated = step(sched)
    # The follower recomputes at least the last prompt token, so it samples its own first token.
    assert chunks(output) == [("l", num_prompt_tokens, 1), ("f", num_shared, num_prompt_tokens - num_shared)]
    assert follower in updated and follower.output_token_ids == [7]
    assert sched.kv_cache_manager.get_block_ids("f")[: len(shared)] == shared


def test_waiting_follower_keeps_its_place_without_blocking_others():
    sched = make_scheduler(budget=10, max_seqs=8)
    leader = make_request("l", 12)
    sched.add_request(leader)
    sched.add_request(make_request("f", 12, leader=leader))
    sched.add_request(make_request("c", 4))
    step(sched)
    output, _ = step(sched)
    assert chunks(output) == [("l", 10, 2), ("c", 0, 4)]
    assert [r.request_id for r in sched.waiting] == ["f"]
    output, _ = step(sched)  # forked after the previous step; now admitted for the rest
    assert chunks(output) == [("l", 12, 1), ("c", 4, 1), ("f", 8, 4)]


def test_follower_computes_from_scratch_when_its_leader_goes_first():
    sched = make_scheduler(budget=10)
    leader = make_request("l", 12)
    follower = make_request("f", 12, leader=leader)
    sched.add_request(leader)
    sched.add_request(follower)
    step(sched)  # leader mid-prefill
    sched.finish_requests(["l"], RequestStatus.FINISHED_ABORTED)
    assert follower.fork_parent is None
    output, _ = step(sched)
    assert chunks(output) == [("f", 0, 10)]
    # A follower added after its leader finished does not wait either.
    late = make_request("g", 12, leader=leader)
    sched.add_request(late)
    assert late.fork_parent is None


def test_follower_added_after_the_leader_prefilled_forks_at_once():
    sched = make_scheduler()
    leader = make_request("l", 9)
    sched.add_request(leader)
    step(sched)
    follower = make_request("f", 9, leader=leader)
    sched.add_request(follower)
    assert follower.num_computed_tokens == 8 and not follower.waiting_for_fork
    output, _ = step(sched)
    assert chunks(output) == [("l", 9, 1), ("f", 8, 1)]


def test_forked_followers_blocks_are_reclaimed_when_nothing_else_can_run():
    sched = make_scheduler(block_size=4, num_blocks=4, max_seqs=1)
    leader = make_request("l", 9)
    sched.add_request(leader)
    sched.add_request(make_request("f", 9, leader=leader))
    step(sched)  # f now holds 2 shared blocks while waiting for a seat
    sched.add_request(make_request("x", 16))
    sched.finish_requests(["l"], RequestStatus.FINISHED_STOPPED)
    # As if x had been preempted: it is ahead of f and needs the whole pool.
    sched.waiting.rotate(1)
    output, _ = step(sched)
    assert chunks(output) == [("x", 0, 16)]
    assert sched.get_request("f").num_computed_tokens == 0
    assert sched.kv_cache_manager.get_block_ids("f") == []


def _drive_to(phase: str) -> tuple[Scheduler, str]:
    """A scheduler with the request to abort in the given phase, plus a bystander `z`."""
    sched = make_scheduler(budget=8, block_size=4, num_blocks=8)
    sched.add_request(make_request("z", 3))
    if phase == "waiting":
        sched.add_request(make_request("y", 20))  # takes the rest of the budget
        sched.add_request(make_request("a", 4))
        step(sched)
        assert sched.get_request("a").status is RequestStatus.WAITING
        return sched, "a"
    leader = make_request("a", 12)
    sched.add_request(leader)
    if phase in ("forked follower", "running follower"):
        sched.add_request(make_request("b", 12, leader=leader))
        step(sched)
        step(sched)  # leader finished its prompt; b forked and is waiting with shared blocks
        assert sched.kv_cache_manager.get_block_ids("b")
        if phase == "running follower":
            step(sched)
            assert sched.get_request("b").status is RequestStatus.RUNNING
        return sched, "b"
    step(sched)
    if phase == "decoding":
        step(sched)
        step(sched)
    if phase == "preempted":
        step(sched)
        sched.add_request(make_request("big", 8))
        for _ in range(50):
            step(sched)
            if sched.get_request("a").status is RequestStatus.PREEMPTED:
                break
        assert sched.get_request("a").status is RequestStatus.PREEMPTED
    return sched, "a"


@pytest.mark.parametrize(
    "phase", ["waiting", "mid-prefill", "decoding", "forked follower", "running follower", "preempted"]
)
def test_abort_frees_everything_in_every_phase(phase):
    sched, rid = _drive_to(phase)
    req = sched.get_request(rid)
    sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
    assert req.status is RequestStatus.FINISHED_ABORTED and sched.get_request(rid) is None
    assert sched.kv_cache_manager.get_block_ids(rid) == []
    assert req not in sched.waiting and req not in sched.running
    sched.kv_cache_manager.check_invariants()
    output, _ = step(sched)
    assert rid in output.finished_request_ids and rid not in [s.request_id for s in output.scheduled]
    sched.finish_requests(list(sched.requests), RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.num_free_blocks == sched.num_total_blocks


def test_update_skips_requests_finished_after_schedule():
    sched = make_scheduler()
    a, b = make_request("a", 3), make_request("b", 3)
    sched.add_request(a)
    sched.add_request(b)
    output = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    updated = sched.update_from_output(output, execute(output))
    assert updated == [b] and a.output_token_ids == [] and a.num_computed_tokens == 0
    assert sched.num_free_blocks == sched.num_total_blocks - 1


def test_finish_requests_on_unknown_ids_is_harmless():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    sched.finish_requests(["nope", "also-nope"], RequestStatus.FINISHED_ABORTED)
    sched.finish_requests([], RequestStatus.FINISHED_ABORTED)
    output, _ = step(sched)
    assert output.finished_request_ids == set() and sched.num_running == 1
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # twice: still harmless
    assert sched.schedule().finished_request_ids == {"a"}
    with pytest.raises(ValueError):
        sched.finish_requests(["a"], RequestStatus.RUNNING)


def test_duplicate_request_id_is_refused():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError):
        sched.add_request(make_request("a", 3))


def test_block_stats():
    sched = make_scheduler(block_size=4, num_blocks=8)
    assert (sched.num_free_blocks, sched.num_total_blocks, sched.kv_usage) == (8, 8, 0.0)
    sched.add_request(make_request("a", 8))
    step(sched)
    assert (sched.num_free_blocks, sched.kv_usage) == (6, 0.25)
    assert sched.has_unfinished_requests() and sched.num_waiting == 0
